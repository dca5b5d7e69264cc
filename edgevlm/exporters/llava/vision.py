"""LLaVA's CLIP vision tower + MLP projector as one ONNX graph for one fixed-size image.

transformers runs the whole CLIP tower, takes the hidden state `vision_feature_layer` (-2 for LLaVA-1.5: the
output of the second-to-last layer), drops the CLS position ("default" strategy) and projects every patch with
linear-GELU-linear. `LlavaVisionForExport` reuses the Hugging Face submodules and weights in a forward that runs
only the layers that feature needs, embeds patches with a MatMul (int8 quantization covers it, and the runtime's
patch layout is shared with Qwen2-VL) and adds the learned position embeddings of the fixed grid: the graph takes
`pixel_patches` only (manifest `patch_positions` = "none").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.contract.graph import IMAGE_EMBEDS, PIXEL_PATCHES
from edgevlm.errors import UnsupportedModelError
from edgevlm.exporters.onnx_export import OnnxExportSpec, check_vision_dtypes, export_vision_variants

logger = logging.getLogger(__name__)

VISION_EXPORT_SPEC = OnnxExportSpec(
    input_names=(PIXEL_PATCHES,), output_names=(IMAGE_EMBEDS,), dynamic_axes={}, opset=18, atol=1e-4
)
N_VALIDATION_SETS = 3  # random images the fp32 graph is checked on (one size: the graph takes one)


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
        proj = embeddings.patch_embedding  # a Conv2d whose kernel is one whole patch: a MatMul on the flat patch
        hidden = (pixel_patches @ proj.weight.reshape(proj.out_channels, -1).T)[None]  # (1, n, d)
        if proj.bias is not None:
            hidden = hidden + proj.bias
        cls = embeddings.class_embedding.reshape(1, 1, -1)
        hidden = torch.cat([cls, hidden], dim=1) + embeddings.position_embedding.weight[None]  # (1, n + 1, d)
        hidden = self.tower.pre_layrnorm(hidden)
        for layer in self.tower.encoder.layers[: self.n_layers]:
            attn = layer.self_attn
            normed = layer.layer_norm1(hidden)
            query, key, value = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)  # each (1, N, d)
            out = self._fused_attention(attn, query, key, value) if self.fused_attention else self._attention(attn, query, key, value)  # fmt: skip
            hidden = hidden + attn.out_proj(out)
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        return self.projector(hidden[:, 1:])[0]  # the CLS position dropped

    @staticmethod
    def _attention(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        n = query.shape[1]
        heads = [x.reshape(1, n, attn.num_heads, attn.head_dim).transpose(1, 2) for x in (query, key, value)]
        out = F.scaled_dot_product_attention(*heads, scale=attn.scale)
        return out.transpose(1, 2).reshape(1, n, attn.num_heads * attn.head_dim)

    @staticmethod
    def _fused_attention(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return torch.onnx.ops.symbolic(
            "com.microsoft::MultiHeadAttention", [query, key, value],
            attrs={"num_heads": attn.num_heads, "scale": float(attn.scale)}, dtype=query.dtype, shape=query.shape,
            version=1,
        )  # fmt: skip


class _HFVisionReference:
    """transformers' own `get_image_features` on the graph's input: what the language model receives."""

    def __init__(self, hf_model: nn.Module):
        self.hf_model = hf_model
        config = hf_model.config.vision_config
        self.patch, self.grid = config.patch_size, config.image_size // config.patch_size

    def __call__(self, pixel_patches: torch.Tensor) -> torch.Tensor:
        grid, patch = self.grid, self.patch
        pixel_values = pixel_patches.reshape(grid, grid, 3, patch, patch).permute(2, 0, 3, 1, 4).reshape(1, 3, grid * patch, grid * patch)  # fmt: skip
        config = self.hf_model.config
        features = self.hf_model.model.get_image_features(
            pixel_values, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )  # fmt: skip
        return features.pooler_output[0]


def vision_sample_inputs(config, seed: int) -> tuple[torch.Tensor]:
    """Random normalized pixel patches of one image, as the graph's input."""
    n_patches = (config.image_size // config.patch_size) ** 2
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n_patches, 3 * config.patch_size**2, generator=generator),)


def export_llava_vision(
    hf_model: nn.Module,
    out_dir: str | Path,
    *,
    dtypes: Sequence[str] = ("fp32",),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write `vision.onnx` (and `vision-int8.onnx` / `vision-fp16.onnx` when in `dtypes`) of a
    `LlavaForConditionalGeneration` to `out_dir`, validated as `onnx_export.export_vision_variants` does it: fp32
    against transformers' `get_image_features` on random images. Returns the manifest entry per dtype."""
    check_vision_dtypes(dtypes)
    n_layers = feature_layer_count(hf_model.config)
    tower, projector = hf_model.model.vision_tower, hf_model.model.multi_modal_projector
    for module in (tower, projector):
        dtype = next(module.parameters()).dtype
        if dtype != torch.float32:
            raise ValueError(f"{type(module).__name__} has {dtype} weights; export needs float32")
    input_sets = [vision_sample_inputs(tower.config, seed) for seed in range(N_VALIDATION_SETS)]
    return export_vision_variants(
        lambda fused: LlavaVisionForExport(tower, projector, n_layers, fused_attention=fused).eval(),
        VISION_EXPORT_SPEC, _HFVisionReference(hf_model), input_sets, out_dir, dtypes,
        fp32_report={"images": N_VALIDATION_SETS}, progress=progress,
    )  # fmt: skip


__all__ = ["VISION_EXPORT_SPEC", "LlavaVisionForExport", "export_llava_vision", "feature_layer_count"]
