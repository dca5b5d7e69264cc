"""The manifest (`edgevlm.json`) as typed specs.

Everything the runtime needs about a model is data here, read once when a bundle is opened: every section into a
frozen dataclass, the mechanisms (`preprocessing`, `positions`, `vision.patch_positions`) into the runtime
strategies registered under their kind (`edgevlm.contract.kinds`). Kinds name mechanisms, not families, so
a family that reuses mechanisms needs no runtime code. Anything unknown, missing or of the wrong type is a
`BundleError` naming the key. Format 1 manifests (edgevlm 0.1.0) are migrated when read (`migrate_v1`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..budget import DEFAULT_MAX_IMAGE_TOKENS, BudgetLimits
from ..errors import BudgetError, BundleError, describe_value
from .graph import PATCH_POSITIONS, PIXEL_PATCHES
from .kinds import strategy_class
from .kinds.patch_positions import PatchPositions
from .kinds.positions import Positions
from .kinds.registry import OMIT_DEFAULT, omitted
from .kinds.tiling import Preprocessing

MANIFEST_NAME = "edgevlm.json"
FORMAT_VERSION = 2
VISION_DTYPES = ("fp32", "fp16", "int8")
TEXT_NORMALIZATIONS = (None, "NFC", "NFD", "NFKC", "NFKD")  # unicodedata.normalize's forms
IMAGE_ATTENTION = ("causal", "bidirectional")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class VisionVariant:
    """One precision of the vision graph, with how it was validated."""

    file: str
    dtype: str  # fp32 | fp16 | int8
    validation: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VisionSpec:
    variants: dict[str, VisionVariant]
    default: str
    # Width of each image embedding row the graph emits: the language model's input embedding, and after it the
    # `deepstack_layers` feature sets (each as wide) that llama.cpp adds to the hidden states after its first
    # `deepstack_layers` layers (Qwen3-VL's DeepStack; llama.cpp's `n_embd_inp`).
    embedding_dim: int
    patch_positions: PatchPositions  # what the graph takes besides the pixels; in JSON its kind ("grid-2d", "none")
    # The tower's sizes, for memory/time estimates (`edgevlm plan`); None in bundles exported before they were kept.
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    deepstack_layers: int = field(default=0, metadata=OMIT_DEFAULT)  # left out at 0: older readers take such bundles

    @property
    def row_sets(self) -> int:
        """Feature sets side by side in an embedding row: the input embedding and the DeepStack sets."""
        return 1 + self.deepstack_layers


@dataclass(frozen=True)
class LLMSpec:
    file: str
    quantization: str  # F32 | F16 | Q8_0 | Q4_K_M
    arch: str
    n_ctx_train: int
    embedding_length: int
    text_normalization: str | None = None  # Unicode form the tokenizer expects ("NFC" for Qwen2); llama.cpp applies none
    # How an image's embeddings attend to each other: "causal" as text, or "bidirectional" (Gemma 3): the runtime
    # then decodes each image in one batch with llama.cpp's causal attention off.
    image_attention: str = field(default="causal", metadata=OMIT_DEFAULT)


@dataclass(frozen=True)
class TokenSpec:
    """The image placeholder's text in the chat template; the runtime puts one image's embeddings at each, with
    `image_prefix` before them and `image_suffix` after them in the placeholder's place (Gemma 3's processor writes
    "\n\n<start_of_image>", the image, "<end_of_image>\n\n" for each `<start_of_image>` of its template)."""

    image_pad: str
    image_prefix: str = field(default="", metadata=OMIT_DEFAULT)
    image_suffix: str = field(default="", metadata=OMIT_DEFAULT)


def _default_budget() -> BudgetLimits:
    return BudgetLimits(max_image_tokens=DEFAULT_MAX_IMAGE_TOKENS)


@dataclass(frozen=True)
class Manifest:
    family: str  # provenance: the exporter family, the source model and what the export measured
    source: dict
    preprocessing: Preprocessing
    vision: VisionSpec
    llm: LLMSpec
    tokens: TokenSpec
    positions: Positions
    files: dict[str, FileEntry] = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    # Bundle-level token limits, the lowest-precedence layer (see `budget.resolve_limits`).
    budget: BudgetLimits = field(default_factory=_default_budget)
    edgevlm_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        """The manifest as JSON-able data: strategies as their sections (`kind` and parameters)."""
        return _to_json(self)

    @classmethod
    def from_dict(cls, data: object, where: str = MANIFEST_NAME) -> Manifest:
        """Read and check a manifest (parsed JSON); anything malformed is a BundleError naming the key."""
        if not isinstance(data, dict):
            raise BundleError(f"{where} is malformed: expected a JSON object, got {describe_value(data)}; re-export the bundle.")  # fmt: skip
        version = data.get("format_version")
        if type(version) is int and version == 1:  # not True or 1.0, which 0.1.0 refused too
            data = migrate_v1(data)
        elif type(version) is not int or version != FORMAT_VERSION:
            raise BundleError(
                f"{where} has format version {describe_value(version)}; this edgevlm reads versions 1 and {FORMAT_VERSION}. "
                "Re-export the bundle with this edgevlm, or install the edgevlm version that wrote it."
            )
        try:
            manifest = _read_dataclass(cls, data, "")
            _check_manifest(manifest)
        except _Malformed as e:
            raise BundleError(f"{where} is malformed: {e}; fix it or re-export the bundle.") from None
        except BudgetError as e:
            raise BundleError(f"{where} has an invalid budget section ({e}); fix it or re-export the bundle.") from e
        return manifest

    def referenced_files(self) -> list[str]:
        """The files the runtime opens by name: the LLM and every vision graph."""
        return [self.llm.file] + [variant.file for variant in self.vision.variants.values()]


# --------------------------------------------------------------------------------------------------- format 1

_V1_KINDS = {
    "preprocessing": {"qwen2_vl": "dynamic-patches", "clip": "fixed-resize"},
    "positions": {"mrope": "mrope-3d"},
    "patch_positions": {"qwen2_vl": "grid-2d"},
}


def migrate_v1(data: dict) -> dict:
    """A format 1 manifest (edgevlm 0.1.0) as format 2: family-named kinds become mechanism names, the patch
    positions kind is made explicit (bundles exported before LLaVA support have none: format 1 then meant Qwen2-VL's,
    as their `input_names` say), and the fields no runtime read (`vision.input_names`, `vision.output_name`,
    `positions.sections`, token ids) go.
    Values of the wrong type are left for the format 2 reader to name."""
    data = dict(data, format_version=FORMAT_VERSION)
    preprocessing, positions, vision, tokens = (data.get(key) for key in ("preprocessing", "positions", "vision", "tokens"))  # fmt: skip
    if isinstance(preprocessing, dict):
        data["preprocessing"] = _renamed_kind(preprocessing, "preprocessing")
    if isinstance(positions, dict):
        data["positions"] = {k: v for k, v in _renamed_kind(positions, "positions").items() if k != "sections"}
    if isinstance(vision, dict):
        vision = {k: v for k, v in vision.items() if k not in ("input_names", "output_name")}
        input_names = data["vision"].get("input_names", [PIXEL_PATCHES, PATCH_POSITIONS])
        implied = "grid-2d" if isinstance(input_names, list) and PATCH_POSITIONS in input_names else "none"
        kind = vision.get("patch_positions", implied)
        vision["patch_positions"] = _V1_KINDS["patch_positions"].get(kind, kind) if isinstance(kind, str) else kind
        data["vision"] = vision
    if isinstance(tokens, dict):
        data["tokens"] = {k: v for k, v in tokens.items() if k not in ("image_pad_id", "vision_start_id", "vision_end_id", "eos_ids")}  # fmt: skip
    return data


def _renamed_kind(section: dict, name: str) -> dict:
    kind = section.get("kind")
    return dict(section, kind=_V1_KINDS[name].get(kind, kind)) if isinstance(kind, str) else section


# --------------------------------------------------------------------------------------------------- reading


class _Malformed(Exception):
    """A manifest value of the wrong type or out of range; the message names its key."""


# the strategy fields' annotations -> the registry section their kinds are looked up in
_STRATEGY_SECTIONS = {Preprocessing: "preprocessing", Positions: "positions", PatchPositions: "patch_positions"}


def _read_dataclass(cls: type, data: object, key: str):
    """An instance of dataclass `cls` from a JSON object, every field's type checked against its annotation."""
    if not isinstance(data, dict):
        raise _Malformed(f"{key or 'the manifest'}: expected a JSON object, got {describe_value(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _Malformed(f"{key or 'the manifest'}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(fields)}")  # fmt: skip
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        where = f"{key}.{name}" if key else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Malformed(f"{key or 'the manifest'}: missing key {name!r}")
        elif hints[name] in _STRATEGY_SECTIONS:
            values[name] = _read_strategy(_STRATEGY_SECTIONS[hints[name]], data[name], where)
        else:
            values[name] = _read_value(hints[name], data[name], where)
    return cls(**values)


