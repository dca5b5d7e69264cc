"""InternVL's InternViT tower + pixel shuffle + MLP projector as one ONNX graph for one fixed-size view (a tile or
the thumbnail).

transformers embeds the patches, puts the CLS token first and adds the learned position embeddings of the fixed
grid, runs pre-norm layers with layer scale (`lambda_1`, `lambda_2`) and optional RMS qk norm over the whole width,
takes the last layer's output (through `layernorm`, an identity with mean pooling), drops the CLS position,
pixel-shuffles the (grid x grid) features by `downsample_ratio` (0.5: 2x2 patches become one token of 4x the width)
and projects them with LayerNorm-Linear-GELU-Linear. `InternVLVisionForExport` reuses those submodules and weights
(the pixel shuffle is `InternVLModel.pixel_shuffle` itself) with the patch Conv2d as a MatMul; the graph takes
`pixel_patches` only (manifest `patch_positions` = "none").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from edgevlm.errors import UnsupportedModelError
from edgevlm.exporters.fixed_vit import (
    attention,
    embed_patches,
    export_fixed_vision,
    pixel_values_from_patches,
    square_side,
)


def merge_size(config) -> int:
    """Patches per token side of an `InternVLConfig` (1 / downsample_ratio); refuses settings the graph does not
    reproduce (a feature layer other than the last, the CLS position kept, a ratio that is not 1/n)."""
    if config.vision_feature_layer != -1:
        raise UnsupportedModelError(f"vision_feature_layer={config.vision_feature_layer!r}: edgevlm exports InternVL's last layer (-1) only")  # fmt: skip
    if config.vision_feature_select_strategy != "default":
        raise UnsupportedModelError(f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: edgevlm exports 'default' (CLS dropped) only")  # fmt: skip
    merge = round(1 / config.downsample_ratio)
    grid = square_side(config.vision_config.image_size) // square_side(config.vision_config.patch_size)
    if abs(merge * config.downsample_ratio - 1) > 1e-9 or grid % merge:
        raise UnsupportedModelError(f"downsample_ratio={config.downsample_ratio}: edgevlm exports a pixel shuffle of 1/n that divides the {grid}-patch grid")  # fmt: skip
    return merge


class InternVLVisionForExport(nn.Module):
    """`pixel_patches` (n_patches, 3*P*P) -> `image_embeds` (n_patches / merge², text hidden) for ONE view.

    Holds (does not copy) the Hugging Face vision tower and projector of an `InternVLModel`, and uses its pixel
    shuffle. A batch
    axis of 1 is kept so every Linear exports as MatMul (which int8 quantization covers), not Gemm.
    """

    def __init__(self, model: nn.Module, *, fused_attention: bool = False):
        """`fused_attention`: attention as onnxruntime's `com.microsoft.MultiHeadAttention` (one kernel) instead of
        standard ONNX ops; onnxruntime-only, so only the CPU int8 variant uses it."""
        super().__init__()
        self.tower, self.projector = model.vision_tower, model.multi_modal_projector
        self.fused_attention = fused_attention
        self.pixel_shuffle = model.pixel_shuffle  # a method (view and permute): the language model is not held
        self.downsample_ratio = model.config.downsample_ratio
        vision = model.config.vision_config
        self.grid = square_side(vision.image_size) // square_side(vision.patch_size)

    def forward(self, pixel_patches: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        embeddings = tower.embeddings
        hidden = embed_patches(pixel_patches, embeddings.patch_embeddings.projection)  # (1, n, d)
        hidden = torch.cat([embeddings.cls_token, hidden], dim=1)
        if embeddings.position_embeddings is not None:
            hidden = hidden + embeddings.position_embeddings  # (1, n + 1, d): the fixed grid, no interpolation
        for layer in tower.encoder.layer:
            attn = layer.attention
            normed = layer.layernorm_before(hidden)
            query, key = attn.q_norm(attn.q_proj(normed)), attn.k_norm(attn.k_proj(normed))
            out = attention(attn, query, key, attn.v_proj(normed), fused_attention=self.fused_attention)
            hidden = hidden + layer.lambda_1 * attn.projection_layer(out)
            hidden = hidden + layer.lambda_2 * layer.mlp(layer.layernorm_after(hidden))
        features = tower.layernorm(hidden)[:, 1:].reshape(1, self.grid, self.grid, -1)  # the CLS position dropped
        features = self.pixel_shuffle(features, scale_factor=self.downsample_ratio)
        return self.projector(features.reshape(1, -1, features.shape[-1]))[0]


class _HFVisionReference:
    """transformers' own `get_image_features` on the graph's input: what the language model receives."""

    def __init__(self, hf_model: nn.Module):
        self.hf_model = hf_model

    def __call__(self, pixel_patches: torch.Tensor) -> torch.Tensor:
        vision = self.hf_model.config.vision_config
        pixel_values = pixel_values_from_patches(pixel_patches, square_side(vision.image_size), square_side(vision.patch_size))  # fmt: skip
        return self.hf_model.model.get_image_features(pixel_values).pooler_output[0]


def export_internvl_vision(
    hf_model: nn.Module,
    out_dir: str | Path,
    *,
    dtypes: Sequence[str] = ("fp32",),
    progress: Callable[[str], None] | None = None,
    release_torch: Callable[[], None] | None = None,
) -> dict:
    """Write `vision.onnx` (and `vision-int8.onnx` / `vision-fp16.onnx` when in `dtypes`) of an
    `InternVLForConditionalGeneration` to `out_dir`, validated as `fixed_vit.export_fixed_vision` does it: fp32
    against transformers' `get_image_features` on random views. Returns the manifest entry per dtype."""
    merge_size(hf_model.config)
    return export_fixed_vision(
        hf_model, lambda fused: InternVLVisionForExport(hf_model.model, fused_attention=fused).eval(),
        _HFVisionReference(hf_model), out_dir, dtypes, progress=progress, release_torch=release_torch,
    )  # fmt: skip


__all__ = ["InternVLVisionForExport", "export_internvl_vision", "merge_size"]
