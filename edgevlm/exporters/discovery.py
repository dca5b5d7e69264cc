"""Exporter families, found by iterating the subpackages of `edgevlm.exporters` and reading the `FAMILY` each
declares (a `family.Family`): the architectures it exports and its aliases come from there, so adding a family edits
nothing else. Reading the declarations imports no torch.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    from .family import Family

# short names -> model directories shipped inside edgevlm (no hub needed), as (package, folder)
PACKAGED_MODELS = {
    "demo": ("edgevlm.demo", "model"),  # the tiny Qwen2-VL trained on synthetic scenes (`edgevlm demo`)
}

_Value = TypeVar("_Value")


@functools.cache
def families() -> dict[str, Family]:
    """Every exporter family by name: the `FAMILY` of each subpackage of `edgevlm.exporters` (no torch imported)."""
    found: dict[str, Family] = {}
    for module in pkgutil.iter_modules([str(Path(__file__).parent)], "edgevlm.exporters."):
        if module.ispkg:
            family = getattr(importlib.import_module(module.name), "FAMILY", None)
            if family is None:
                raise RuntimeError(f"{module.name} declares no FAMILY: every folder in edgevlm/exporters is an exporter "
                                   "family (shared mechanics are plain modules beside them)")  # fmt: skip
            if family.name in found:
                raise RuntimeError(f"two exporter families are named {family.name!r} (one in {module.name})")
            found[family.name] = family
    return found


def _declared(what: str, entries: Callable[[Family], Mapping[str, _Value]]) -> dict[str, _Value]:
    """The `entries` every family declares, in one dict; a key two families declare would make lookups ambiguous."""
    merged: dict[str, _Value] = {}
    owner: dict[str, str] = {}
    for family in families().values():
        for key, value in entries(family).items():
            if key in owner:
                raise RuntimeError(f"exporter families {owner[key]!r} and {family.name!r} both declare {what} {key!r}")
            merged[key], owner[key] = value, family.name
    return merged


@functools.cache
def architectures() -> dict[str, Family]:
    """The family exporting each Hugging Face architecture name (config.json "architectures")."""
    return _declared("architecture", lambda family: dict.fromkeys(family.architectures, family))


@functools.cache
def aliases() -> dict[str, str]:
    """Short names users type -> hub ids, as the families declare them."""
    return _declared("alias", lambda family: family.aliases)


def family_for(architecture: str) -> Family:
    """The exporter family for a Hugging Face architecture name."""
    family = architectures().get(architecture)
    if family is None:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; edgevlm exports "
            f"{', '.join(sorted(architectures()))} (aliases: {', '.join(sorted({**aliases(), **PACKAGED_MODELS}))})."
        )
    return family
