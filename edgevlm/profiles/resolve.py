"""One function turns (profile, bundle, the user's explicit arguments, this machine) into concrete settings.

Explicit arguments always beat the profile. What the profile asks for and the machine lacks (an onnxruntime
provider, llama.cpp GPU offload, a vision precision the bundle does not have) falls back with one warning, or
raises `ProfileError` under `strict = true`. When the estimated memory (`memory.py`) is above the profile's
ceiling, the profile's own n_ctx and max_image_tokens are halved (the larger cost first) until it fits, or the load
is refused with the numbers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..budget import BudgetLimits
from ..bundle import Bundle
from ..contract.graph import PATCH_POSITIONS
from ..contract.kinds.tiling import Preprocessing, TiledPreprocessing
from ..errors import ProfileError
from ..planner import Planner
from .host import GIB, HostInfo, choose_profile, probe_host
from .memory import MemoryEstimate, estimate_memory, kv_values_per_token
from .schema import AUTO, PHYSICAL, PROVIDER_NAMES, Profile, load_profile

logger = logging.getLogger(__name__)

PROFILE_ENV = "EDGEVLM_PROFILE"  # pins what `auto` means on this machine (a deployment, a test run)
MIN_SHRUNK_CTX = 1024  # shrinking to fit a memory ceiling stops here
ProviderSpec = tuple[str, dict[str, str]]  # what onnxruntime's `providers=` takes


@dataclass(frozen=True)
class Overrides:
    """The user's explicit settings (`edgevlm.load` keywords, CLI flags): each beats the profile; None leaves it."""

    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    vision_dtype: str | None = None
    providers: tuple | None = None  # onnxruntime provider names or (name, options) pairs, used as given
    limits: BudgetLimits = field(default_factory=BudgetLimits)  # the "cli" layer of token limits


@dataclass(frozen=True)
class LlamaSettings:
    """llama.cpp parameters a hardware profile or a user sets: what `runtimes.llm.LlamaLM` loads a GGUF with."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int | None = None  # None: all physical cores llama.cpp sees as useful
    n_threads_batch: int | None = None
    n_gpu_layers: int = 0
    flash_attn: bool | None = None  # None: llama.cpp decides
    kv_cache_type: str = "f16"  # type of the K and V cache: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl
    # map the GGUF instead of reading it. None: mapped, except where llama.cpp repacks weights (`repack_weights`): the
    # mapped pages a repacked tensor was read from stay resident beside its copy (0.57 GiB more for a 2B Q4_K_M with
    # llama.cpp's AVX2 kernels, benchmarks/bench_repack_rss.py), and reading the file leaves only the copy
    mmap: bool | None = None
    mlock: bool = False  # keep the weights in RAM (needs the memlock ulimit)
    # llama.cpp's extra CPU buffer types (repacked weights for the CPU's SIMD, AMX tiles). None: on, except on CPUs
    # with AMX: built by GCC 12, llama.cpp's AMX kernels segfault on multi-token batches; built with -fno-dse, they
    # run but compute wrong results once onnxruntime's int8 kernels (AMX too) have run (docs/limits.md).
    repack_weights: bool | None = None
    # Each request decodes with n_threads minus the tasks of other processes running when it starts (at least 1):
    # llama.cpp's threads wait for each other at every step, so one of them waiting for a busy core stalls all.
    adapt_threads: bool = False


@dataclass(frozen=True)
class RuntimeSettings:
    """Everything a bundle is loaded with, and where it came from."""

    profile: Profile
    reason: str  # why this profile
    providers: tuple[ProviderSpec, ...]
    vision_dtype: str | None  # None only without a bundle when the profile leaves it to the bundle
    intra_op_threads: int
    allow_spinning: bool
    llama: LlamaSettings
    limits: BudgetLimits  # the profile layer of token limits (after any shrinking)
    vision_gflops: float | None
    ceiling_bytes: int | None
    memory: MemoryEstimate | None  # with a bundle and a ceiling
    notes: tuple[str, ...] = ()  # fallbacks and adjustments, each also logged as a warning


def auto_profile(host_info: HostInfo | None = None) -> tuple[str, str]:
    """What `auto` means here: $EDGEVLM_PROFILE (a name or a path) when set, else the detected profile; and why."""
    pinned = os.environ.get(PROFILE_ENV, "").strip()
    if pinned and pinned != AUTO:
        return pinned, f"{PROFILE_ENV}={pinned}"
    return choose_profile(host_info or probe_host())


def select_profile(profile: str | os.PathLike | Profile, host_info: HostInfo | None) -> tuple[Profile, str]:
    """The profile object for a name, path, `auto` or `Profile`, and why it was chosen."""
    if isinstance(profile, Profile):
        return profile, "given"
    if str(profile) == AUTO:
        name, why = auto_profile(host_info)
        return load_profile(name), f"auto: {why}"
    return load_profile(profile), "asked for"


def _threads(value: int | str, host: HostInfo) -> int:
    """A profile's thread count: physical cores, or its number capped at the CPUs this process has (no oversubscription)."""  # fmt: skip
    return host.physical_cores if value == PHYSICAL else min(int(value), host.logical_cpus)


