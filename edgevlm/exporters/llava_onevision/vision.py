"""LLaVA-OneVision's SigLIP tower + projector + AnyRes packing as one ONNX graph for one view (an image's base and
tiles, or its padded square alone: `edgevlm.contract.kinds.tiles_anyres`).

transformers runs SigLIP on every tile, takes the hidden state `vision_feature_layer` (-1: the last layer's output,
before the post-layernorm) of every patch ("full"), projects it with linear-GELU-linear, and packs an image's tiles
in `pack_image_features` (merge into one grid, unpad, `anyres_max` bilinear downsampling, `image_newline` per row).
`OnevisionVisionForExport` reuses the Hugging Face submodules and weights: patches embedded by a MatMul, the tiles as
a batch, and the packing as the weighted sum of four rows of [features; image_newline] per token that the host
computes from the image's size (`token_sources`, `token_weights`), so one graph serves every grid and shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgevlm.contract.graph import IMAGE_EMBEDS, PIXEL_PATCHES, TOKEN_SOURCES, TOKEN_WEIGHTS
from edgevlm.contract.kinds.tiles_anyres import AnyResTiles
from edgevlm.errors import UnsupportedModelError
from edgevlm.exporters.fixed_vit import embed_patches, pixel_values_from_patches, require_float32, run_encoder_layers
from edgevlm.exporters.onnx_export import OnnxExportSpec, check_vision_dtypes, export_vision_variants

VISION_EXPORT_SPEC = OnnxExportSpec(
    input_names=(PIXEL_PATCHES, TOKEN_SOURCES, TOKEN_WEIGHTS), output_names=(IMAGE_EMBEDS,),
    dynamic_axes={PIXEL_PATCHES: {0: "n_patches"}, TOKEN_SOURCES: {0: "n_tokens"}, TOKEN_WEIGHTS: {0: "n_tokens"}},
    opset=18, atol=1e-4,
)  # fmt: skip
# Validation images as (width, height) in tiles, and whether as one of several images (no tiles): a grid that the
# `anyres_max` rule downsamples, a wide and a tall strip, and a padded square. The first has several tiles and tokens
# (the export traces it; a size-1 axis would be fixed).
VALIDATION_SHAPES = ((5.3, 4.1, False), (7.0, 0.6, False), (0.9, 3.2, False), (2.5, 1.2, True))


def feature_layer_count(config) -> int:
    """How many SigLIP layers produce `config.vision_feature_layer` (hidden_states[i] follows i layers); refuses
    feature settings the graph does not reproduce."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise UnsupportedModelError(f"vision_feature_layer={layer!r}: edgevlm exports one feature layer, not several")
    if config.vision_feature_select_strategy != "full":
        raise UnsupportedModelError(f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: edgevlm exports 'full' (every SigLIP patch) only")  # fmt: skip
    n_layers = config.vision_config.num_hidden_layers
    if not -(n_layers + 1) <= layer <= n_layers:
        raise UnsupportedModelError(f"vision_feature_layer={layer} is outside the tower's {n_layers} layers")
    return layer % (n_layers + 1)


class OnevisionVisionForExport(nn.Module):
    """(`pixel_patches` (images * n², 3*P*P), `token_sources` (tokens, 4), `token_weights` (tokens, 4)) ->
    `image_embeds` (tokens, text hidden) for ONE view. Holds (does not copy) the Hugging Face `SiglipVisionModel`,
    projector and `image_newline`."""

    def __init__(self, tower: nn.Module, projector: nn.Module, newline: torch.Tensor, n_layers: int, *, fused_attention: bool = False):  # fmt: skip
        """`fused_attention`: attention as onnxruntime's `com.microsoft.MultiHeadAttention` (one kernel) instead of
        standard ONNX ops; onnxruntime-only, so only the CPU int8 variant uses it."""
        super().__init__()
        self.tower, self.projector, self.newline = getattr(tower, "vision_model", tower), projector, newline
        self.n_layers, self.fused_attention = n_layers, fused_attention

    def forward(self, pixel_patches: torch.Tensor, token_sources: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        embeddings = self.tower.embeddings
        positions = embeddings.position_embedding.weight  # (n², d)
        hidden = embed_patches(pixel_patches, embeddings.patch_embedding).reshape(-1, positions.shape[0], positions.shape[1])  # fmt: skip
        hidden = run_encoder_layers(hidden + positions[None], self.tower.encoder.layers[: self.n_layers], fused_attention=self.fused_attention)  # fmt: skip
        features = self.projector(hidden)
        table = torch.cat([features.reshape(-1, features.shape[-1]), self.newline[None]])
        return (token_weights[..., None] * table[token_sources]).sum(dim=1)


class _HFVisionReference:
    """transformers' own `get_image_features` (with `pack_image_features`) of the view of an image of known size."""

    def __init__(self, hf_model: nn.Module, spec: AnyResTiles):
        self.hf_model, self.spec = hf_model, spec
        self.sizes: dict[bytes, tuple[int, int, bool]] = {}  # token_sources -> (height, width, one of several)

    def sample(self, width: int, height: int, several: bool, seed: int) -> tuple[torch.Tensor, ...]:
        """A random image's view as graph inputs, remembered with its size."""
        from PIL import Image

        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        grid = self.spec.grid(width, height, max_tiles=0 if several else None)
        view = self.spec.prepare_views(Image.fromarray(pixels), grid)[0]
        self.sizes[view.token_sources.tobytes()] = (height, width, several)
        return tuple(torch.from_numpy(x) for x in (view.pixel_patches, view.token_sources, view.token_weights))

    def __call__(self, pixel_patches: torch.Tensor, token_sources: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        height, width, several = self.sizes[token_sources.numpy().tobytes()]
        patch, n = self.spec.patch_size, self.spec.patches_per_side  # the pixels past n patches are not encoded
        per_image = pixel_patches.reshape(-1, n * n, pixel_patches.shape[-1])
        pixel_values = torch.cat([pixel_values_from_patches(p, n * patch, patch) for p in per_image])
        copies = 2 if several else 1  # transformers tiles no image of a multi-image prompt
        features = self.hf_model.model.get_image_features(
            pixel_values.repeat(copies, 1, 1, 1), image_sizes=torch.tensor([[height, width]] * copies),
            batch_num_images=torch.tensor([copies]),
        )  # fmt: skip
        return features.pooler_output[0]


def export_onevision_vision(
    hf_model: nn.Module,
    spec: AnyResTiles,
    out_dir: str | Path,
    *,
    dtypes: Sequence[str] = ("fp32",),
    progress: Callable[[str], None] | None = None,
    release_torch: Callable[[], None] | None = None,
) -> dict:
    """Write `vision.onnx` (and `vision-int8.onnx` / `vision-fp16.onnx` when in `dtypes`) of a
    `LlavaOnevisionForConditionalGeneration` to `out_dir`, validated as `onnx_export.export_vision_variants` does
    it: fp32 against transformers' `get_image_features` on random images of `VALIDATION_SHAPES`. Returns the
    manifest entry per dtype."""
    check_vision_dtypes(dtypes)
    model = hf_model.model
    require_float32(model.vision_tower, model.multi_modal_projector)
    n_layers = feature_layer_count(hf_model.config)
    reference = _HFVisionReference(hf_model, spec)
    side = spec.tile_size
    shapes = [(round(w * side), round(h * side), several) for w, h, several in VALIDATION_SHAPES]
    input_sets = [reference.sample(w, h, several, seed) for seed, (w, h, several) in enumerate(shapes)]
    newline = model.image_newline.detach().float()

    def make_module(fused: bool) -> nn.Module:
        return OnevisionVisionForExport(model.vision_tower, model.multi_modal_projector, newline, n_layers, fused_attention=fused).eval()  # fmt: skip

    return export_vision_variants(
        make_module, VISION_EXPORT_SPEC, reference, input_sets, out_dir, dtypes,
        fp32_report={"images": [[w, h] for w, h, _ in shapes]}, progress=progress, release_torch=release_torch,
    )  # fmt: skip


__all__ = ["OnevisionVisionForExport", "export_onevision_vision", "feature_layer_count"]
