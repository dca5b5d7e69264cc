"""AnyRes tiling (LLaVA-OneVision; transformers' `LlavaOnevisionImageProcessor` and `pack_image_features`).

The processor picks the best of the `grid_pinpoints` resolutions for the image (`select_best_resolution`), resizes
the image into it keeping its aspect ratio, pads the rest with black, and cuts it into tiles of the tower's size; a
base image (the whole image squashed to one tile) goes first. The model then puts the tiles' features back into one
grid, crops the padding off (`unpad_image`), shrinks the grid bilinearly when it holds more than `max_tiles_area`
tiles' worth of features (the `anyres_max_9` rule) and ends each row with the learned `image_newline` embedding.
An image's base and tiles are therefore ONE embedding span: ONE view (`TileView("anyres")`), encoded by one graph
call that also does that packing. What the packing needs from the image's size is computed here, on the host: every
output token is a weighted sum of at most four rows of the table [features of the view's images; image_newline]
(`token_sources`, `token_weights`: a crop is weight 1 on one row, the bilinear downsampling four weights, the newline
weight 1 on the table's last row), so the graph has no size-dependent shapes.

With no tiles (`TileGrid(0, 0)`, what transformers does with each image of a multi-image prompt) the image is padded
to a square with the mean colour and resized to one tile: its features and one `image_newline`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from ...errors import ImageError
from ...images import to_rgb
from ..graph import TOKEN_SOURCES, TOKEN_WEIGHTS
from .preprocessing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PreparedImage,
    _check_normalization,
    _check_reproducible,
    _normalization_values,
    _pad_to_square,
    square_patches,
)
from .registry import check_positive_ints, register
from .tiling import TiledPreprocessing, TileGrid, TileView

ANYRES_MAX_PREFIX = "anyres_max_"  # LLaVA-OneVision's `vision_aspect_ratio`: "anyres_max_9"
TAPS = 4  # rows of the feature table per output token (bilinear: 2 x 2)


@dataclass(frozen=True, eq=False)
class ResampledImage(PreparedImage):
    """A `PreparedImage` whose graph packs its features into `token_sources.shape[0]` tokens (see the module doc)."""

    token_sources: np.ndarray  # (n_tokens, 4) int64: rows of [the view's patch features; image_newline]
    token_weights: np.ndarray  # (n_tokens, 4) float32

    def __post_init__(self) -> None:
        super().__post_init__()
        shape = self.token_sources.shape
        if len(shape) != 2 or shape[1] != TAPS or self.token_weights.shape != shape:
            raise ValueError(f"token_sources {shape} and token_weights {self.token_weights.shape}: expected both (n_tokens, {TAPS})")  # fmt: skip

    @property
    def n_tokens(self) -> int:
        return int(self.token_sources.shape[0])

    @property
    def graph_inputs(self) -> dict[str, np.ndarray]:
        return {TOKEN_SOURCES: self.token_sources, TOKEN_WEIGHTS: self.token_weights}

    @property
    def position_grid(self) -> tuple[int, int, int]:
        return 1, 1, self.n_tokens  # one token per position (`linear`)


@register("preprocessing", "tiles-anyres")
@dataclass(frozen=True)
class AnyResTiles(TiledPreprocessing):
    """AnyRes tiles (see the module doc). `grid_pinpoints` are (height, width) pixel sizes, multiples of
    `tile_size`; `max_tiles_area` is N of `anyres_max_N`."""

    tile_size: int = 384
    patch_size: int = 14
    grid_pinpoints: tuple[tuple[int, int], ...] = tuple((384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7))
    max_tiles_area: int = 9
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN  # the processor's defaults; llava-hf's configs say 0.5
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    merge_size: ClassVar[int] = 1  # one token per patch
    tiles_lone_image_only: ClassVar[bool] = True  # each image of a multi-image prompt: padded square + newline

    def __post_init__(self) -> None:
        check_positive_ints(self, "preprocessing", ("tile_size", "patch_size", "max_tiles_area"))
        if self.tile_size < self.patch_size:
            raise ValueError(f"preprocessing tile_size={self.tile_size} is below patch_size={self.patch_size}")
        object.__setattr__(self, "grid_pinpoints", _check_pinpoints(self.grid_pinpoints, self.tile_size))
        _check_normalization(self)

    # -- the grid ---------------------------------------------------------------------------------------------------
    @property
    def patches_per_side(self) -> int:
        """Patches per tile side; the tower's patch convolution drops the pixels past them (384 px, patch 14: 27
        patches, the last 6 pixel rows and columns unused)."""
        return self.tile_size // self.patch_size

    @property
    def default_max_tiles(self) -> int:
        return max(h * w for h, w in self.grid_pinpoints) // self.tile_size**2

    @property
    def max_crops_per_view(self) -> int:
        return 1 + self.default_max_tiles

    def grid(self, width: int, height: int, max_tiles: int | None = None) -> TileGrid:
        """The processor's grid (`select_best_resolution` over the pinpoints). With a smaller cap: its choice among
        the pinpoints of at most that many tiles that cost no more tokens than the grid of the next larger cap (the
        `anyres_max` downsampling can make a larger grid cheaper), so a smaller cap never costs more."""
        _check_size(width, height)
        cap = self.default_max_tiles if max_tiles is None else min(max_tiles, self.default_max_tiles)
        return _grids_by_cap(self, width, height)[max(cap, 0)]

    def views(self, grid: TileGrid, width: int, height: int) -> list[TileView]:
        base = self.patches_per_side**2
        if grid.n_tiles == 0:
            return [TileView("global", base + 1)]
        rows, cols = self._packed_shape(grid, width, height)
        return [TileView("anyres", base + rows * (cols + 1), n_crops=1 + grid.n_tiles)]

    def layout(self, grid: TileGrid, width: int, height: int) -> list[str | int]:
        return [0]

    def token_range(self) -> tuple[int, int]:
        """(one tile and a newline, the most an image can cost): unpadding and the `anyres_max` rule make the
        tiled count depend on the image's shape; the bound is over every grid the pinpoints allow with its rows or
        its columns cropped evenly from both sides (what `unpad_image` can leave)."""
        base, side = self.patches_per_side**2, self.patches_per_side
        most = 0
        for h, w in self.grid_pinpoints:
            rows, cols = h // self.tile_size * side, w // self.tile_size * side
            shapes = [(rows, c) for c in range(cols, 0, -2)] + [(r, cols) for r in range(rows, 0, -2)]
            most = max(most, *(r * (c + 1) for r, c in (self._downsampled(*shape) for shape in shapes)))
        return base + 1, base + most

    def describe_range(self) -> str:
        return f"{self.tile_size}-pixel AnyRes tiles, at most {self.default_max_tiles} tiles plus a base image"

    def _packed_shape(self, grid: TileGrid, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of the tiles' feature grid after unpadding and the `anyres_max` downsampling."""
        (_, rows), (_, cols) = self._unpadded(grid, width, height)
        return self._downsampled(rows, cols)

    def _unpadded(self, grid: TileGrid, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((first row, rows), (first col, cols)) of the tiles' feature grid that `unpad_image` keeps."""
        side = self.patches_per_side
        current_h, current_w = grid.rows * side, grid.cols * side
        top, left = 0, 0
        if width / height > current_w / current_h:
            new_h = int(round(height * (current_w / width), 7))
            top = (current_h - new_h) // 2
            current_h -= 2 * top
        else:
            new_w = int(round(width * (current_h / height), 7))
            left = (current_w - new_w) // 2
            current_w -= 2 * left
        return (top, current_h), (left, current_w)

    def _downsampled(self, rows: int, cols: int) -> tuple[int, int]:
        ratio = math.sqrt(rows * cols / (self.max_tiles_area * self.patches_per_side**2))
        if ratio > 1.1:
            return int(rows // ratio), int(cols // ratio)
        return rows, cols

    # -- the pixels -------------------------------------------------------------------------------------------------
    def prepare_views(self, image: Image.Image, grid: TileGrid) -> list[PreparedImage]:
        width, height = image.size
        _check_size(width, height)
        rgb = to_rgb(image)
        side = self.tile_size
        if grid.n_tiles == 0:
            mean_colour = tuple(int(m * 255) for m in self.image_mean)
            square = _pad_to_square(rgb, mean_colour) if rgb.width != rgb.height else rgb
            tiles = [square.resize((side, side), Image.Resampling.BICUBIC)]
        else:
            tiles = [rgb.resize((side, side), Image.Resampling.BICUBIC), *self._tiles(rgb, grid)]
        pixels = np.concatenate(
            [square_patches(np.asarray(tile, dtype=np.uint8), self.patch_size, self) for tile in tiles]
        )
        sources, weights = self.packing(grid, width, height)
        n = self.patches_per_side
        return [ResampledImage(pixels, grid=(1, len(tiles) * n, n), merge_size=1, token_sources=sources, token_weights=weights)]  # fmt: skip

    def _tiles(self, rgb: Image.Image, grid: TileGrid) -> list[Image.Image]:
        """The image resized into the grid's resolution keeping its aspect ratio, centred on black, cut row-major."""
        target_h, target_w = grid.rows * self.tile_size, grid.cols * self.tile_size
        new_h, new_w = patch_output_size(rgb.height, rgb.width, target_h, target_w)
        canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
        # transformers pads (target - new) // 2 before, the rest after
        canvas.paste(rgb.resize((new_w, new_h), Image.Resampling.BICUBIC), ((target_w - new_w) // 2, (target_h - new_h) // 2))  # fmt: skip
        side = self.tile_size
        return [canvas.crop((c * side, r * side, (c + 1) * side, (r + 1) * side)) for r in range(grid.rows) for c in range(grid.cols)]  # fmt: skip

    # -- the packing ------------------------------------------------------------------------------------------------
    def packing(self, grid: TileGrid, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(token_sources, token_weights) of the view of a width x height image cut into `grid` (module doc): the
        table's rows are the features of the base image, then of each tile (row-major), then `image_newline`."""
        n = self.patches_per_side
        base = np.arange(n * n, dtype=np.int64)
        n_images = 1 + grid.n_tiles
        newline = n_images * n * n
        if grid.n_tiles == 0:
            sources = np.concatenate([base, [newline]])
            return _taps(sources), _unit_weights(len(sources))
        (top, rows), (left, cols) = self._unpadded(grid, width, height)
        out_rows, out_cols = self._downsampled(rows, cols)
        row_index, row_weight = _bilinear(rows, out_rows)  # (out, 2) each, into the unpadded rows
        col_index, col_weight = _bilinear(cols, out_cols)
        # feature-grid (Y, X) -> table row: tile (Y // n, X // n), patch (Y % n, X % n), after the base image
        ys, xs = row_index + top, col_index + left  # (out_rows, 2), (out_cols, 2)
        y, x = ys[:, None, :, None], xs[None, :, None, :]  # -> (out_rows, out_cols, 2, 2)
        table = (1 + (y // n) * grid.cols + x // n) * n * n + (y % n) * n + x % n
        weights = row_weight[:, None, :, None] * col_weight[None, :, None, :]
        grid_sources = table.reshape(out_rows, out_cols, TAPS)
        grid_weights = weights.reshape(out_rows, out_cols, TAPS).astype(np.float32)
        newline_sources = np.zeros((out_rows, 1, TAPS), np.int64) + np.array([newline, 0, 0, 0])
        newline_weights = np.zeros((out_rows, 1, TAPS), np.float32) + np.array([1, 0, 0, 0], np.float32)
        sources = np.concatenate([_taps(base), np.concatenate([grid_sources, newline_sources], axis=1).reshape(-1, TAPS)])  # fmt: skip
        weights = np.concatenate([_unit_weights(n * n), np.concatenate([grid_weights, newline_weights], axis=1).reshape(-1, TAPS)])  # fmt: skip
        return sources, weights

    @classmethod
    def from_preprocessor_config(cls, cfg: Mapping[str, Any], *, patch_size: int, vision_aspect_ratio: str, grid_pinpoints: Sequence[Sequence[int]] | None = None) -> AnyResTiles:  # fmt: skip
        """Build from a `preprocessor_config.json` dict of `LlavaOnevisionImageProcessor`, the tower's patch size
        and the model config's `vision_aspect_ratio` ("anyres_max_N") and `image_grid_pinpoints` (the processor's
        own are used, and must agree). Settings this pipeline cannot reproduce raise ValueError."""
        _check_reproducible(cfg, "LLaVA-OneVision", ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"))  # fmt: skip
        if cfg.get("do_center_crop"):
            raise ValueError("preprocessor config do_center_crop=True: edgevlm's LLaVA-OneVision pipeline does not crop")  # fmt: skip
        size = cfg.get("size") or {"height": 384, "width": 384}
        side = size.get("height") if isinstance(size, Mapping) else None
        if not isinstance(size, Mapping) or side != size.get("width") or side is None:
            raise ValueError(f"preprocessor config size={size!r}: expected a square {{'height': n, 'width': n}}")
        pinpoints = cfg.get("image_grid_pinpoints") or grid_pinpoints
        if grid_pinpoints is not None and pinpoints is not None and [list(p) for p in pinpoints] != [list(p) for p in grid_pinpoints]:  # fmt: skip
            raise ValueError("the processor's image_grid_pinpoints differ from the model config's")
        if not isinstance(vision_aspect_ratio, str) or not vision_aspect_ratio.startswith(ANYRES_MAX_PREFIX):
            raise ValueError(f"vision_aspect_ratio={vision_aspect_ratio!r}: edgevlm reproduces 'anyres_max_N' only")
        values: dict[str, Any] = {"tile_size": side, "patch_size": patch_size}
        values["max_tiles_area"] = int(vision_aspect_ratio.strip(ANYRES_MAX_PREFIX))  # as transformers parses it
        if pinpoints is not None:
            values["grid_pinpoints"] = tuple(tuple(p) for p in pinpoints)
        if cfg.get("rescale_factor") is not None:
            values["rescale_factor"] = cfg["rescale_factor"]
        return cls(**values, **_normalization_values(cfg))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["grid_pinpoints"] = [list(p) for p in self.grid_pinpoints]
        return out


@functools.lru_cache(maxsize=64)
def _grids_by_cap(spec: AnyResTiles, width: int, height: int) -> tuple[TileGrid, ...]:
    """`spec.grid(width, height, k)` for every cap k from 0 to `default_max_tiles`."""
    side = spec.tile_size
    by_tiles = {p: (p[0] // side) * (p[1] // side) for p in spec.grid_pinpoints}
    best = select_best_resolution((height, width), spec.grid_pinpoints)
    grids = [TileGrid(best[0] // side, best[1] // side)]
    for cap in range(spec.default_max_tiles - 1, 0, -1):
        previous = grids[-1]
        if previous.n_tiles <= cap:
            grids.append(previous)
            continue
        ceiling = spec.n_tokens(previous, width, height)
        allowed = [p for p, n in by_tiles.items() if n <= cap]
        costs = {p: spec.n_tokens(TileGrid(p[0] // side, p[1] // side), width, height) for p in allowed}
        cheap = [p for p in allowed if costs[p] <= ceiling] or [min(allowed, key=costs.__getitem__)]
        h, w = select_best_resolution((height, width), cheap)
        grids.append(TileGrid(h // side, w // side))
    grids.append(TileGrid(0, 0))
    return tuple(reversed(grids))


def select_best_resolution(original_size: tuple[int, int], possible: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """transformers' `select_best_resolution`: the (height, width) that keeps the most of the image's pixels, then
    wastes the fewest."""
    original_height, original_width = original_size
    best, best_effective, best_wasted = possible[0], 0, math.inf
    for height, width in possible:
        scale = min(width / original_width, height / original_height)
        effective = min(int(original_width * scale) * int(original_height * scale), original_width * original_height)
        wasted = width * height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (height, width), effective, wasted
    return best


def patch_output_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """transformers' `get_patch_output_size`: (height, width) of the image resized into the target, aspect kept."""
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def _bilinear(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(out, 2) source indices and float32 weights of torch's bilinear resize (align_corners=False) along one axis,
    computed in float32 as ATen's CPU kernel does; the identity when the sizes agree."""
    if out_size == in_size:
        index = np.arange(in_size, dtype=np.int64)
        return np.stack([index, index], 1), np.tile(np.array([1, 0], np.float32), (in_size, 1))
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))  # fmt: skip
    first = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    second = first + (first < in_size - 1)
    lam = np.clip(source - first.astype(np.float32), 0, 1).astype(np.float32)
    return np.stack([first, second], 1), np.stack([np.float32(1) - lam, lam], 1)


def _taps(sources: np.ndarray) -> np.ndarray:
    """Rows that each copy one table row: the source, then three unused taps of weight 0."""
    out = np.zeros((len(sources), TAPS), np.int64)
    out[:, 0] = sources
    return out


def _unit_weights(n: int) -> np.ndarray:
    out = np.zeros((n, TAPS), np.float32)
    out[:, 0] = 1
    return out


def _check_pinpoints(pinpoints: Any, tile_size: int) -> tuple[tuple[int, int], ...]:
    try:
        checked = tuple((int(h), int(w)) for h, w in pinpoints)
    except (TypeError, ValueError):
        raise ValueError(f"preprocessing grid_pinpoints={pinpoints!r}: expected a list of [height, width]") from None
    if not checked or any(h <= 0 or w <= 0 or h % tile_size or w % tile_size for h, w in checked):
        raise ValueError(f"preprocessing grid_pinpoints={pinpoints!r}: expected positive multiples of tile_size={tile_size}")  # fmt: skip
    return checked


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"Image size {width}x{height} (width x height) has no pixels; pass a non-empty image.")