def _read_strategy(section: str, value: object, key: str):
    """The strategy a section names: a JSON object with `kind` and parameters, or (patch positions) a kind."""
    if section != "patch_positions" and not isinstance(value, dict):
        raise _Malformed(f"{key}: expected a JSON object with a 'kind', got {describe_value(value)}")
    if section != "patch_positions" and "kind" not in value:
        raise _Malformed(f"{key}: missing key 'kind'")
    kind, kind_key = (value, key) if section == "patch_positions" else (value["kind"], f"{key}.kind")
    try:
        cls = strategy_class(section, kind)
    except ValueError as e:
        raise _Malformed(f"{kind_key}: {e}") from None
    try:
        return cls() if section == "patch_positions" else cls.from_dict(value)
    except (ValueError, TypeError, OverflowError) as e:
        raise _Malformed(f"{key}: {e}") from None


def _read_value(annotation, value: object, key: str):
    """`value` checked against a field annotation: str, int, float, bool, dict, X | None, tuple[X, ...],
    dict[str, X] or a dataclass."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (annotation,) = [arg for arg in args if arg is not type(None)]
        return _read_value(annotation, value, key)
    if dataclasses.is_dataclass(annotation):
        return _read_dataclass(annotation, value, key)
    if origin is tuple and isinstance(value, list):
        return tuple(_read_value(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict and isinstance(value, dict):
        return {name: _read_value(args[1], item, f"{key}.{name}") for name, item in value.items()}
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool) and _finite(value):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation in (str, bool, dict) and isinstance(value, annotation):
        return value
    expected = {str: "a string", int: "an integer", float: "a finite number", bool: "true or false"}.get(annotation)
    raise _Malformed(f"{key}: expected {expected or ('a JSON array' if origin is tuple else 'a JSON object')}, got {describe_value(value)}")  # fmt: skip


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and hasattr(value, "kind"):  # a strategy: its section, or its bare kind
        return value.to_dict() if hasattr(value, "to_dict") else value.kind
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value) if not omitted(value, f)}
    if isinstance(value, tuple | list):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return {name: _to_json(item) for name, item in value.items()}
    return value


# --------------------------------------------------------------------------------------------------- checks


def _check_file_name(name: object, key: str) -> None:
    """A bundle file name must be a plain name inside the bundle folder: no directories, no way out of it."""
    plain = (
        isinstance(name, str) and 0 < len(name) <= 255 and not name.startswith(".")
        and not any(c in name for c in "/\\\0")
    )  # fmt: skip
    if not plain:
        raise _Malformed(f"{key}: {describe_value(name)} is not a plain file name inside the bundle (no '/', '\\', "
                         "'..', leading '.', NUL or empty names)")  # fmt: skip


def _check_manifest(manifest: Manifest) -> None:
    """The checks beyond types: file names, known dtypes, positive sizes, files listed with checksums."""
    vision, llm = manifest.vision, manifest.llm
    _check_file_name(llm.file, "llm.file")
    if not vision.variants:
        raise _Malformed("vision.variants: lists no vision graph")
    for dtype, variant in vision.variants.items():
        _check_file_name(variant.file, f"vision.variants.{dtype}.file")
        if variant.dtype not in VISION_DTYPES:
            raise _Malformed(f"vision.variants.{dtype}.dtype: {variant.dtype!r} is not one of {', '.join(VISION_DTYPES)}")  # fmt: skip
    if vision.default not in vision.variants:
        raise _Malformed(f"vision.default: {vision.default!r} is not one of the variants ({', '.join(vision.variants)})")  # fmt: skip
    if llm.text_normalization not in TEXT_NORMALIZATIONS:
        raise _Malformed(f"llm.text_normalization: {llm.text_normalization!r} is not a Unicode normalization form "
                         f"(one of {', '.join(map(str, TEXT_NORMALIZATIONS))})")  # fmt: skip
    if llm.image_attention not in IMAGE_ATTENTION:
        raise _Malformed(f"llm.image_attention: {llm.image_attention!r} is not one of {', '.join(IMAGE_ATTENTION)}")
    if not manifest.tokens.image_pad:
        raise _Malformed("tokens.image_pad: the image placeholder's text is empty")
    for key, value in [("vision.embedding_dim", vision.embedding_dim), ("llm.n_ctx_train", llm.n_ctx_train),
                       ("llm.embedding_length", llm.embedding_length)]:  # fmt: skip
        if value < 1:
            raise _Malformed(f"{key}: expected a positive integer, got {value}")
    if manifest.positions.merge_size != manifest.preprocessing.merge_size:
        raise _Malformed(f"positions.merge_size: {describe_value(manifest.positions.merge_size)} differs from preprocessing's "
                         f"merge_size {manifest.preprocessing.merge_size}")  # fmt: skip
    if vision.deepstack_layers < 0:
        raise _Malformed(f"vision.deepstack_layers: expected an integer >= 0, got {vision.deepstack_layers}")
    if llm.embedding_length * vision.row_sets != vision.embedding_dim:
        raise _Malformed(f"vision.embedding_dim: {describe_value(vision.embedding_dim)} differs from llm.embedding_length "
                         f"{describe_value(llm.embedding_length)} x {vision.row_sets} (the input embedding and "
                         f"{vision.deepstack_layers} DeepStack sets): the image embeddings would not fit the language model")  # fmt: skip
    _check_files_section(manifest)


def _check_files_section(manifest: Manifest) -> None:
    if not manifest.files:
        raise _Malformed("files: lists no files, so nothing could be checked")
    for name, entry in manifest.files.items():
        _check_file_name(name, f"files.{name}")
        if entry.size < 0 or not _SHA256.fullmatch(entry.sha256):
            raise _Malformed(f"files.{name}: expected a size >= 0 and a sha256 of 64 lowercase hex digits")
    unlisted = [name for name in manifest.referenced_files() if name not in manifest.files]
    if unlisted:
        raise _Malformed(f"files: does not list {', '.join(unlisted)}, which the manifest refers to")
