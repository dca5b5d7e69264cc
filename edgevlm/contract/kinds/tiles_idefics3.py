"""`tiles-idefics3`: Idefics3's and SmolVLM2's image splitting (transformers' `Idefics3ImageProcessorPil` /
`SmolVLMImageProcessorPil` with `Idefics3Processor` / `SmolVLMProcessor`'s prompt).

The processor, on the uint8 RGB image, each resize with PIL LANCZOS:

1. resizes the longest edge to `longest_edge` (up or down; the other side `int(long / aspect)`, rounded up to even),
   then below 4096 px;
2. with `do_image_splitting`: resizes both sides up to multiples of `tile_size` (the long side first, the short side
   from it); an image that became one tile is the global view alone (grid 0 x 0), else it is cut into rows x cols
   tiles, row-major, and the global view is the whole image resized to `tile_size` squared; without splitting: the
   global view alone, the step-1 image resized to `tile_size` squared;
3. rescales and normalizes (the vision tower then takes each view as one `tile_size` image).

Its prompt for a split image: per tile `<fake_token_around_image><row_R_col_C>` + the tile's tokens, a "\\n" after
each row, then "\\n<fake_token_around_image><global-img>" + the global view's tokens + `<fake_token_around_image>`;
for the global view alone `<fake_token_around_image><global-img>` + its tokens + `<fake_token_around_image>`.

A tile cap below the processor's grid: the grid the same rule gives with the longest edge lowered to a multiple of
`tile_size` (m * tile_size, m = the largest whose grid has at most `max_tiles` tiles; m = 1 is the global view
alone). The long side then has m tiles and the short side at most m, so a lower cap never gives more tiles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ...errors import ImageError
from ...images import to_rgb
from .preprocessing import PreparedImage, _check_normalization, _is_real, square_patches
from .registry import check_positive_ints, register
from .tiling import TiledPreprocessing, TileGrid, TileView

MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on a side after the first resize
IMAGENET_STANDARD = (0.5, 0.5, 0.5)
FAKE_TOKEN, GLOBAL_TOKEN = "<fake_token_around_image>", "<global-img>"
LANCZOS = 1  # PIL's (and transformers' PILImageResampling) number for LANCZOS


@register("preprocessing", "tiles-idefics3")
@dataclass(frozen=True)
class Idefics3Tiles(TiledPreprocessing):
    """Idefics3 / SmolVLM2 tiling: `tile_size` squares (the vision tower's image size), `merge_size` the connector's
    pixel-shuffle `scale_factor`, `longest_edge` the processor's `size.longest_edge`."""

    tile_size: int = 512
    patch_size: int = 16
    merge_size: int = 4
    longest_edge: int = 2048
    do_image_splitting: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD
    image_std: tuple[float, float, float] = IMAGENET_STANDARD
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        check_positive_ints(self, "preprocessing", ("tile_size", "patch_size", "merge_size", "longest_edge"))
        if self.tile_size % self.factor:
            raise ValueError(f"preprocessing tile_size={self.tile_size} is not a multiple of patch_size * merge_size = "
                             f"{self.patch_size} * {self.merge_size}")  # fmt: skip
        if not isinstance(self.do_image_splitting, bool):
            raise ValueError(f"preprocessing do_image_splitting={self.do_image_splitting!r}: expected true or false")
        _check_normalization(self)

    @property
    def tokens_per_view(self) -> int:
        return (self.tile_size // self.factor) ** 2

    @property
    def default_max_tiles(self) -> int:
        """(ceil(longest edge / tile))²; without splitting 1, the cap whose grid is the global view alone (as a cap
        of 1 is when splitting: the planner's smallest grid)."""
        if not self.do_image_splitting:
            return 1
        return math.ceil(min(self.longest_edge, MAX_IMAGE_SIZE) / self.tile_size) ** 2

    def token_range(self) -> tuple[int, int]:
        if not self.do_image_splitting:
            return self.tokens_per_view, self.tokens_per_view
        return super().token_range()

    # -- grids -------------------------------------------------------------------------------------------------
    def grid(self, width: int, height: int, max_tiles: int | None = None) -> TileGrid:
        if max_tiles is not None and (isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 0):
            raise ValueError(f"max_tiles={max_tiles!r}: expected a non-negative integer or None")
        own = self._grid_at(width, height, self.longest_edge)
        if max_tiles is None or max_tiles >= own.n_tiles:
            return own
        for multiple in range(math.ceil(self.longest_edge / self.tile_size) - 1, 1, -1):
            grid = self._grid_at(width, height, multiple * self.tile_size)
            if grid.n_tiles <= max_tiles:
                return grid
        return TileGrid(0, 0)

    def _grid_at(self, width: int, height: int, longest_edge: int) -> TileGrid:
        if not self.do_image_splitting:
            return TileGrid(0, 0)
        resized_w, resized_h = self._tile_multiple_size(*_longest_edge_size(width, height, longest_edge))
        if resized_w > self.tile_size or resized_h > self.tile_size:
            return TileGrid(resized_h // self.tile_size, resized_w // self.tile_size)
        return TileGrid(0, 0)

    def _longest_edge_for(self, grid: TileGrid, width: int, height: int) -> int:
        """The longest edge the processor's rule resizes to for `grid` (its own, or a capped one's)."""
        if grid == self._grid_at(width, height, self.longest_edge):
            return self.longest_edge
        multiple = max(grid.rows, grid.cols, 1)
        if grid != self._grid_at(width, height, multiple * self.tile_size) and grid != TileGrid(0, 0):
            raise ValueError(f"grid {grid.rows}x{grid.cols} is not one this model's processor gives a {width}x{height} image; use grid()")  # fmt: skip
        return multiple * self.tile_size

    def _tile_multiple_size(self, width: int, height: int) -> tuple[int, int]:
        """transformers' `resize_for_vision_encoder`: (width, height) up to multiples of tile_size."""
        tile, aspect = self.tile_size, width / height
        if width >= height:
            width = math.ceil(width / tile) * tile
            height = math.ceil(int(width / aspect) / tile) * tile
        else:
            height = math.ceil(height / tile) * tile
            width = math.ceil(int(height * aspect) / tile) * tile
        return width, height

    # -- views and prompt ----------------------------------------------------------------------------------------
    def views(self, grid: TileGrid, width: int, height: int) -> list[TileView]:
        n = self.tokens_per_view
        tiles = [TileView("tile", n, row, col) for row in range(grid.rows) for col in range(grid.cols)]
        return [*tiles, TileView("global", n)]

    def layout(self, grid: TileGrid, width: int, height: int) -> list[str | int]:
        if grid.n_tiles == 0:
            return [FAKE_TOKEN + GLOBAL_TOKEN, 0, FAKE_TOKEN]
        out: list[str | int] = []
        for row in range(grid.rows):
            for col in range(grid.cols):
                newline = "\n" if row and not col else ""
                out += [f"{newline}{FAKE_TOKEN}<row_{row + 1}_col_{col + 1}>", row * grid.cols + col]
        return [*out, f"\n\n{FAKE_TOKEN}{GLOBAL_TOKEN}", grid.n_tiles, FAKE_TOKEN]

    def prepare_views(self, image: Image.Image, grid: TileGrid) -> list[PreparedImage]:
        width, height = image.size
        longest_edge = self._longest_edge_for(grid, width, height)
        resized = _resize(to_rgb(image), _longest_edge_size(width, height, longest_edge))
        tile = self.tile_size
        if not self.do_image_splitting:
            return [self._prepared(_resize(resized, (tile, tile)))]
        resized = _resize(resized, self._tile_multiple_size(*resized.size))
        if grid.n_tiles == 0:  # one tile already: the image itself is the global view
            return [self._prepared(resized)]
        tiles = [resized.crop((col * tile, row * tile, (col + 1) * tile, (row + 1) * tile)) for row in range(grid.rows) for col in range(grid.cols)]  # fmt: skip
        return [self._prepared(view) for view in (*tiles, _resize(resized, (tile, tile)))]

    def _prepared(self, view: Image.Image) -> PreparedImage:
        side = self.tile_size // self.patch_size
        patches = square_patches(np.asarray(view, dtype=np.uint8), self.patch_size, self)
        return PreparedImage(patches, grid=(1, side, side), merge_size=self.merge_size)

    def describe_range(self) -> str:
        return f"{self.tile_size}-pixel tiles of a {self.longest_edge}-pixel longest edge, at most {self.default_max_tiles} tiles plus a global view"  # fmt: skip

    @classmethod
    def from_preprocessor_config(cls, cfg: Mapping[str, Any], patch_size: int, scale_factor: int) -> Idefics3Tiles:
        """Build from a `preprocessor_config.json` dict of `Idefics3ImageProcessor` / `SmolVLMImageProcessor`; the
        patch size and pixel-shuffle scale factor come from the model's config. Settings this pipeline cannot
        reproduce (a step switched off, a filter other than LANCZOS, size not a longest edge) raise ValueError."""
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if cfg.get(flag, True) is not True:
                raise ValueError(f"preprocessor config {flag}={cfg[flag]!r}: edgevlm's Idefics3 pipeline needs it true")  # fmt: skip
        if cfg.get("resample", LANCZOS) != LANCZOS:
            raise ValueError(f"preprocessor config resample={cfg['resample']!r}: edgevlm's Idefics3 pipeline uses LANCZOS ({LANCZOS}) only")  # fmt: skip
        size, max_size = cfg.get("size") or {"longest_edge": 4 * 364}, cfg.get("max_image_size") or {"longest_edge": 364}  # fmt: skip
        for key, value in (("size", size), ("max_image_size", max_size)):
            if not isinstance(value, Mapping) or not _is_real(value.get("longest_edge")):
                raise ValueError(f"preprocessor config {key}={value!r}: expected {{'longest_edge': pixels}}")
        values: dict[str, Any] = {key: tuple(cfg[key]) for key in ("image_mean", "image_std") if cfg.get(key) is not None}  # fmt: skip
        if cfg.get("rescale_factor") is not None:
            values["rescale_factor"] = cfg["rescale_factor"]
        return cls(tile_size=int(max_size["longest_edge"]), patch_size=patch_size, merge_size=scale_factor,
                   longest_edge=int(size["longest_edge"]), do_image_splitting=bool(cfg.get("do_image_splitting", True)), **values)  # fmt: skip


def _longest_edge_size(width: int, height: int, longest_edge: int) -> tuple[int, int]:
    """(width, height) after transformers' `_resize_output_size_rescale_to_max_len` then
    `_resize_output_size_scale_below_upper_bound` (MAX_IMAGE_SIZE), kept line for line (int() truncates)."""
    if width <= 0 or height <= 0:
        raise ImageError(f"Image size {width}x{height} (width x height) has no pixels; pass a non-empty image.")
    aspect = width / height
    if width >= height:
        width, height = longest_edge, int(longest_edge / aspect)
        height += height % 2
    else:
        width, height = int(longest_edge * aspect), longest_edge
        width += width % 2
    width, height = max(width, 1), max(height, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        width, height = int(MAX_IMAGE_SIZE * aspect), MAX_IMAGE_SIZE
    return max(width, 1), max(height, 1)


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.resize(size, Image.Resampling.LANCZOS)
