"""Hardware profiles as data: TOML files parsed into frozen dataclasses, validated key by key.

A profile file has optional top-level keys `description`, `extends` (a shipped profile name or a path, whose
tables this file overrides key by key) and `strict` (fail instead of falling back when a provider or GPU
offload is missing), and the tables `[vision]`, `[vision.tensorrt]`, `[vision.cuda]`, `[llm]`, `[budget]` and
`[memory]`. Every key is checked: an unknown key or a bad value raises `ProfileError` naming the file, the key and
what is allowed. No heavy imports here: `edgevlm export --profile` reads profiles without onnxruntime or llama.cpp.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..budget import BudgetLimits
from ..errors import BudgetError, ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parent
AUTO = "auto"
# onnxruntime execution providers a profile may name, in the short form profiles use
PROVIDER_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}  # fmt: skip
PRECISIONS = ("fp32", "fp16", "int8")
# KV cache value types llama.cpp accepts for type_k/type_v, with bytes per value (block-quantized: per 32 values)
KV_CACHE_BYTES_PER_VALUE = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32,
    "q4_0": 18 / 32, "iq4_nl": 18 / 32,
}  # fmt: skip
PHYSICAL = "physical"  # thread count = the physical cores this process may run on
MAX_EXTENDS_DEPTH = 8


class _Invalid(ValueError):
    """A value outside what a key allows; `allowed` says what is."""

    def __init__(self, allowed: str):
        super().__init__(allowed)
        self.allowed = allowed


# ------------------------------------------------------------------------------------------------ value checks


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _int(low: int, high: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise _Invalid(f"a whole number >= {low}" + (f" and <= {high}" if high is not None else ""))
        return value

    return check


def _number(low: float, high: float | None = None) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
            raise _Invalid(f"a number > {low:g}" + (f" and <= {high:g}" if high is not None else ""))
        if high is not None and value > high:
            raise _Invalid(f"a number > {low:g} and <= {high:g}")
        return float(value)

    return check


def _choice(*options: Any) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not any(type(value) is type(option) and value == option for option in options):  # 1 is not true
            raise _Invalid("one of " + ", ".join(_toml(o) for o in options))
        return value

    return check


def _names(options: tuple[str, ...], allow_empty: bool) -> Callable[[Any], tuple[str, ...]]:
    def check(value: Any) -> tuple[str, ...]:
        allowed = f"a list of distinct names from {', '.join(map(repr, options))}"
        if not isinstance(value, list) or (not value and not allow_empty):
            raise _Invalid(allowed + ("" if allow_empty else ", at least one"))
        if any(v not in options for v in value) or len(set(value)) != len(value):
            raise _Invalid(allowed)
        return tuple(value)

    return check


def _threads(value: Any) -> int | str:
    if value == PHYSICAL or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise _Invalid(f'"{PHYSICAL}" or a whole number >= 1')


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("a non-empty string")
    return value


def _toml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _key(check: Callable[[Any], Any], default: Any = None, default_factory: Any = None) -> Any:
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


# ------------------------------------------------------------------------------------------------ the profile


@dataclass(frozen=True)
class TensorRTOptions:
    """onnxruntime's TensorRT provider: fp16 kernels, engine and timing caches, the patch-axis optimization shape."""

    fp16: bool = _key(_bool, True)
    cache_dir: str = _key(_text, "~/.cache/edgevlm/tensorrt")  # engines and timing caches (building takes minutes)
    opt_image_tokens: int | None = _key(_int(1))  # the image size TensorRT tunes for; None: the max
    device_id: int = _key(_int(0), 0)


@dataclass(frozen=True)
class CUDAOptions:
    """onnxruntime's CUDA provider."""

    device_id: int = _key(_int(0), 0)
    gpu_mem_limit_gib: float | None = _key(_number(0))  # the provider's memory arena; None: no limit
    arena_extend_strategy: str = _key(_choice("kNextPowerOfTwo", "kSameAsRequested"), "kSameAsRequested")
    # cuDNN convolution algorithm search: EXHAUSTIVE benchmarks every new input shape (every new image size)
    conv_algo_search: str = _key(_choice("EXHAUSTIVE", "HEURISTIC", "DEFAULT"), "HEURISTIC")