def _flag(value: bool) -> str:
    return "True" if value else "False"


def _patch_shapes(patches: int, patch_dim: int, with_positions: bool) -> str:
    return f"pixel_patches:{patches}x{patch_dim}" + (f",patch_positions:{patches}x2" if with_positions else "")


def provider_options(profile: Profile, provider: str, token_range: tuple[int, int] | None, patch_dim: int | None,
                     merge_size: int | None, with_positions: bool = True) -> dict[str, str]:  # fmt: skip
    """onnxruntime options of one provider ("tensorrt", "cuda", "cpu"); TensorRT's shape profile needs the bundle's
    patch geometry and the image-token range (without them its shapes are left to TensorRT)."""
    vision = profile.vision
    if provider == "tensorrt":
        from .schema import TensorRTOptions

        trt = vision.tensorrt or TensorRTOptions()
        cache = str(Path(trt.cache_dir).expanduser())
        options = {
            "device_id": str(trt.device_id), "trt_fp16_enable": _flag(trt.fp16),
            "trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache,
        }  # fmt: skip
        if token_range is not None and patch_dim is not None and merge_size is not None:
            low, high = token_range
            opt = min(max(trt.opt_image_tokens or high, low), high)
            per_token = merge_size**2
            options["trt_profile_min_shapes"] = _patch_shapes(low * per_token, patch_dim, with_positions)
            options["trt_profile_opt_shapes"] = _patch_shapes(opt * per_token, patch_dim, with_positions)
            options["trt_profile_max_shapes"] = _patch_shapes(high * per_token, patch_dim, with_positions)
        return options
    if provider == "cuda":
        from .schema import CUDAOptions

        cuda = vision.cuda or CUDAOptions()
        options = {"device_id": str(cuda.device_id), "arena_extend_strategy": cuda.arena_extend_strategy,
                   "cudnn_conv_algo_search": cuda.conv_algo_search}  # fmt: skip
        if cuda.gpu_mem_limit_gib is not None:
            options["gpu_mem_limit"] = str(int(cuda.gpu_mem_limit_gib * GIB))
        return options
    return {}  # CPU: threads and spinning are session options


class _Notes:
    """Collects fallbacks (errors under strict) and adjustments; each is logged once as a warning."""

    def __init__(self, profile: Profile):
        self.profile, self.items = profile, []

    def fallback(self, message: str) -> None:
        if self.profile.strict:
            raise ProfileError(f"{message} (profile {self.profile.name!r} is strict: fix the machine or set strict = false)")  # fmt: skip
        self.adjust(message)

    def adjust(self, message: str) -> None:
        logger.warning("%s", message)
        self.items.append(message)


