"""What the vision graph takes besides the pixels: the manifest's `vision.patch_positions` kind.

Every graph takes `pixel_patches` (`edgevlm.contract.graph`); a graph whose rotary angles depend on each patch's place in
the image (Qwen2-VL's ViT) also takes the patches' (row, col), computed here on the host so that one graph serves
every image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..graph import PATCH_POSITIONS, PIXEL_PATCHES, TOKEN_SOURCES, TOKEN_WEIGHTS
from .registry import register


def check_grid(grid: tuple[int, int, int], merge_size: int) -> tuple[int, int, int]:
    """`grid` as three positive ints (t, h, w) with h and w multiples of `merge_size`; ValueError otherwise."""
    if len(grid) != 3 or not all(isinstance(x, (int, np.integer)) and x > 0 for x in grid):
        raise ValueError(f"image grid must be three positive integers (t, h, w), got {tuple(grid)}")
    t, h, w = (int(x) for x in grid)
    if h % merge_size or w % merge_size:
        raise ValueError(
            f"image grid {(t, h, w)}: h and w must be multiples of the merge size {merge_size}; "
            "resize the image to a multiple of patch_size * merge_size pixels"
        )
    return t, h, w


def grid_patch_positions(grid: tuple[int, int, int], merge_size: int) -> np.ndarray:
    """(row, col) of every patch, int64 (t*h*w, 2), in the block-major order of Qwen2-VL's patches.

    Patches come merge_size x merge_size block by block (blocks row-major, patches row-major inside a block), and
    every frame repeats the same positions; equals transformers' `get_vision_position_ids(grid_thw, merge_size)`.
    """
    t, h, w = check_grid(grid, merge_size)
    rows, cols = np.meshgrid(np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64), indexing="ij")
    blocks = (h // merge_size, merge_size, w // merge_size, merge_size)
    rows = rows.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1))


@register("patch_positions", "grid-2d")
@dataclass(frozen=True)
class Grid2D:
    """The graph takes `patch_positions` int64 (n_patches, 2): each patch's (row, col) in block-major order."""

    kind: ClassVar[str]
    graph_inputs: ClassVar[tuple[str, ...]] = (PIXEL_PATCHES, PATCH_POSITIONS)

    def extra_inputs(self, frame_grid: tuple[int, int, int], merge_size: int) -> dict[str, np.ndarray]:
        return {PATCH_POSITIONS: grid_patch_positions(frame_grid, merge_size)}


@register("patch_positions", "none")
@dataclass(frozen=True)
class NoPatchPositions:
    """The graph takes the pixels only (learned position embeddings of one fixed grid: CLIP, SigLIP)."""

    kind: ClassVar[str]
    graph_inputs: ClassVar[tuple[str, ...]] = (PIXEL_PATCHES,)

    def extra_inputs(self, frame_grid: tuple[int, int, int], merge_size: int) -> dict[str, np.ndarray]:
        return {}


@register("patch_positions", "packed-tokens")
@dataclass(frozen=True)
class PackedTokens:
    """The graph takes the patches of one view's images and packs their features into the view's tokens by
    `token_sources` / `token_weights`, which the view brings (`PreparedImage.graph_inputs`; AnyRes)."""

    kind: ClassVar[str]
    graph_inputs: ClassVar[tuple[str, ...]] = (PIXEL_PATCHES, TOKEN_SOURCES, TOKEN_WEIGHTS)

    def extra_inputs(self, frame_grid: tuple[int, int, int], merge_size: int) -> dict[str, np.ndarray]:
        return {}


PatchPositions = Grid2D | NoPatchPositions | PackedTokens