@dataclass(frozen=True)
class VisionProfile:
    """How the ONNX vision graph runs."""

    providers: tuple[str, ...] = _key(_names(tuple(PROVIDER_NAMES), False), ("cpu",))
    precision: tuple[str, ...] = _key(_names(PRECISIONS, True), ())  # preference; empty: the bundle's default
    intra_op_threads: int | str = _key(_threads, PHYSICAL)
    allow_spinning: bool = _key(_bool, False)  # off: llama.cpp works on the same cores right after
    gflops: float | None = _key(_number(0))  # assumed throughput for `edgevlm plan`'s time estimates
    tensorrt: TensorRTOptions | None = None
    cuda: CUDAOptions | None = None


@dataclass(frozen=True)
class LLMProfile:
    """llama.cpp settings (resolved into `resolve.LlamaSettings`)."""

    n_gpu_layers: int = _key(_int(-1), 0)  # -1: all layers
    n_threads: int | str = _key(_threads, PHYSICAL)
    n_threads_batch: int | str = _key(_threads, PHYSICAL)
    n_ctx: int = _key(_int(256), 4096)
    n_batch: int = _key(_int(1), 512)
    n_ubatch: int = _key(_int(1), 512)
    flash_attn: bool | str = _key(_choice("auto", True, False), "auto")
    kv_cache_type: str = _key(_choice(*KV_CACHE_BYTES_PER_VALUE), "f16")
    mmap: bool | None = _key(_bool)  # None: llama.cpp decides
    mlock: bool = _key(_bool, False)
    adapt_threads: bool = _key(_bool, False)  # each request: n_threads minus the other tasks running at its start


@dataclass(frozen=True)
class MemoryProfile:
    """A ceiling on the estimated memory of a loaded bundle, and what to do above it."""

    ceiling_gib: float | None = _key(_number(0))
    ceiling_ram_fraction: float | None = _key(_number(0, 1.0))  # of the machine's total RAM
    on_exceed: str = _key(_choice("shrink", "refuse"), "shrink")


@dataclass(frozen=True)
class Profile:
    """One hardware profile: a shipped one (`load_profile("cpu")`) or a user's TOML file."""

    name: str
    source: str  # the file it was read from
    description: str = ""
    strict: bool = False
    vision: VisionProfile = field(default_factory=VisionProfile)
    llm: LLMProfile = field(default_factory=LLMProfile)
    budget: BudgetLimits = field(default_factory=BudgetLimits)
    memory: MemoryProfile = field(default_factory=MemoryProfile)


_TOP_LEVEL = {"description": _text, "extends": _text, "strict": _bool}
_TABLES = {"vision": VisionProfile, "llm": LLMProfile, "budget": BudgetLimits, "memory": MemoryProfile}
_PROVIDER_TABLES = {"tensorrt": TensorRTOptions, "cuda": CUDAOptions}


def _parse_table(cls: type, table: Any, where: str, section: str, subtables: Mapping[str, type] | None = None) -> Any:
    """Build dataclass `cls` from a TOML table, checking every key with its field's `check`."""
    subtables = subtables or {}
    if not isinstance(table, dict):
        raise ProfileError(f"{where}: [{section}] must be a table, got {_toml(table)}")
    checked = {f.name: f for f in fields(cls) if "check" in f.metadata}
    unknown = sorted(set(table) - set(checked) - set(subtables))
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                           f"[{section}] takes {', '.join([*checked, *subtables])}")  # fmt: skip
    values = {}
    for key, value in table.items():
        if key in subtables:
            values[key] = _parse_table(subtables[key], value, where, f"{section}.{key}")
            continue
        values[key] = _checked(checked[key].metadata["check"], value, where, f"{section}.{key}")
    return cls(**values)


def _checked(check: Callable[[Any], Any], value: Any, where: str, key: str) -> Any:
    """`check(value)`, or a ProfileError naming the file, the key, the value and what is allowed."""
    try:
        return check(value)
    except _Invalid as e:
        raise ProfileError(f"{where}: {key} = {_toml(value)} is invalid; expected {e.allowed}") from None