def _available_providers(profile: Profile, host: HostInfo, notes: _Notes) -> list[str]:
    """The profile's providers (short names) this onnxruntime has, CPU last."""
    wanted = [*profile.vision.providers, *(["cpu"] if "cpu" not in profile.vision.providers else [])]
    missing = [p for p in wanted if PROVIDER_NAMES[p] not in host.onnxruntime_providers and p != "cpu"]
    kept = [p for p in wanted if p not in missing]
    if missing:
        notes.fallback(
            f"profile {profile.name!r} asks for {', '.join(PROVIDER_NAMES[p] for p in missing)}, which this onnxruntime "
            f"lacks (it has {', '.join(host.onnxruntime_providers)}): the vision graph runs on {', '.join(PROVIDER_NAMES[p] for p in kept)}. "
            "For a GPU install onnxruntime-gpu (Jetson: the JetPack wheel; see docs/profiles.md)."
        )  # fmt: skip
    return kept


def _vision_dtype(profile: Profile, bundle: Bundle | None, on_gpu: bool, notes: _Notes) -> str | None:
    preference = list(profile.vision.precision)
    if not on_gpu and "fp16" in preference[:-1]:  # onnxruntime's CPU kernels run fp16 graphs slowly
        preference = [p for p in preference if p != "fp16"] + ["fp16"]
    if bundle is None:
        return preference[0] if preference else None
    variants = bundle.manifest.vision.variants
    chosen = next((p for p in preference if p in variants), None)
    if chosen is None:
        chosen = bundle.manifest.vision.default
        if preference:
            notes.fallback(f"profile {profile.name!r} loads a {' or '.join(preference)} vision graph, but the bundle has "
                           f"only {', '.join(sorted(variants))}: using {chosen}. Export with --profile {profile.name} for its precision.")  # fmt: skip
    return chosen


def _ceiling(profile: Profile, host: HostInfo) -> tuple[int | None, str]:
    memory = profile.memory
    if memory.ceiling_gib is not None:
        return int(memory.ceiling_gib * GIB), f"{memory.ceiling_gib:g} GiB"
    if memory.ceiling_ram_fraction is not None and host.ram_bytes:
        ceiling = int(memory.ceiling_ram_fraction * host.ram_bytes)
        return ceiling, f"{memory.ceiling_ram_fraction:.0%} of {host.ram_bytes / GIB:.1f} GiB RAM"
    return None, "none"


def _token_range(bundle: Bundle | None, overrides: Overrides, profile_limits: BudgetLimits) -> tuple[int, int] | None:
    """The fewest and most tokens an image span may get at load time (request limits can still change them)."""
    return None if bundle is None else Planner.for_bundle(bundle.manifest, overrides.limits, profile_limits).token_range()  # fmt: skip


