"""What the fixed-size vision towers (LLaVA's CLIP, Gemma 3's SigLIP, InternVL's InternViT) share in their ONNX
export forwards.

They take one image's `pixel_patches` (n_patches, 3*P*P), row-major as `FixedResize` lays them out, embed them with a
MatMul (the patch Conv2d's kernel is one whole patch; int8 quantization covers a MatMul) and run pre-norm encoder
layers over a batch axis of 1, so every Linear exports as MatMul, not Gemm: CLIP's and SigLIP's of the same shape
(`run_encoder_layers`), InternViT's its own way around the same `attention`. All are exported and validated the same
way (`export_fixed_vision`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.contract.graph import IMAGE_EMBEDS, PIXEL_PATCHES
from edgevlm.exporters.onnx_export import OnnxExportSpec, check_vision_dtypes, export_vision_variants

VISION_EXPORT_SPEC = OnnxExportSpec(
    input_names=(PIXEL_PATCHES,), output_names=(IMAGE_EMBEDS,), dynamic_axes={}, opset=18, atol=1e-4
)
N_VALIDATION_SETS = 3  # random images the fp32 graph is checked on (one size: the graph takes one)


def embed_patches(pixel_patches: torch.Tensor, patch_embedding: nn.Conv2d) -> torch.Tensor:
    """(n_patches, 3*P*P) -> (1, n_patches, d): the patch Conv2d as a MatMul on the flat patches."""
    hidden = (pixel_patches @ patch_embedding.weight.reshape(patch_embedding.out_channels, -1).T)[None]
    return hidden + patch_embedding.bias if patch_embedding.bias is not None else hidden


def run_encoder_layers(hidden: torch.Tensor, layers: Iterable[nn.Module], *, fused_attention: bool) -> torch.Tensor:
    """CLIP/SigLIP encoder layers on (images, N, d); `fused_attention`: onnxruntime's `com.microsoft.MultiHeadAttention`
    (one kernel, onnxruntime only) instead of standard ONNX ops."""
    for layer in layers:
        attn = layer.self_attn
        normed = layer.layer_norm1(hidden)
        query, key, value = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)  # each (1, N, d)
        out = attention(attn, query, key, value, fused_attention=fused_attention)
        hidden = hidden + attn.out_proj(out)
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return hidden


def attention(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, fused_attention: bool) -> torch.Tensor:  # fmt: skip
    """Multi-head attention of projected (1, N, d) queries, keys and values (`attn` gives num_heads, head_dim and
    scale) -> (1, N, d); `fused_attention` as in `run_encoder_layers`."""
    return _fused_attention(attn, query, key, value) if fused_attention else _attention(attn, query, key, value)


def _attention(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    batch, n = query.shape[:2]  # images attend within themselves
    heads = [x.reshape(batch, n, attn.num_heads, attn.head_dim).transpose(1, 2) for x in (query, key, value)]
    out = F.scaled_dot_product_attention(*heads, scale=attn.scale)
    return out.transpose(1, 2).reshape(batch, n, attn.num_heads * attn.head_dim)


def _fused_attention(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.onnx.ops.symbolic(
        "com.microsoft::MultiHeadAttention", [query, key, value],
        attrs={"num_heads": attn.num_heads, "scale": float(attn.scale)}, dtype=query.dtype, shape=query.shape,
        version=1,
    )  # fmt: skip


def pixel_values_from_patches(pixel_patches: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """The graph's input back as transformers' `pixel_values` (1, 3, H, W) of one square image."""
    grid = image_size // patch_size
    return pixel_patches.reshape(grid, grid, 3, patch_size, patch_size).permute(2, 0, 3, 1, 4).reshape(1, 3, image_size, image_size)  # fmt: skip


def require_float32(*modules: nn.Module) -> None:
    """Refuse modules whose weights are not float32: the graph is exported, and validated, in float32."""
    for module in modules:
        dtype = next(module.parameters()).dtype
        if dtype != torch.float32:
            raise ValueError(f"{type(module).__name__} has {dtype} weights; export needs float32")


def square_side(size: int | Sequence[int]) -> int:
    """A config's image or patch size, an int or a square (height, width) as InternViT's config keeps it."""
    if isinstance(size, int):
        return size
    height, width = size
    if height != width:
        raise ValueError(f"size {tuple(size)}: the fixed-size vision graphs take squares only")
    return int(height)


def sample_patches(image_size: int, patch_size: int, seed: int) -> tuple[torch.Tensor]:
    """Random normalized pixel patches of one image, as the graph's input."""
    n_patches = (image_size // patch_size) ** 2
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n_patches, 3 * patch_size**2, generator=generator),)


def export_fixed_vision(
    hf_model: nn.Module,
    make_module: Callable[[bool], nn.Module],
    reference: Callable[[torch.Tensor], torch.Tensor],
    out_dir: str | Path,
    dtypes: Sequence[str],
    *,
    progress: Callable[[str], None] | None = None,
    release_torch: Callable[[], None] | None = None,
    parts: tuple[nn.Module, nn.Module] | None = None,
) -> dict:
    """Write `vision.onnx` (and `vision-int8.onnx` / `vision-fp16.onnx` when in `dtypes`) of a fixed-size tower
    (`hf_model.model.vision_tower` + `multi_modal_projector`, or the (tower, projector) `parts` of a model that
    names them otherwise; float32) to `out_dir`: `make_module(fused_attention)` is the export forward, validated as
    `onnx_export.export_vision_variants` does it, fp32 against `reference` (transformers' own features) on random
    images. Returns the manifest entry per dtype."""
    check_vision_dtypes(dtypes)
    tower, projector = parts or (hf_model.model.vision_tower, hf_model.model.multi_modal_projector)
    require_float32(tower, projector)
    image_size, patch_size = square_side(tower.config.image_size), square_side(tower.config.patch_size)
    input_sets = [sample_patches(image_size, patch_size, seed) for seed in range(N_VALIDATION_SETS)]
    return export_vision_variants(
        make_module, VISION_EXPORT_SPEC, reference, input_sets, out_dir, dtypes,
        fp32_report={"images": N_VALIDATION_SETS}, progress=progress, release_torch=release_torch,
    )  # fmt: skip
