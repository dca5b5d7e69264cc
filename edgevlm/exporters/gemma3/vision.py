"""Gemma 3's SigLIP vision tower + multimodal projector as one ONNX graph for one fixed-size image.

transformers runs the whole SigLIP tower (no CLS token, learned position embeddings of the fixed grid, a final
LayerNorm, no pooling head), then `Gemma3MultiModalProjector`: the (grid x grid) patch features average-pooled
k x k into `mm_tokens_per_image` tokens (k = grid / sqrt(mm_tokens_per_image): 64 / 16 = 4 for 896 px and patch
14), the soft-embedding RMS norm (weight + 1) and a projection to the language model's width. `Gemma3VisionForExport`
reuses those submodules and weights; patches come row-major (`FixedResize`), so the pooling is a reshape + mean
over the graph's own grid. The graph takes `pixel_patches` only (manifest `patch_positions` = "none").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from edgevlm.errors import UnsupportedModelError
from edgevlm.exporters.fixed_vit import (
    embed_patches,
    export_fixed_vision,
    pixel_values_from_patches,
    run_encoder_layers,
)

logger = logging.getLogger(__name__)


def pooling(vision, mm_tokens_per_image: int) -> tuple[int, int]:
    """(patches per side, pooling kernel) of a SigLIP config and Gemma 3's tokens per image; refuses layouts the
    pooled grid does not tile."""
    grid = vision.image_size // vision.patch_size
    side = round(mm_tokens_per_image**0.5)
    if vision.image_size % vision.patch_size or side * side != mm_tokens_per_image or grid % side:
        raise UnsupportedModelError(
            f"image_size {vision.image_size}, patch_size {vision.patch_size} and mm_tokens_per_image "
            f"{mm_tokens_per_image}: edgevlm exports a square patch grid average-pooled to a square token grid"
        )
    if getattr(vision, "vision_use_head", False):
        logger.info("the SigLIP pooling head is not part of Gemma 3's image features; it is left out")
    return grid, grid // side


class Gemma3VisionForExport(nn.Module):
    """`pixel_patches` (n_patches, 3*P*P) -> `image_embeds` (mm_tokens_per_image, text hidden) for ONE image.

    Holds (does not copy) the Hugging Face `SiglipVisionModel` and `Gemma3MultiModalProjector`.
    """

    def __init__(self, tower: nn.Module, projector: nn.Module, grid: int, kernel: int, *, fused_attention: bool = False):  # fmt: skip
        """`fused_attention`: attention as onnxruntime's `com.microsoft.MultiHeadAttention` (one kernel) instead of
        standard ONNX ops; onnxruntime-only, so only the CPU int8 variant uses it."""
        super().__init__()
        self.tower, self.projector, self.grid, self.kernel = (
            getattr(tower, "vision_model", tower),
            projector,
            grid,
            kernel,
        )
        self.fused_attention = fused_attention

    def forward(self, pixel_patches: torch.Tensor) -> torch.Tensor:
        embeddings = self.tower.embeddings
        hidden = embed_patches(pixel_patches, embeddings.patch_embedding) + embeddings.position_embedding.weight[None]
        hidden = run_encoder_layers(hidden, self.tower.encoder.layers, fused_attention=self.fused_attention)
        hidden = self.tower.post_layernorm(hidden)[0]  # (grid * grid, d), row-major
        side, kernel, width = self.grid // self.kernel, self.kernel, hidden.shape[-1]
        pooled = hidden.reshape(side, kernel, side, kernel, width).mean(dim=(1, 3)).reshape(side * side, width)
        return self.projector.mm_soft_emb_norm(pooled) @ self.projector.mm_input_projection_weight


class _HFVisionReference:
    """transformers' own `get_image_features` on the graph's input: what the language model receives."""

    def __init__(self, hf_model: nn.Module):
        self.hf_model = hf_model

    def __call__(self, pixel_patches: torch.Tensor) -> torch.Tensor:
        vision = self.hf_model.config.vision_config
        pixel_values = pixel_values_from_patches(pixel_patches, vision.image_size, vision.patch_size)
        return self.hf_model.model.get_image_features(pixel_values).pooler_output[0]


def export_gemma3_vision(
    hf_model: nn.Module,
    out_dir: str | Path,
    *,
    dtypes: Sequence[str] = ("fp32",),
    progress: Callable[[str], None] | None = None,
    release_torch: Callable[[], None] | None = None,
) -> dict:
    """Write `vision.onnx` (and `vision-int8.onnx` / `vision-fp16.onnx` when in `dtypes`) of a
    `Gemma3ForConditionalGeneration` to `out_dir`, validated as `fixed_vit.export_fixed_vision` does it: fp32 against
    transformers' `get_image_features` on random images. Returns the manifest entry per dtype."""
    grid, kernel = pooling(hf_model.config.vision_config, hf_model.config.mm_tokens_per_image)
    tower, projector = hf_model.model.vision_tower, hf_model.model.multi_modal_projector
    return export_fixed_vision(
        hf_model, lambda fused: Gemma3VisionForExport(tower, projector, grid, kernel, fused_attention=fused).eval(),
        _HFVisionReference(hf_model), out_dir, dtypes, progress=progress, release_torch=release_torch,
    )  # fmt: skip


__all__ = ["Gemma3VisionForExport", "export_gemma3_vision", "pooling"]