def resolve_settings(
    profile: str | os.PathLike | Profile = AUTO,
    bundle: Bundle | None = None,
    overrides: Overrides = Overrides(),
    host: HostInfo | None = None,
) -> RuntimeSettings:
    """Concrete settings for loading `bundle` (None: what the profile itself says, for `edgevlm profiles show`)."""
    host = host or probe_host()
    profile, reason = select_profile(profile, host)
    notes = _Notes(profile)
    spec = bundle.manifest.preprocessing if bundle is not None else None
    limits = profile.budget
    token_range = _token_range(bundle, overrides, limits)

    if overrides.providers is not None:
        names = [p if isinstance(p, str) else p[0] for p in overrides.providers]
        on_gpu = any(name != PROVIDER_NAMES["cpu"] for name in names)
    else:
        kept = _available_providers(profile, host, notes)
        on_gpu = kept != ["cpu"]
    vision_dtype = overrides.vision_dtype or _vision_dtype(profile, bundle, on_gpu, notes)

    llm = profile.llm
    n_gpu_layers = overrides.n_gpu_layers
    if n_gpu_layers is None:
        n_gpu_layers = llm.n_gpu_layers
        if n_gpu_layers != 0 and not host.llama_gpu_offload:
            notes.fallback(f"profile {profile.name!r} offloads LLM layers to a GPU, but this llama-cpp-python was built "
                           "without GPU support: all layers run on the CPU. Reinstall it with CUDA (see docs/profiles.md).")  # fmt: skip
            n_gpu_layers = 0
    n_ctx = overrides.n_ctx or llm.n_ctx
    if bundle is not None and n_ctx > bundle.manifest.llm.n_ctx_train:
        n_ctx_train = bundle.manifest.llm.n_ctx_train
        if overrides.n_ctx:  # the profile's context is a ceiling, clamped quietly; a number asked for is not
            notes.adjust(f"n_ctx={overrides.n_ctx} is more than this model was trained for: using its n_ctx_train, "
                         f"{n_ctx_train}")  # fmt: skip
        n_ctx = n_ctx_train
    threads = overrides.n_threads
    if threads is not None and threads > host.logical_cpus:
        notes.adjust(f"n_threads={threads} is more than the {host.logical_cpus} CPUs this process may use: the threads "
                     "will take turns on them, which is slower than one thread per core; used as asked")  # fmt: skip
    llama = LlamaSettings(
        n_ctx=n_ctx, n_batch=llm.n_batch, n_ubatch=llm.n_ubatch,
        n_threads=threads or _threads(llm.n_threads, host), n_threads_batch=threads or _threads(llm.n_threads_batch, host),
        n_gpu_layers=n_gpu_layers, flash_attn=None if llm.flash_attn == "auto" else llm.flash_attn,
        kv_cache_type=llm.kv_cache_type, mmap=llm.mmap, mlock=llm.mlock,
        adapt_threads=llm.adapt_threads and threads is None,  # a thread count asked for is used as asked
    )  # fmt: skip
    llama = _whole_image_batches(llama, bundle, token_range, notes)

    ceiling, ceiling_text = _ceiling(profile, host)
    memory = None
    if bundle is not None and ceiling is not None and vision_dtype in bundle.manifest.vision.variants:
        llama, limits, memory = _fit_memory(profile, bundle, vision_dtype, llama, limits, token_range, overrides,
                                            ceiling, ceiling_text, notes)  # fmt: skip
        token_range = _token_range(bundle, overrides, limits)  # TensorRT's shapes follow a shrink
    if overrides.providers is not None:
        providers = tuple(overrides.providers)
    else:
        with_positions = bundle is None or PATCH_POSITIONS in bundle.manifest.vision.patch_positions.graph_inputs
        geometry = (_view_token_range(spec, token_range), spec.patch_dim, spec.merge_size, with_positions) if spec else (None, None, None, True)  # fmt: skip
        providers = tuple((PROVIDER_NAMES[p], provider_options(profile, p, *geometry)) for p in kept)
    return RuntimeSettings(
        profile=profile, reason=reason, providers=providers, vision_dtype=vision_dtype,
        intra_op_threads=threads or _threads(profile.vision.intra_op_threads, host),
        allow_spinning=profile.vision.allow_spinning, llama=llama, limits=limits,
        vision_gflops=profile.vision.gflops, ceiling_bytes=ceiling, memory=memory, notes=tuple(notes.items),
    )  # fmt: skip


def _view_token_range(spec: Preprocessing, token_range: tuple[int, int] | None) -> tuple[int, int] | None:
    """The token range of one graph call: an image span's, or for a tiling model one view's (one tile-size crop up to
    the most crops a view holds), whatever the image's grid."""
    if not isinstance(spec, TiledPreprocessing):
        return token_range
    crop_tokens = spec.crop_patches // spec.merge_size**2
    return crop_tokens, crop_tokens * spec.max_crops_per_view


def _whole_image_batches(llama: LlamaSettings, bundle: Bundle | None, token_range: tuple[int, int] | None,
                         notes: _Notes) -> LlamaSettings:  # fmt: skip
    """A bundle whose image tokens attend to each other (`llm.image_attention`) decodes each image in one batch:
    n_batch and n_ubatch are raised to its largest image when the profile's are smaller."""
    if bundle is None or token_range is None or bundle.manifest.llm.image_attention != "bidirectional":
        return llama
    needed = token_range[1]
    if llama.n_batch >= needed and llama.n_ubatch >= needed:
        return llama
    notes.adjust(f"this model decodes each image's {needed} tokens in one batch: n_batch {llama.n_batch} -> "
                 f"{max(llama.n_batch, needed)}, n_ubatch {llama.n_ubatch} -> {max(llama.n_ubatch, needed)}")  # fmt: skip
    return replace(llama, n_batch=max(llama.n_batch, needed), n_ubatch=max(llama.n_ubatch, needed))


