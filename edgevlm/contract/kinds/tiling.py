"""Tiling preprocessing: an image cut into fixed-size tiles plus a global view, as SmolVLM2 (Idefics3), InternVL3 and
LLaVA-OneVision (AnyRes) do it.

Every tile costs the same number of tokens, so what a budget chooses is the tile grid, not a resolution. A tiling
kind (one class per scheme, registered as `tiles-<scheme>`, subclassing `TiledPreprocessing`) says, for an image of a
given size and a cap on its tiles:

- `grid`: the rows x cols of tiles the model's own processor picks (with the cap: the largest grid it would pick
  within it); `TileGrid(0, 0)` where the scheme encodes the global view alone;
- `views`: what the vision graph encodes, in prompt order, each with its token count (a tile, or the global view;
  a scheme that merges several tiles into one embedding span, like AnyRes, makes that one view);
- `prepare_views`: those views as `PreparedImage`s, pixel-identical to transformers' processor;
- `layout`: what replaces the image's placeholder in the prompt: text (special tokens spelled out, tokenized with
  special-token parsing) and the indices of the views whose embeddings go there.

The runtime does the rest the same way for every scheme (`edgevlm.runtimes.spans`): each view is its own image
span, the layout's text becomes text spans between them, and the planner (`edgevlm.budget.plan_tiled`) lowers the
tile cap of the largest images until the token limits hold, never below the global view.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

from PIL import Image

from .preprocessing import PreparedImage, SingleViewPreprocessing
from .registry import Section


@dataclass(frozen=True)
class TileGrid:
    """Rows and columns of tiles; (0, 0): the global view alone (an image the scheme does not split)."""

    rows: int
    cols: int

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class TileView:
    """One thing the vision graph encodes: a tile at (row, col) of the grid (0-based), or the global view."""

    view: str  # "tile" | "global" | a scheme's own name for a merged view ("anyres")
    n_tokens: int  # embedding rows it becomes
    row: int | None = None
    col: int | None = None
    n_crops: int = 1  # tile-size crops the graph takes for it (AnyRes' merged view: all its tiles)


class TiledPreprocessing(Section):
    """Base of the tiling kinds (see the module docstring). Subclasses are frozen dataclasses of the scheme's
    parameters (`tile_size`, `patch_size`, `merge_size`, normalization, the processor's own tile cap, ...)."""

    tile_size: int  # pixels per tile side
    patch_size: int
    merge_size: int  # patches per token side (a pixel shuffle of 2 makes 2x2 patches one token)

    @property
    def factor(self) -> int:
        """Pixels per token side."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values per row of a view's `PreparedImage.pixel_patches`: channels * patch_size²."""
        return 3 * self.patch_size**2

    @property
    @abstractmethod
    def default_max_tiles(self) -> int:
        """The most tiles the model's own processor cuts an image into."""

    @abstractmethod
    def grid(self, width: int, height: int, max_tiles: int | None = None) -> TileGrid:
        """The grid transformers' processor picks for a width x height image; with `max_tiles`, the grid it picks
        when allowed at most that many tiles (never above `default_max_tiles`). Deterministic; a smaller cap never
        gives more tokens (`views`)."""

    @abstractmethod
    def views(self, grid: TileGrid, width: int, height: int) -> list[TileView]:
        """What the vision graph encodes for an image cut into `grid`, in prompt order."""

    @abstractmethod
    def prepare_views(self, image: Image.Image, grid: TileGrid) -> list[PreparedImage]:
        """The `views` of `image` ready for the vision graph (RGB conversion, resize, crops, normalization and
        patches exactly as transformers' processor)."""

    @abstractmethod
    def layout(self, grid: TileGrid, width: int, height: int) -> list[str | int]:
        """The image's prompt in its placeholder's place: text and, as ints, indices into `views`, in order."""

    def n_tokens(self, grid: TileGrid, width: int, height: int) -> int:
        """Embedding rows of the image (text between views not counted)."""
        return sum(view.n_tokens for view in self.views(grid, width, height))

    def token_range(self) -> tuple[int, int]:
        """(tokens of a global view alone, tokens at the most tiles): the range limits are checked against."""
        tile = (self.tile_size // self.factor) ** 2
        return tile, tile * (self.default_max_tiles + 1)

    def describe_range(self) -> str:
        return f"{self.tile_size}-pixel tiles, at most {self.default_max_tiles} tiles plus a global view"


# Every preprocessing kind a manifest may name: one view per image span (`preprocessing`), or tiles.
Preprocessing = SingleViewPreprocessing | TiledPreprocessing