def parse_profile(data: Mapping[str, Any], name: str, where: str) -> Profile:
    """A `Profile` from a parsed TOML document (`extends` already merged in), checked key by key."""
    unknown = sorted(set(data) - set(_TOP_LEVEL) - set(_TABLES))
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(unknown)}; a profile takes "
                           f"{', '.join([*_TOP_LEVEL, *_TABLES])}")  # fmt: skip
    top = {key: _checked(check, data[key], where, key) for key, check in _TOP_LEVEL.items() if key in data}
    vision = _parse_table(VisionProfile, data.get("vision", {}), where, "vision", _PROVIDER_TABLES)
    for provider in _PROVIDER_TABLES:
        if getattr(vision, provider) is not None and provider not in vision.providers:
            raise ProfileError(f"{where}: [vision.{provider}] is set but {provider!r} is not in vision.providers "
                               f"{list(vision.providers)}; add it there or remove the table")  # fmt: skip
    llm = _parse_table(LLMProfile, data.get("llm", {}), where, "llm")
    if llm.kv_cache_type not in ("f32", "f16", "bf16") and llm.flash_attn is False:
        raise ProfileError(f"{where}: llm.kv_cache_type = {llm.kv_cache_type!r} needs flash attention (llama.cpp "
                           "quantizes the V cache only with it); set llm.flash_attn = true or \"auto\", or a float cache type")  # fmt: skip
    if llm.n_ubatch > llm.n_batch:
        raise ProfileError(f"{where}: llm.n_ubatch = {llm.n_ubatch} is above llm.n_batch = {llm.n_batch}; "
                           "the physical batch cannot exceed the logical one")  # fmt: skip
    budget_table = data.get("budget", {})
    if not isinstance(budget_table, dict):
        raise ProfileError(f"{where}: [budget] must be a table, got {_toml(budget_table)}")
    try:
        budget = BudgetLimits.from_dict(budget_table, "[budget]")
    except BudgetError as e:
        raise ProfileError(f"{where}: {e}") from None
    memory = _parse_table(MemoryProfile, data.get("memory", {}), where, "memory")
    if memory.ceiling_gib is not None and memory.ceiling_ram_fraction is not None:
        raise ProfileError(f"{where}: set one of memory.ceiling_gib and memory.ceiling_ram_fraction, not both")
    return Profile(name=name, source=where, description=top.get("description", ""), strict=top.get("strict", False),
                   vision=vision, llm=llm, budget=budget, memory=memory)  # fmt: skip


# ------------------------------------------------------------------------------------------------ loading


def shipped_profiles() -> list[str]:
    """Names of the profiles that ship with edgevlm."""
    return sorted(path.stem for path in PROFILE_DIR.glob("*.toml"))


def profile_path(name_or_path: str | Path) -> Path:
    """The file of a shipped profile name, or a user's TOML path (an unknown name is an error listing the shipped)."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist")
        return path
    if text not in shipped_profiles():
        raise ProfileError(f"unknown profile {text!r}; shipped profiles: {', '.join(shipped_profiles())}, "
                           f"{AUTO!r} (detect), or the path of a .toml file")  # fmt: skip
    return PROFILE_DIR / f"{text}.toml"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path} is not valid TOML: {e}") from e


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, table by table (lists and values are replaced, not merged)."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value  # fmt: skip
    return merged


def _resolved_document(path: Path, depth: int = 0) -> dict[str, Any]:
    """The file's TOML with its `extends` chain merged underneath (relative paths from the file's folder)."""
    if depth > MAX_EXTENDS_DEPTH:
        raise ProfileError(f"{path}: `extends` goes more than {MAX_EXTENDS_DEPTH} levels deep (a cycle?)")
    data = _read_toml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ProfileError(f"{path}: extends = {_toml(parent)} is invalid; expected a profile name or a .toml path")
    parent_path = Path(parent).expanduser()
    if parent.endswith(".toml") and not parent_path.is_absolute():
        parent = str(path.parent / parent_path)
    try:
        parent_file = profile_path(parent)
    except ProfileError as e:
        raise ProfileError(f"{path}: extends = {parent!r}: {e}") from None
    base = _resolved_document(parent_file, depth + 1)
    memory, base_memory = data.get("memory"), base.get("memory")
    # a ceiling replaces the inherited one, of either kind
    if isinstance(memory, dict) and isinstance(base_memory, dict):
        for kind, other in (("ceiling_gib", "ceiling_ram_fraction"), ("ceiling_ram_fraction", "ceiling_gib")):
            if kind in memory:
                base_memory.pop(other, None)
    return _merge(base, data)


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (`"cpu"`, `"jetson-orin-nano"`, ...) or a user's TOML file, validated."""
    path = profile_path(name_or_path)
    name = path.stem if path.parent == PROFILE_DIR else str(path)
    return parse_profile(_resolved_document(path), name, str(path))
