"""LLaVA's CLIP vision tower + MLP projector as one ONNX graph for one fixed-size image.

transformers runs the whole CLIP tower, takes the hidden state `vision_feature_layer` (-2 for LLaVA-1.5: the
output of the second-to-last layer), drops the CLS position ("default" strategy) and projects every patch with
linear-GELU-linear. `LlavaVisionForExport` reuses the Hugging Face submodules and weights in a forward that runs
only the layers that feature needs, embeds patches with a MatMul (int8 quantization covers it, and the runtime's
patch layout is shared with Qwen2-VL) and adds the learned position embeddings of the fixed grid: the graph takes
`pixel_patches` only (manifest `patch_positions` = "none").
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


def feature_layer_count(config) -> int:
    """How many CLIP encoder layers produce `config.vision_feature_layer` (hidden_states[i] follows i layers)."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise UnsupportedModelError(f"vision_feature_layer={layer!r}: edgevlm exports one feature layer, not several")
    if config.vision_feature_select_strategy != "default":
        raise UnsupportedModelError(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: edgevlm exports 'default' "
            "(the CLS position dropped, one token per patch) only"
        )
    n_layers = config.vision_config.num_hidden_layers
    if not -(n_layers + 1) <= layer <= n_layers:
        raise UnsupportedModelError(f"vision_feature_layer={layer} is outside the tower's {n_layers} layers")
    return layer % (n_layers + 1)


class LlavaVisionForExport(nn.Module):
    """`pixel_patches` (n_patches, 3*P*P) -> `image_embeds` (n_patches, text hidden) for ONE image.

    Holds (does not copy) the Hugging Face `CLIPVisionModel` and `LlavaMultiModalProjector`. A batch axis of 1 is
    kept so every Linear exports as MatMul (which int8 quantization covers), not Gemm.
    """

    def __init__(self, tower: nn.Module, projector: nn.Module, n_layers: int, *, fused_attention: bool = False):
        """`fused_attention`: attention as onnxruntime's `com.microsoft.MultiHeadAttention` (one kernel) instead of
        standard ONNX ops; onnxruntime-only, so only the CPU int8 variant uses it."""
        super().__init__()
        self.tower, self.projector, self.n_layers = tower, projector, n_layers
        self.fused_attention = fused_attention

    def forward(self, pixel_patches: torch.Tensor) -> torch.Tensor:
        embeddings = self.tower.embeddings
        hidden = embed_patches(pixel_patches, embeddings.patch_embedding)  # (1, n, d)
        cls = embeddings.class_embedding.reshape(1, 1, -1)
        hidden = torch.cat([cls, hidden], dim=1) + embeddings.position_embedding.weight[None]  # (1, n + 1, d)
        hidden = self.tower.pre_layrnorm(hidden)
        hidden = run_encoder_layers(hidden, self.tower.encoder.layers[: self.n_layers], fused_attention=self.fused_attention)  # fmt: skip
        return self.projector(hidden[:, 1:])[0]  # the CLS position dropped


class _HFVisionReference:
    """transformers' own `get_image_features` on the graph's input: what the language model receives."""

    def __init__(self, hf_model: nn.Module):
        self.hf_model = hf_model

    def __call__(self, pixel_patches: torch.Tensor) -> torch.Tensor:
        config = self.hf_model.config
        pixel_values = pixel_values_from_patches(pixel_patches, config.vision_config.image_size, config.vision_config.patch_size)  # fmt: skip
        features = self.hf_model.model.get_image_features(
            pixel_values, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )  # fmt: skip
        return features.pooler_output[0]


def export_llava_vision(
    hf_model: nn.Module,
    out_dir: str | Path,
    *,
    dtypes: Sequence[str] = ("fp32",),
    progress: Callable[[str], None] | None = None,
    release_torch: Callable[[], None] | None = None,
) -> dict:
    """Write `vision.onnx` (and `vision-int8.onnx` / `vision-fp16.onnx` when in `dtypes`) of a
    `LlavaForConditionalGeneration` to `out_dir`, validated as `fixed_vit.export_fixed_vision` does it: fp32 against
    transformers' `get_image_features` on random images. Returns the manifest entry per dtype."""
    n_layers = feature_layer_count(hf_model.config)
    tower, projector = hf_model.model.vision_tower, hf_model.model.multi_modal_projector
    return export_fixed_vision(
        hf_model, lambda fused: LlavaVisionForExport(tower, projector, n_layers, fused_attention=fused).eval(),
        _HFVisionReference(hf_model), out_dir, dtypes, progress=progress, release_torch=release_torch,
    )  # fmt: skip


__all__ = ["LlavaVisionForExport", "export_llava_vision", "feature_layer_count"]