def _fit_memory(profile: Profile, bundle: Bundle, vision_dtype: str, llama: LlamaSettings, limits: BudgetLimits,
                token_range: tuple[int, int], overrides: Overrides, ceiling: int, ceiling_text: str,
                notes: _Notes) -> tuple[LlamaSettings, BudgetLimits, MemoryEstimate]:  # fmt: skip
    """Shrink the profile's n_ctx / max_image_tokens until the estimate fits under the ceiling, or refuse."""
    manifest = bundle.manifest
    values_per_token = kv_values_per_token(bundle.file(manifest.llm.file), manifest.llm.arch)
    low_tokens, max_tokens = token_range

    def estimate(n_ctx: int, tokens: int) -> MemoryEstimate:
        return estimate_memory(bundle, vision_dtype, n_ctx, llama.kv_cache_type, tokens, values_per_token)

    n_ctx, tokens = llama.n_ctx, max_tokens
    current = estimate(n_ctx, tokens)
    if current.total_bytes <= ceiling:
        return llama, limits, current
    over = (f"the estimated memory ({current.describe()}) is above profile {profile.name!r}'s ceiling of "
            f"{ceiling / GIB:.2f} GiB ({ceiling_text})")  # fmt: skip
    if profile.memory.on_exceed == "refuse":
        raise ProfileError(f"{over}; lower n_ctx or max_image_tokens, use a smaller quantization or vision precision, "
                           "or raise the ceiling in a profile of your own.")  # fmt: skip
    can_shrink_ctx = overrides.n_ctx is None
    # a tiling model's activations follow one view, whatever its token limit: only the context can shrink
    can_shrink_tokens = overrides.limits.max_image_tokens is None and not isinstance(manifest.preprocessing, TiledPreprocessing)  # fmt: skip
    while current.total_bytes > ceiling:
        shrink_ctx = can_shrink_ctx and n_ctx > MIN_SHRUNK_CTX
        shrink_tokens = can_shrink_tokens and tokens > low_tokens
        if shrink_ctx and shrink_tokens:  # halve the larger cost first
            shrink_ctx = current.kv_cache_bytes >= (current.vision_activation_bytes or 0)
            shrink_tokens = not shrink_ctx
        if shrink_ctx:
            n_ctx = max(MIN_SHRUNK_CTX, n_ctx // 2)
        elif shrink_tokens:
            tokens = max(low_tokens, tokens // 2)
        else:
            fixed = [name for name, given in (("n_ctx", not can_shrink_ctx), ("max_image_tokens", overrides.limits.max_image_tokens is not None)) if given]  # fmt: skip
            raise ProfileError(
                f"{over}, and even n_ctx={n_ctx}, max_image_tokens={tokens}"
                f"{' (given explicitly: ' + ', '.join(fixed) + ')' if fixed else ''} need {current.total_bytes / GIB:.2f} GiB. "
                "Use a smaller LLM quantization (--int4) or vision precision (int8), fewer image tokens or a smaller "
                "context, or raise the ceiling in a profile of your own."
            )  # fmt: skip
        current = estimate(n_ctx, tokens)
    changes = [f"{name} {old} -> {new}" for name, old, new in (("n_ctx", llama.n_ctx, n_ctx), ("max_image_tokens", max_tokens, tokens)) if old != new]  # fmt: skip
    notes.adjust(f"{over}: shrank {' and '.join(changes)} to fit; estimate now {current.total_bytes / GIB:.2f} GiB")
    if tokens != max_tokens:
        limits = replace(limits, max_image_tokens=tokens)  # >= every min_image_tokens in force: it stopped there
    return replace(llama, n_ctx=n_ctx), limits, current
