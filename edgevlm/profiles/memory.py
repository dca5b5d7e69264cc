"""The memory a loaded bundle needs, estimated before anything loads.

estimate = GGUF file size (llama.cpp holds every weight, on the CPU or the GPU)
         + the vision graph's files (onnx + .data)
         + KV cache: n_ctx (rounded up to 256, as llama.cpp does) x sum over layers of n_head_kv x (key + value
           length) x bytes per value of the cache type (from the GGUF header)
         + the vision graph's working memory for one image of max_image_tokens (`budget.estimate_activation_bytes`,
           when the manifest records the tower's sizes).
Not counted: llama.cpp's compute buffers (tens to hundreds of MiB), onnxruntime's arena overhead, Python itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..budget import estimate_activation_bytes, vision_tower_size
from ..bundle import Bundle
from ..contract.kinds.tiling import TiledPreprocessing
from ..errors import BundleError
from ..gguf_header import read_gguf_header
from .schema import KV_CACHE_BYTES_PER_VALUE

GIB = 2**30


def kv_values_per_token(gguf_path: str | Path, arch: str) -> int:
    """K and V values one token adds to the cache, summed over layers (per-layer head counts allowed)."""
    names = ("block_count", "attention.head_count_kv", "attention.head_count", "embedding_length",
             "attention.key_length", "attention.value_length")  # fmt: skip
    try:
        header = read_gguf_header(gguf_path, keys={f"{arch}.{name}" for name in names}, tensors=False).metadata
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read the GGUF header of {gguf_path} ({e}); run `edgevlm verify BUNDLE`.") from e
    meta = {name: header[f"{arch}.{name}"] for name in names if f"{arch}.{name}" in header}
    missing = [name for name in ("block_count", "attention.head_count", "embedding_length") if name not in meta]
    if missing:
        raise BundleError(f"{gguf_path} has no {', '.join(f'{arch}.{m}' for m in missing)} in its header; "
                          "cannot estimate its KV cache. Re-export the bundle.")  # fmt: skip
    n_layer = int(meta["block_count"])

    def per_layer(value) -> list[int]:
        return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layer

    heads = per_layer(meta["attention.head_count"])
    kv_heads = per_layer(meta.get("attention.head_count_kv", meta["attention.head_count"]))
    head_dim = int(meta["embedding_length"]) // max(heads)
    key_length = int(meta.get("attention.key_length", head_dim))
    value_length = int(meta.get("attention.value_length", head_dim))
    return sum(n * (key_length + value_length) for n in kv_heads)


def kv_cache_bytes(values_per_token: int, n_ctx: int, kv_cache_type: str) -> int:
    """Bytes of a KV cache of `n_ctx` tokens (llama.cpp rounds the context up to a multiple of 256)."""
    n_cells = -(-n_ctx // 256) * 256
    return int(n_cells * values_per_token * KV_CACHE_BYTES_PER_VALUE[kv_cache_type])


@dataclass(frozen=True)
class MemoryEstimate:
    """What loading a bundle with given settings is estimated to take (see the module docstring)."""

    llm_file: str
    llm_file_bytes: int
    vision_file: str
    vision_file_bytes: int
    n_ctx: int
    kv_cache_type: str
    kv_cache_bytes: int
    max_image_tokens: int | None
    vision_activation_bytes: int | None  # None: the manifest does not record the tower's sizes

    @property
    def total_bytes(self) -> int:
        return self.llm_file_bytes + self.vision_file_bytes + self.kv_cache_bytes + (self.vision_activation_bytes or 0)

    def describe(self) -> str:
        parts = [
            f"{self.llm_file} {self.llm_file_bytes / GIB:.2f}",
            f"{self.vision_file} {self.vision_file_bytes / GIB:.2f}",
            f"KV cache {self.n_ctx} x {self.kv_cache_type} {self.kv_cache_bytes / GIB:.2f}",
        ]
        if self.vision_activation_bytes is not None:
            parts.append(f"vision activations at {self.max_image_tokens} tokens {self.vision_activation_bytes / GIB:.2f}")  # fmt: skip
        text = " + ".join(parts) + f" = {self.total_bytes / GIB:.2f} GiB"
        return text if self.vision_activation_bytes is not None else text + " (vision activations not estimated: re-export the bundle)"  # fmt: skip


def estimate_memory(
    bundle: Bundle, vision_dtype: str, n_ctx: int, kv_cache_type: str, max_image_tokens: int | None,
    values_per_token: int | None = None,
) -> MemoryEstimate:  # fmt: skip
    """The estimate for these settings; `values_per_token` (from `kv_values_per_token`) saves re-reading the GGUF."""
    manifest = bundle.manifest
    vision_file = manifest.vision.variants[vision_dtype].file
    vision_paths = (bundle.file(vision_file), bundle.file(vision_file + ".data"))
    vision_bytes = sum(path.stat().st_size for path in vision_paths if path.is_file())
    if values_per_token is None:
        values_per_token = kv_values_per_token(bundle.file(manifest.llm.file), manifest.llm.arch)
    tower = vision_tower_size(manifest, vision_dtype)
    activations = None
    spec = manifest.preprocessing
    if isinstance(spec, TiledPreprocessing):  # one view at a time, whatever the grid: the largest view's crops
        max_image_tokens = spec.max_crops_per_view * spec.crop_patches // spec.merge_size**2
        if tower is not None:
            activations = spec.max_crops_per_view * estimate_activation_bytes(spec.crop_patches, tower)
    elif tower is not None and max_image_tokens is not None:
        activations = estimate_activation_bytes(max_image_tokens * tower.merge_size**2, tower)
    return MemoryEstimate(
        llm_file=manifest.llm.file, llm_file_bytes=bundle.file(manifest.llm.file).stat().st_size, vision_file=vision_file,
        vision_file_bytes=vision_bytes, n_ctx=n_ctx, kv_cache_type=kv_cache_type,
        kv_cache_bytes=kv_cache_bytes(values_per_token, n_ctx, kv_cache_type), max_image_tokens=max_image_tokens,
        vision_activation_bytes=activations,
    )  # fmt: skip
