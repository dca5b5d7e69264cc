"""Qwen3-VL's vision tower as one ONNX graph: Qwen2-VL's graph (`qwen_vit`) plus learned position embeddings resampled
to the grid and the DeepStack feature sets.

transformers resamples the square learned position grid (`num_position_embeddings`) to each image's (h, w) patches by
bilinear interpolation with aligned corners (`get_vision_interpolation_indices_and_weights`) on the host. The graph
does the same arithmetic from the patch positions the runtime already passes (the grid is the last patch's row and
column + 1), so it keeps Qwen2-VL's inputs and the runtime needs nothing new for it.

The output row of a merged token is the main merger's output, then one DeepStack set per layer in
`deepstack_visual_indexes` (in layer order, each through its own merger), as llama.cpp's own qwen3vl projector
(`tools/mtmd/models/qwen3vl.cpp`) concatenates them and its `qwen3vl` language model reads them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..qwen_vit import Qwen2VLVisionForExport


class Qwen3VLVisionForExport(Qwen2VLVisionForExport):
    """`pixel_patches` (n, 3*2*16*16) + `patch_positions` (n, 2) -> `image_embeds` (n / merge², hidden x (1 + sets))."""

    def embed_patches(self, pixel_patches: torch.Tensor, patch_positions: torch.Tensor) -> torch.Tensor:
        return super().embed_patches(pixel_patches, patch_positions) + self.position_embeddings(patch_positions)[None]

    def position_embeddings(self, patch_positions: torch.Tensor) -> torch.Tensor:
        """(n, embed): the learned grid resampled to the image's grid at each patch, as transformers computes it."""
        side = self.visual.num_grid_per_side
        # (h, w) in patches: the last patch is the bottom-right one (block-major order). A ReduceMax would give the
        # same, but onnxruntime's symbolic shape inference (the fp16 conversion's) cannot follow one.
        extent = patch_positions[-1] + 1
        # transformers' closed form of linspace(0, side - 1, size)[index]; a one-patch-wide axis maps to 0
        source = patch_positions.float() * (side - 1) / torch.clamp(extent - 1, min=1)  # (n, 2): row, col
        floor = torch.floor(source)
        taps, weights = [], []
        for offset in (0, 1):
            taps.append((floor.long() + offset).clamp(0, side - 1))
            weights.append((1 - (source - floor - offset).abs()).clamp(min=0))
        # 2 x 2 taps per patch, rows outer: (row0, col0), (row0, col1), (row1, col0), (row1, col1)
        indices = torch.stack([taps[r][:, 0] * side + taps[c][:, 1] for r in (0, 1) for c in (0, 1)], dim=1)
        tap_weights = torch.stack([weights[r][:, 0] * weights[c][:, 1] for r in (0, 1) for c in (0, 1)], dim=1)
        return (F.embedding(indices, self.visual.pos_embed.weight) * tap_weights[:, :, None]).sum(1)

    def project(self, states: list[torch.Tensor]) -> torch.Tensor:
        visual = self.visual
        indexes = list(visual.deepstack_visual_indexes)
        deepstack = [
            _merge(visual.deepstack_merger_list[indexes.index(layer)], state)
            for layer, state in enumerate(states)
            if layer in indexes
        ]
        return torch.cat([_merge(visual.merger, states[-1]), *deepstack], dim=-1)


def _merge(merger: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A `Qwen3VLVisionPatchMerger` on (1, n, embed): merge² neighbouring patches per token, normed before (main
    merger) or after (DeepStack mergers) they are put side by side."""
    if merger.use_postshuffle_norm:
        merged = merger.norm(hidden.reshape(1, -1, merger.hidden_size))
    else:
        merged = merger.norm(hidden).reshape(1, -1, merger.hidden_size)
    return merger.linear_fc2(merger.act_fn(merger.linear_fc1(merged)))[0]
