"""InternVL's tiling (`tiles-internvl`; transformers' `GotOcr2ImageProcessorPil` with `crop_to_patches`, as
`InternVLProcessor` always calls it), numpy and Pillow only.

1. convert to RGB (`to_rgb`);
2. the grid: of the (cols, rows) with min_patches <= cols * rows <= max_patches (listed cols-major, then stably
   sorted by tile count), the one whose aspect ratio cols / rows is closest to the image's; on a tie the later one,
   if the image's area is above half the grid's pixel area;
3. resize the whole image to (cols * tile, rows * tile) with PIL BICUBIC and cut it into tiles, row-major; with more
   than one tile, a thumbnail (the whole image resized to one tile) follows them. One tile is the image resized, no
   thumbnail (the same pixels as `max_patches` = 1, which skips the cropping);
4. rescale and normalize (ImageNet mean and std for InternVL3) as `preprocessing` does, then patchify each view
   row-major, each row (channel, patch row, patch col);
5. the prompt: `<img>`, the views' embeddings one after the other (pixel shuffle 0.5 makes 2x2 patches one token:
   256 per 448 px tile), `</img>`.

A cap on the tiles is the processor's own rule with max_patches = the cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from ...errors import ImageError
from ...images import to_rgb
from .preprocessing import PreparedImage, _check_normalization, _check_reproducible, square_patches
from .registry import check_positive_ints, register
from .tiling import TiledPreprocessing, TileGrid, TileView

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
MAX_PATCHES = 64  # InternVL3 ships 12 (some evaluations use 40); a bundle asking for more is not a model's processor


@register("preprocessing", "tiles-internvl")
@dataclass(frozen=True)
class TilesInternVL(TiledPreprocessing):
    """InternVL3's dynamic tiling: min_patches..max_patches `tile_size` tiles by aspect ratio, plus a thumbnail."""

    tile_size: int = 448
    patch_size: int = 14
    merge_size: int = 2  # 1 / downsample_ratio: the pixel shuffle makes merge_size² patches one token
    min_patches: int = 1
    max_patches: int = 12
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    rescale_factor: float = 1 / 255
    image_start: str = "<img>"  # the text around an image's views in the prompt
    image_end: str = "</img>"

    def __post_init__(self) -> None:
        check_positive_ints(self, "preprocessing", ("tile_size", "patch_size", "merge_size", "min_patches", "max_patches"))  # fmt: skip
        if self.tile_size % self.factor:
            raise ValueError(f"preprocessing tile_size={self.tile_size} is not a multiple of patch_size * merge_size = "
                             f"{self.patch_size} * {self.merge_size}")  # fmt: skip
        if self.max_patches > MAX_PATCHES:
            raise ValueError(f"preprocessing max_patches={self.max_patches}: expected at most {MAX_PATCHES}")
        if self.min_patches > self.max_patches:
            raise ValueError(f"preprocessing min_patches={self.min_patches} is above max_patches={self.max_patches}")
        for key in ("image_start", "image_end"):
            if not getattr(self, key) or not str(getattr(self, key)).strip():
                raise ValueError(f"preprocessing {key}={getattr(self, key)!r}: expected the text of a special token")
        _check_normalization(self)

    @property
    def tile_tokens(self) -> int:
        """Tokens of one view (a tile or the thumbnail)."""
        return (self.tile_size // self.factor) ** 2

    @property
    def default_max_tiles(self) -> int:
        return self.max_patches

    def grid(self, width: int, height: int, max_tiles: int | None = None) -> TileGrid:
        """The processor's grid with max_patches = min(max_tiles, max_patches); one tile (or a cap of 0 or 1) is
        `TileGrid(0, 0)`: the image resized to one view."""
        if width <= 0 or height <= 0:
            raise ImageError(f"Image size {width}x{height} (width x height) has no pixels; pass a non-empty image.")
        if max_tiles is not None and (isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 0):
            raise ValueError(f"max_tiles={max_tiles!r}: expected a non-negative integer or None")
        cap = self.max_patches if max_tiles is None else min(max_tiles, self.max_patches)
        if cap <= 1:  # the processor does not crop at all
            return TileGrid(0, 0)
        cols, rows = optimal_grid(width, height, self.tile_size, self.min_patches, cap)
        return TileGrid(0, 0) if cols * rows == 1 else TileGrid(rows, cols)

    def views(self, grid: TileGrid, width: int, height: int) -> list[TileView]:
        """Tiles row-major, then the thumbnail where there is more than one tile."""
        if grid.n_tiles == 0:
            return [TileView("global", self.tile_tokens)]
        tiles = [TileView("tile", self.tile_tokens, row, col) for row in range(grid.rows) for col in range(grid.cols)]
        return tiles + [TileView("global", self.tile_tokens)] if grid.n_tiles > 1 else tiles

    def prepare_views(self, image: Image.Image, grid: TileGrid) -> list[PreparedImage]:
        rgb = to_rgb(image)
        side = self.tile_size
        if grid.n_tiles == 0:
            return [self._patches(rgb.resize((side, side), Image.Resampling.BICUBIC))]
        resized = rgb.resize((grid.cols * side, grid.rows * side), Image.Resampling.BICUBIC)
        boxes = [(c * side, r * side, (c + 1) * side, (r + 1) * side) for r in range(grid.rows) for c in range(grid.cols)]  # fmt: skip
        views = [self._patches(resized.crop(box)) for box in boxes]
        if grid.n_tiles > 1:  # the thumbnail: the whole image at one tile's size
            views.append(self._patches(rgb.resize((side, side), Image.Resampling.BICUBIC)))
        return views

    def layout(self, grid: TileGrid, width: int, height: int) -> list[str | int]:
        return [self.image_start, *range(len(self.views(grid, width, height))), self.image_end]

    def _patches(self, view: Image.Image) -> PreparedImage:
        """One tile_size x tile_size RGB view normalized and cut into row-major patches."""
        grid = self.tile_size // self.patch_size
        patches = square_patches(np.asarray(view, dtype=np.uint8), self.patch_size, self)
        return PreparedImage(patches, grid=(1, grid, grid), merge_size=self.merge_size)

    @classmethod
    def from_preprocessor_config(cls, cfg: Mapping[str, Any], patch_size: int, merge_size: int) -> TilesInternVL:
        """Build from a `GotOcr2ImageProcessor` `preprocessor_config.json` dict; the patch size and the pixel
        shuffle's merge size come from the model config. `crop_to_patches` is not read: `InternVLProcessor` always
        crops. Settings this pipeline cannot reproduce raise ValueError."""
        _check_reproducible(cfg, "InternVL", ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"))
        size = cfg.get("size", {"height": 448, "width": 448})
        if not isinstance(size, Mapping) or size.get("height") != size.get("width") or size.get("height") is None:
            raise ValueError(f"preprocessor config size={size!r}: edgevlm's InternVL pipeline needs square tiles")
        values: dict[str, Any] = {"tile_size": size["height"], "patch_size": patch_size, "merge_size": merge_size}
        for key in ("min_patches", "max_patches", "rescale_factor"):
            if cfg.get(key) is not None:
                values[key] = cfg[key]
        for key in ("image_mean", "image_std"):
            if cfg.get(key) is not None:
                values[key] = tuple(cfg[key])
        return cls(**values)


@lru_cache(maxsize=256)
def optimal_grid(width: int, height: int, tile_size: int, min_patches: int, max_patches: int) -> tuple[int, int]:
    """(cols, rows) as transformers' `get_optimal_tiled_canvas`: the closest aspect ratio; on a tie the grid listed
    later, while the image's area is above half the grid's. (1, 1) where no grid has min..max tiles."""
    grids = sorted(
        ((cols, rows) for cols in range(1, max_patches + 1) for rows in range(1, max_patches + 1)
         if min_patches <= cols * rows <= max_patches),
        key=lambda g: g[0] * g[1],
    )  # fmt: skip
    aspect_ratio, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best
