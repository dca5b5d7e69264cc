"""Token-budget planning for the tiling kinds (`edgevlm.contract.kinds.tiling`): limits choose each image's tile grid.

A tiling model encodes every tile at one size, so an image's tokens are set by its grid alone. Rules:

- Each image starts at the grid transformers' processor picks (`spec.grid` with no cap), or with at most
  `max_tiles` tiles (the limits' `max_tiles`, or a request's `tiles` = K, whichever is smaller).
- `max_image_tokens` bounds each image's tokens (its views together): the image gets the largest tile cap whose grid
  fits (a bundle's that even the smallest grid exceeds gives the smallest grid; one the caller set is refused). A
  hardware profile's `max_image_tokens` does not bind: profiles write it against the quadratic memory of one resized
  span, while a tiling model's memory follows one tile whatever the grid; profiles bound tiling models with
  `max_tiles` and `image_budget` instead. `image_budget` and the context (n_ctx - prompt tokens - max_new_tokens, the text between an image's views
  counted too) bound all images together: while they do not fit, the image costing the most tokens steps down to its
  next smaller grid. `min_image_tokens` is a floor on that shrinking: an image is not shrunk below the smallest grid
  with at least that many tokens.
- The global view is never dropped: the smallest grid is the scheme's cap of one tile (the global view alone for
  SmolVLM2, one tile for InternVL3, the base image and one tile for AnyRes). When even that does not fit, `BudgetError`
  (a per-image or total budget) or `ContextOverflowError` says what would.
Pure: no I/O; the text between views is counted with the `count_text` the caller gives (its tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .budget import (
    DEFAULT_LAYERS,
    Box,
    BudgetPlan,
    ImageRequest,
    ResolvedLimits,
    SpanPlan,
    VisionTowerSize,
    estimate_activation_bytes,
    estimate_encode_flops,
)
from .contract.kinds.tiling import TiledPreprocessing, TileGrid
from .errors import BudgetError, ContextOverflowError

CountText = Callable[[Sequence[str]], int]  # text tokens of a layout's strings


@dataclass(frozen=True)
class _Image:
    """One image's tiling options, cheapest last: (tile cap, grid, image tokens, text tokens) per distinct grid."""

    index: int
    view: str  # "full" | "crop"
    box: Box
    options: list[tuple[int, TileGrid, int, int]]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the region the scheme tiles."""
        return self.box[2] - self.box[0], self.box[3] - self.box[1]


def count_tiled_spans(requests: Sequence[ImageRequest]) -> int:
    """Image placeholders the prompt needs: one per image (the runtime writes each image's layout in its place)."""
    return len(requests)


def plan_tiled(
    requests: Sequence[ImageRequest],
    spec: TiledPreprocessing,
    limits: ResolvedLimits,
    *,
    n_ctx: int | None = None,
    n_prompt_tokens: int = 0,
    max_new_tokens: int = 0,
    tower: VisionTowerSize | None = None,
    count_text: CountText | None = None,
) -> BudgetPlan:
    """Plan the views of every image (see the module docstring); spans in prompt order, each view its own span."""
    lone = len(requests) == 1 or not spec.tiles_lone_image_only
    images = [_options(i, request, spec, limits, count_text, tiled=lone) for i, request in enumerate(requests)]
    chosen = [_within_image_limit(image, limits) for image in images]
    reasons: list[str | None] = [None if c == 0 else "max_image_tokens" for c in chosen]
    floors = [_floor(image, limits) for image in images]
    room = None if n_ctx is None else n_ctx - n_prompt_tokens - max_new_tokens
    while True:
        tokens = sum(image.options[c][2] for image, c in zip(images, chosen, strict=True))
        text = sum(image.options[c][3] for image, c in zip(images, chosen, strict=True))
        over_budget = limits.image_budget is not None and tokens > limits.image_budget
        if not over_budget and (room is None or tokens + text <= room):
            break
        binding = "image_budget" if over_budget else "context"
        shrinkable = [i for i, image in enumerate(images) if chosen[i] < floors[i]]
        if not shrinkable:
            _refuse(images, chosen, limits, room, n_ctx, n_prompt_tokens, max_new_tokens, binding)
        largest = max(shrinkable, key=lambda i: (images[i].options[chosen[i]][2], -i))
        chosen[largest] += 1
        reasons[largest] = binding
    spans = []
    for image, choice, reason in zip(images, chosen, reasons, strict=True):
        grid = image.options[choice][1]
        if reason is None and grid != spec.grid(*image.size, None if lone else 0):  # capped below the model's own
            reason = "max_tiles"
        spans += _spans(image, grid, spec, reason, tower)
    caps = [cap for cap in (limits.image_budget, room) if cap is not None]
    return BudgetPlan(tuple(spans), limits, min(caps) if caps else None, n_prompt_tokens, max_new_tokens, n_ctx)


def _options(index: int, request: ImageRequest, spec: TiledPreprocessing, limits: ResolvedLimits,
             count_text: CountText | None, *, tiled: bool = True) -> _Image:  # fmt: skip
    """The distinct grids an image can take, from its largest allowed tile cap down to one tile; not `tiled`: its
    untiled view alone (`grid(..., 0)`)."""
    box = request.crop.pixel_box(request.width, request.height) if request.crop else (0, 0, request.width, request.height)  # fmt: skip
    width, height = box[2] - box[0], box[3] - box[1]
    cap = spec.default_max_tiles
    for limit in (limits.max_tiles, request.tiles or None):
        if limit is not None:
            cap = min(cap, limit)
    options: list[tuple[int, TileGrid, int, int]] = []
    for k in range(cap, 0, -1) if tiled else (0,):
        grid = spec.grid(width, height, k)
        if options and grid == options[-1][1]:
            continue
        n_tokens = spec.n_tokens(grid, width, height)
        text = count_text([item for item in spec.layout(grid, width, height) if isinstance(item, str)]) if count_text else 0  # fmt: skip
        options.append((k, grid, n_tokens, text))
    return _Image(index, "crop" if request.crop else "full", box, options)


def _within_image_limit(image: _Image, limits: ResolvedLimits) -> int:
    """The first (largest) option within `max_image_tokens`; when even the smallest is above it, the smallest for a
    bundle's default, BudgetError for a limit the caller set. A profile's does not bind (see the module docstring)."""
    if limits.max_image_tokens is None or dict(limits.sources).get("max_image_tokens") == "profile":
        return 0
    for i, (_, _, n_tokens, _) in enumerate(image.options):
        if n_tokens <= limits.max_image_tokens:
            return i
    if dict(limits.sources).get("max_image_tokens") in DEFAULT_LAYERS:
        return len(image.options) - 1
    smallest = image.options[-1][2]
    width, height = image.size
    raise BudgetError(f"image {image.index + 1} ({width}x{height}) needs at least {smallest} tokens with this model "
                      f"(its smallest tile grid), but {limits.describe('max_image_tokens')}; allow at least {smallest}")  # fmt: skip


def _floor(image: _Image, limits: ResolvedLimits) -> int:
    """The last option the shared budget may shrink the image to: the smallest with >= min_image_tokens tokens."""
    last = len(image.options) - 1
    if limits.min_image_tokens is None:
        return last
    enough = [i for i, (_, _, n_tokens, _) in enumerate(image.options) if n_tokens >= limits.min_image_tokens]
    return max(enough) if enough else 0


def _spans(image: _Image, grid: TileGrid, spec: TiledPreprocessing, limited_by: str | None,
           tower: VisionTowerSize | None) -> list[SpanPlan]:  # fmt: skip
    side = spec.tile_size // spec.patch_size
    out = []
    for view in spec.views(grid, *image.size):
        crops = view.n_crops  # each attends within itself: memory and attention cost grow with crops, not crops²
        out.append(SpanPlan(
            image_index=image.index, view=view.view, box=image.box, resized_size=(spec.tile_size, spec.tile_size),
            grid=(crops, side, side), n_tokens=view.n_tokens, limited_by=limited_by,
            activation_bytes=crops * estimate_activation_bytes(side * side, tower) if tower else None,
            encode_flops=crops * estimate_encode_flops(side * side, tower) if tower else None, tiling=grid, tile=view,
        ))  # fmt: skip
    return out


def _refuse(images: list[_Image], chosen: list[int], limits: ResolvedLimits, room: int | None, n_ctx: int | None,
            n_prompt: int, max_new: int, binding: str) -> None:  # fmt: skip
    tokens = sum(image.options[c][2] for image, c in zip(images, chosen, strict=True))
    text = sum(image.options[c][3] for image, c in zip(images, chosen, strict=True))
    what = (f"{len(images)} image(s) need at least {tokens} tokens at their smallest tile grids"
            + (f" (plus {text} tokens of text between tiles)" if text else ""))  # fmt: skip
    if binding == "context" and room is not None and n_ctx is not None:
        need = tokens + text
        fixes = [f"n_ctx >= {n_prompt + max_new + need}"]
        if n_ctx - n_prompt - need >= 1:
            fixes.insert(0, f"max_tokens <= {n_ctx - n_prompt - need}")
        raise ContextOverflowError(f"{what}, but the context holds {n_ctx}: {n_ctx} - {n_prompt} prompt tokens - "
                                   f"{max_new} max_tokens = {room} left for images. To fit, use {', or '.join(fixes)}, "
                                   "or fewer images.")  # fmt: skip
    raise BudgetError(f"{what}, but {limits.describe('image_budget')} allows {limits.image_budget}. To fit, use "
                      f"image_budget >= {tokens}, or fewer images.")  # fmt: skip
