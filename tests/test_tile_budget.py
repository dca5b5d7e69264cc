"""Token budgets of tiling models (`edgevlm.tile_budget`): the limits pick each image's tile grid.

Run on a small grid scheme defined here (a tile grid by `budget.tile_grid` plus a global view, text before every
view); the tiling families' suites check their own schemes against transformers, and `test_registered_schemes_*`
runs the same properties on every registered tiling kind at its published defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevlm.budget import BudgetLimits, Crop, ImageRequest, resolve_limits
from edgevlm.contract.kinds import known_kinds, strategy_class
from edgevlm.contract.kinds.preprocessing import PreparedImage
from edgevlm.contract.kinds.tiling import TiledPreprocessing, TileGrid, TileView
from edgevlm.errors import BudgetError, ContextOverflowError
from edgevlm.tile_budget import plan_tiled


@dataclass(frozen=True)
class GridScheme(TiledPreprocessing):
    """Tiles of 32 pixels (4 tokens each), ceil(side / 32) per side, the longer count lowered first to fit the cap;
    then the global view; not split when one tile."""

    tile_size: int = 32
    patch_size: int = 8
    merge_size: int = 2
    max_tiles: int = 9

    @property
    def default_max_tiles(self) -> int:
        return self.max_tiles

    def grid(self, width: int, height: int, max_tiles: int | None = None) -> TileGrid:
        cap = min(self.max_tiles, max_tiles or self.max_tiles)
        rows, cols = math.ceil(height / self.tile_size), math.ceil(width / self.tile_size)
        while rows * cols > cap:
            rows, cols = (rows, cols - 1) if cols >= rows else (rows - 1, cols)
        return TileGrid(0, 0) if rows * cols == 1 else TileGrid(rows, cols)

    def views(self, grid: TileGrid, width: int, height: int) -> list[TileView]:
        per_tile = (self.tile_size // self.factor) ** 2
        tiles = [TileView("tile", per_tile, r, c) for r in range(grid.rows) for c in range(grid.cols)]
        return [*tiles, TileView("global", per_tile)]

    def prepare_views(self, image, grid: TileGrid) -> list[PreparedImage]:
        raise NotImplementedError("planning only")

    def layout(self, grid: TileGrid, width: int, height: int) -> list[str | int]:
        views = self.views(grid, width, height)
        out: list[str | int] = []
        for i, view in enumerate(views):
            out += [f"<{view.view} {view.row},{view.col}>", i]
        return out


SCHEME = GridScheme()
PER_VIEW_TEXT = 3  # tokens `count_text` charges for each layout string


def count_text(texts) -> int:
    return PER_VIEW_TEXT * len(texts)


def plan(requests, scheme=SCHEME, **kwargs):
    limits = kwargs.pop("limits", BudgetLimits())
    return plan_tiled(requests, scheme, resolve_limits(request=limits), count_text=count_text, **kwargs)


def image_tokens(result, index):
    return sum(span.n_tokens for span in result.spans if span.image_index == index)


def test_without_limits_each_image_gets_the_schemes_own_grid():
    result = plan([ImageRequest(100, 60), ImageRequest(20, 20)])
    assert result.spans[0].tiling == SCHEME.grid(100, 60) == TileGrid(2, 4)
    assert [s.view for s in result.spans] == ["tile"] * 8 + ["global", "global"]
    assert [s.n_tokens for s in result.spans] == [4] * 10
    assert all(s.limited_by is None for s in result.spans)


def test_max_image_tokens_picks_the_largest_grid_that_fits():
    result = plan([ImageRequest(100, 60)], limits=BudgetLimits(max_image_tokens=20))
    assert result.spans[0].tiling == TileGrid(2, 2) and image_tokens(result, 0) == 4 * 4 + 4
    result = plan([ImageRequest(100, 60)], limits=BudgetLimits(max_image_tokens=12))
    assert result.spans[0].tiling.n_tiles == 2 and result.spans[0].limited_by == "max_image_tokens"
    with pytest.raises(BudgetError, match="needs at least 4 tokens"):
        plan([ImageRequest(100, 60)], limits=BudgetLimits(max_image_tokens=3))
    default = plan_tiled([ImageRequest(100, 60)], SCHEME, resolve_limits(bundle=BudgetLimits(max_image_tokens=3)))
    assert default.spans[0].tiling == TileGrid(0, 0)  # a default limit below the smallest grid: the smallest grid


def test_max_tiles_and_request_tiles_cap_the_grid():
    assert plan([ImageRequest(100, 60)], limits=BudgetLimits(max_tiles=2)).spans[0].tiling.n_tiles == 2
    result = plan([ImageRequest(100, 60, tiles=4)])
    assert result.spans[0].tiling.n_tiles == 4 and result.spans[0].limited_by == "max_tiles"


def test_shared_budget_shrinks_the_largest_image_first_and_keeps_global_views():
    result = plan([ImageRequest(100, 100), ImageRequest(64, 32)], limits=BudgetLimits(image_budget=30))
    assert result.n_image_tokens <= 30
    assert {s.view for s in result.spans if s.image_index == 0} >= {"global"}
    assert result.spans[-1].tiling == TileGrid(1, 2)  # the small image kept its grid
    assert {s.limited_by for s in result.spans if s.image_index == 0} == {"image_budget"}
    with pytest.raises(BudgetError, match="image_budget"):
        plan([ImageRequest(100, 100), ImageRequest(64, 32)], limits=BudgetLimits(image_budget=7))


def test_context_counts_the_text_between_views():
    result = plan([ImageRequest(100, 60)], n_ctx=100, n_prompt_tokens=20, max_new_tokens=30)
    views = len(result.spans)
    assert result.n_image_tokens + PER_VIEW_TEXT * views <= 50
    with pytest.raises(ContextOverflowError, match="n_ctx >= "):
        plan([ImageRequest(100, 60)], n_ctx=52, n_prompt_tokens=20, max_new_tokens=30)


def test_crop_comes_before_tiling():
    result = plan([ImageRequest(400, 300, crop=Crop(0, 0, 64, 32))])
    assert result.spans[0].tiling == TileGrid(1, 2) and result.spans[0].box == (0, 0, 64, 32)


sizes = st.tuples(st.integers(1, 4000), st.integers(1, 4000))


@settings(max_examples=150, deadline=None)
@given(images=st.lists(sizes, min_size=1, max_size=4), max_image=st.none() | st.integers(1, 60),
       budget=st.none() | st.integers(1, 200), max_tiles=st.none() | st.integers(1, 12),
       n_ctx=st.none() | st.integers(1, 400))  # fmt: skip
def test_a_plan_never_exceeds_its_limits(images, max_image, budget, max_tiles, n_ctx):
    limits = BudgetLimits(max_image_tokens=max_image, image_budget=budget, max_tiles=max_tiles)
    requests = [ImageRequest(w, h) for w, h in images]
    try:
        result = plan(requests, limits=limits, n_ctx=n_ctx, n_prompt_tokens=10, max_new_tokens=10)
    except (BudgetError, ContextOverflowError):
        return
    assert {s.image_index for s in result.spans} == set(range(len(images)))  # no image dropped
    for index, (w, h) in enumerate(images):
        views = [s for s in result.spans if s.image_index == index]
        assert views[-1].view == "global"  # the global view is never dropped
        assert max_image is None or image_tokens(result, index) <= max_image
        assert max_tiles is None or views[0].tiling.n_tiles <= max_tiles
        assert views[0].tiling.n_tiles <= SCHEME.grid(w, h).n_tiles
    assert budget is None or result.n_image_tokens <= budget
    assert n_ctx is None or result.n_image_tokens + PER_VIEW_TEXT * len(result.spans) <= n_ctx - 20


def registered_schemes() -> list[TiledPreprocessing]:
    classes = [strategy_class("preprocessing", kind) for kind in known_kinds("preprocessing")]
    return [cls() for cls in classes if issubclass(cls, TiledPreprocessing)]


@pytest.mark.parametrize("scheme", registered_schemes(), ids=lambda s: s.kind)
@settings(max_examples=60, deadline=None)
@given(size=sizes, max_image=st.none() | st.integers(1, 20000), max_tiles=st.none() | st.integers(1, 40))
def test_registered_schemes_plans_keep_limits_and_shrink_monotonically(scheme, size, max_image, max_tiles):
    """Every tiling kind at its published defaults: a smaller tile cap never costs more tokens, and plans keep the
    per-image limits."""
    width, height = size
    costs = [scheme.n_tokens(scheme.grid(width, height, k), width, height) for k in range(1, scheme.default_max_tiles + 1)]  # fmt: skip
    assert costs == sorted(costs)
    limits = BudgetLimits(max_image_tokens=max_image, max_tiles=max_tiles)
    try:
        result = plan_tiled([ImageRequest(width, height)], scheme, resolve_limits(request=limits))
    except BudgetError:
        assert max_image is not None and max_image < costs[0]
        return
    assert max_image is None or result.n_image_tokens <= max_image
    assert result.spans[0].tiling.n_tiles <= min(max_tiles or 10**9, scheme.default_max_tiles)
