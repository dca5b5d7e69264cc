"""SmolVLM2's / Idefics3's SigLIP tower + connector as one ONNX graph for one tile (or global view).

transformers runs the tower on each `image_size` view (patch embedding, learned position embeddings at positions it
buckets from the patch mask: for a full view a fixed table, computed here once exactly as transformers does), the
encoder layers and a final LayerNorm, then the connector: a pixel shuffle folding `scale_factor` x `scale_factor`
neighbouring patches into one token and a bias-free projection to the language model's width.
`SmolVLMVisionForExport` reuses those submodules and weights; the graph takes `pixel_patches` only (row-major, as
`tiles-idefics3` lays them out; manifest `patch_positions` = "none").
"""

from __future__ import annotations

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


def full_view_position_ids(n_per_side: int) -> torch.Tensor:
    """The position ids transformers' `SmolVLMVisionEmbeddings` gives a view with no padding, by its own float32
    bucketing (so any rounding there is reproduced)."""
    boundaries = torch.arange(1 / n_per_side, 1.0, 1 / n_per_side)
    step = 1.0 / torch.tensor([n_per_side])
    coords = torch.clamp(torch.arange(n_per_side, dtype=torch.float32)[None] * step[:, None], max=1.0 - 1e-6)
    buckets = torch.bucketize(coords, boundaries, right=True)[0]
    return (buckets[:, None] * n_per_side + buckets[None, :]).reshape(-1)


def check_connector(config) -> int:
    """Patches per view side; refuses views the pixel shuffle does not tile."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if vision.image_size % vision.patch_size or side % config.scale_factor:
        raise UnsupportedModelError(f"image_size {vision.image_size}, patch_size {vision.patch_size}, scale_factor {config.scale_factor}: edgevlm exports a square patch grid the pixel shuffle tiles")  # fmt: skip
    return side


class SmolVLMVisionForExport(nn.Module):
    """`pixel_patches` (n_patches, 3*P*P) -> `image_embeds` (n_patches / scale², text hidden) for ONE view.

    Holds (does not copy) the Hugging Face `SmolVLMVisionTransformer` and `SmolVLMConnector`.
    """

    def __init__(self, tower: nn.Module, connector: nn.Module, side: int, *, fused_attention: bool = False):
        """`fused_attention`: attention as onnxruntime's `com.microsoft.MultiHeadAttention` (one kernel) instead of
        standard ONNX ops; onnxruntime-only, so only the CPU int8 variant uses it."""
        super().__init__()
        self.tower, self.connector, self.side = tower, connector, side
        self.register_buffer("position_ids", full_view_position_ids(side), persistent=False)
        self.fused_attention = fused_attention

    def forward(self, pixel_patches: torch.Tensor) -> torch.Tensor:
        embeddings = self.tower.embeddings
        hidden = embed_patches(pixel_patches, embeddings.patch_embedding)
        hidden = hidden + embeddings.position_embedding.weight[self.position_ids][None]
        hidden = run_encoder_layers(hidden, self.tower.encoder.layers, fused_attention=self.fused_attention)
        hidden = self.tower.post_layernorm(hidden)[0]  # (side * side, d), row-major
        return self.connector.modality_projection(self._pixel_shuffle(hidden))

    def _pixel_shuffle(self, hidden: torch.Tensor) -> torch.Tensor:
        """transformers' `SmolVLMConnector.pixel_shuffle` with the view's sizes as constants: token (i, j) is the
        scale x scale block of patches at rows i*scale.., cols j*scale.., laid out (row in block, col in block, d)."""
        scale, side, width = self.connector.scale_factor, self.side, hidden.shape[-1]
        blocks = hidden.reshape(side // scale, scale, side // scale, scale, width).permute(0, 2, 1, 3, 4)
        return blocks.reshape((side // scale) ** 2, scale * scale * width)


class _HFVisionReference:
    """transformers' own `get_image_features` on the graph's input: what the language model receives."""

    def __init__(self, hf_model: nn.Module):
        self.hf_model = hf_model

    def __call__(self, pixel_patches: torch.Tensor) -> torch.Tensor:
        vision = self.hf_model.config.vision_config
        pixel_values = pixel_values_from_patches(pixel_patches, vision.image_size, vision.patch_size)
        return self.hf_model.model.get_image_features(pixel_values[None]).pooler_output[0]


def export_smolvlm_vision(
    hf_model: nn.Module,
    out_dir: str | Path,
    *,
    dtypes: Sequence[str] = ("fp32",),
    progress: Callable[[str], None] | None = None,
    release_torch: Callable[[], None] | None = None,
) -> dict:
    """Write `vision.onnx` (and `vision-int8.onnx` / `vision-fp16.onnx` when in `dtypes`) of a
    `SmolVLMForConditionalGeneration` / `Idefics3ForConditionalGeneration` to `out_dir`, validated as
    `fixed_vit.export_fixed_vision` does it: fp32 against transformers' `get_image_features` on random views."""
    side = check_connector(hf_model.config)
    tower, connector = hf_model.model.vision_model, hf_model.model.connector
    return export_fixed_vision(
        hf_model, lambda fused: SmolVLMVisionForExport(tower, connector, side, fused_attention=fused).eval(),
        _HFVisionReference(hf_model), out_dir, dtypes, progress=progress, release_torch=release_torch,
        parts=(tower, connector),
    )  # fmt: skip


__all__ = ["SmolVLMVisionForExport", "check_connector", "export_smolvlm_vision"]
