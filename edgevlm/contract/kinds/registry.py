"""One registry of the mechanisms a manifest names (strategies), keyed by (manifest section, kind).

A manifest names the mechanism each section needs by a `kind` (`mrope-3d`, `grid-2d`, `dynamic-patches`, ...), never
by a model family. Each kind is one class, registered here with `@register(section, kind)`; the manifest is read
into instances of these classes when a bundle is opened, so an unknown kind fails there, naming the known ones.
A strategy class is a frozen dataclass of the section's parameters with a `kind` class attribute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from ...errors import describe_value

SECTIONS = ("preprocessing", "positions", "patch_positions")
_STRATEGIES: dict[str, dict[str, type]] = {section: {} for section in SECTIONS}

T = TypeVar("T", bound=type)


def register(section: str, kind: str) -> Callable[[T], T]:
    """Class decorator: the strategy for `kind` in manifest section `section`."""

    def add(cls: T) -> T:
        if kind in _STRATEGIES[section]:
            raise RuntimeError(f"two strategies registered for {section} kind {kind!r}")
        cls.kind, cls.section = kind, section
        _STRATEGIES[section][kind] = cls
        return cls

    return add


def known_kinds(section: str) -> tuple[str, ...]:
    return tuple(_STRATEGIES[section])


def strategy_class(section: str, kind: object) -> type:
    """The class registered for `kind`; ValueError naming the kinds this edgevlm knows otherwise."""
    cls = _STRATEGIES[section].get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"{describe_value(kind)} is not known to this edgevlm (its {section} kinds: {', '.join(known_kinds(section))}; "
                         "a newer edgevlm may know it)")  # fmt: skip
    return cls


def strategy_from_dict(section: str, data: Mapping[str, Any]) -> Any:
    """The strategy a manifest section ({"kind": ..., parameters}) describes; ValueError naming what is wrong."""
    if not isinstance(data, Mapping) or "kind" not in data:
        raise ValueError(f"{section}: expected a JSON object with a 'kind', got {data!r}")
    return strategy_class(section, data["kind"]).from_dict(data)


class Section:
    """Base of a kind's class whose manifest section is a JSON object: `kind` and the class's fields."""

    kind: ClassVar[str]
    section: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict, `kind` included; `from_dict` reads it back."""
        return _spec_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Read `to_dict` output. Unknown keys, a different `kind` or bad values raise ValueError naming them."""
        return _spec_from_dict(cls, cls.section, data)


# Field metadata of a parameter added after bundles were written with its default: at that default it is left out
# of the JSON, so those families' manifests (and the edgevlm versions that read them) stay as they were.
OMIT_DEFAULT = {"omit_default": True}


def omitted(spec: Any, field: dataclasses.Field) -> bool:
    """Whether `field` of dataclass instance `spec` stays out of its JSON (marked `OMIT_DEFAULT`, at its default)."""
    return bool(field.metadata.get("omit_default")) and getattr(spec, field.name) == field.default


def _spec_to_dict(spec: Any) -> dict[str, Any]:
    """A strategy's manifest section: `kind` and every parameter, tuples as lists."""
    out: dict[str, Any] = {"kind": spec.kind}
    for field in dataclasses.fields(spec):
        if omitted(spec, field):
            continue
        value = getattr(spec, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def _spec_from_dict(cls: type, section: str, data: Mapping[str, Any]) -> Any:
    """Read `_spec_to_dict` output into `cls`; a different kind or unknown keys raise ValueError naming them
    (the class's `__post_init__` checks the values)."""
    values = dict(data)
    kind = values.pop("kind", cls.kind)
    if kind != cls.kind:
        raise ValueError(f"{section} kind={kind!r}: this reader handles kind={cls.kind!r}")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown {section} key(s) {', '.join(f'{k}={values[k]!r}' for k in unknown)}; "
            f"known keys: kind, {', '.join(sorted(known)) or '(none)'}"
        )
    return cls(**values)


def check_positive_ints(spec: Any, section: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{section} {name}={value!r}: expected a positive integer")
