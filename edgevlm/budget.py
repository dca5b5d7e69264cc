"""Token-budget planning: how many visual tokens each image may cost, decided from image sizes alone.

Pure functions, no I/O: `plan_images` takes image sizes (with an optional crop or tiling each), the limits and the
context, and returns a `BudgetPlan` that says, for every image span the language model will see, which region of
which image it shows, the (height, width) it is resized to, its patch grid, its token count and the estimated
memory and compute of encoding it. The runtime resizes exactly as planned, so the plan is known before decoding.

Rules (a token covers factor x factor pixels: factor = patch_size * merge_size; the preprocessing spec of the
bundle's `kind` gives the model's own resize and token range, see `edgevlm.contract.kinds.preprocessing`):

- Per span, tokens lie in [lo, hi]: lo = max(min_image_tokens, the model's minimum (Qwen2-VL:
  ceil(min_pixels / factor²))), hi = max_image_tokens (none: unbounded) or the span's share of the total,
  whichever is smaller.
- Limits outside the model's own range are refused when a request or the caller set them (cli); the hardware
  profile's and the bundle's limits are defaults written for any model, so they are moved into the range. A
  fixed-size model (`fixed-resize`: every image is 576 tokens for LLaVA-1.5) thus plans every span at its one size: the
  profile's cap of 256 tokens does not shrink it, an explicit `max_image_tokens=256` is an error, and images that
  do not fit the context or the image budget are refused, never shrunk.
- A span whose model resize (`native_size`, e.g. `smart_resize` with the preprocessor's own min/max pixels) has a
  token count in [lo, hi] keeps that resize exactly: when no limit binds, the plan is the model's own
  preprocessing.
- Otherwise the span is scaled, aspect ratio kept, to the limit it crossed and each side is rounded down or up to
  whole tokens, keeping the rounding inside [lo, hi] with the most tokens (the fewest when growing to lo). Where no
  rounding fits (near the 200:1 aspect limit a side bottoms out at one token, and smart_resize itself would
  overshoot any cap), the grid inside [lo, hi] whose aspect ratio is closest to the image's is used: a documented
  clamp; the token limits always win over the aspect ratio.
- Several spans share cap = min(image_budget, n_ctx - prompt tokens - max_new_tokens). If their unconstrained
  token counts exceed it, the cap is split by source area (water-filling: each span gets lambda * area, clamped
  to [lo, its unconstrained count], with the largest lambda that fits), so no span goes below lo. When even lo per
  span does not fit, `BudgetError` (image budget) or `ContextOverflowError` (context) says what would.
- Aspect ratios above the model's limit (200:1) raise `ImageError` (from `smart_resize`): crop such strips first.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from .errors import BudgetError, ContextOverflowError

if TYPE_CHECKING:  # the contract reads the budget section: the strategies it reads come after it
    from .contract.kinds.tiling import Preprocessing, TileGrid, TileView

LIMIT_LAYERS = ("request", "cli", "profile", "bundle")  # highest precedence first
DEFAULT_LAYERS = ("profile", "bundle")  # limits written for any model: moved into a model's own range, not refused
DEFAULT_MAX_IMAGE_TOKENS = 1024  # what `edgevlm export` writes into a bundle's `budget` section
# Assumed sustained fp32 throughput of the vision graph for encode-time estimates; a hardware profile will set
# the real one. Measured with the 2B tower on 2 cores of an AVX-512 Xeon: 205-236 GFLOP/s (benchmarks/
# bench_budget.py; small test towers reach only 20-40, their matrices are too small to keep the cores busy).
DEFAULT_VISION_GFLOPS = 200.0

_UNBOUNDED = 1 << 62  # "no max_image_tokens": fit_resize never asks for more than the model's own maximum anyway
Box = tuple[int, int, int, int]  # (left, top, right, bottom) in source pixels, right/bottom exclusive


# --------------------------------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class BudgetLimits:
    """Token limits for the images of one request; None leaves a limit to a lower-precedence layer.

    `max_image_tokens`/`min_image_tokens` bound each image span (a tiling model's image: all its views);
    `image_budget` bounds the sum over all spans of a request (tiles and the global view included); `max_tiles` caps
    the tiles of an image (a tiling model's grid, or a request's `tiles`).
    """

    max_image_tokens: int | None = None
    min_image_tokens: int | None = None
    image_budget: int | None = None
    # added after bundles were written: left out of their JSON when None (as the manifest's OMIT_DEFAULT fields), so
    # their budget sections stay as they were
    max_tiles: int | None = dataclasses.field(default=None, metadata={"unit": "tiles", "omit_default": True})

    def __post_init__(self) -> None:
        for field in fields(BudgetLimits):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                unit = field.metadata.get("unit", "tokens")
                raise BudgetError(f"{field.name}={value!r}: expected a positive whole number of {unit}, or none")
            object.__setattr__(self, field.name, int(value))
        if self.min_image_tokens and self.max_image_tokens and self.min_image_tokens > self.max_image_tokens:
            raise BudgetError(
                f"min_image_tokens={self.min_image_tokens} is above max_image_tokens={self.max_image_tokens}; "
                "lower the minimum or raise the maximum"
            )

    def to_dict(self) -> dict[str, int | None]:
        return {field.name: getattr(self, field.name) for field in fields(BudgetLimits)
                if getattr(self, field.name) is not None or not field.metadata.get("omit_default")}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "budget") -> BudgetLimits:
        """Read `to_dict` output (a manifest's or profile's `budget` section); unknown keys are an error naming them."""
        data = dict(data or {})
        known = [field.name for field in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise BudgetError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}")
        return cls(**data)


@dataclass(frozen=True)
class ResolvedLimits(BudgetLimits):
    """The limits in force, with the layer each came from (`sources`: limit name -> "request" | "cli" | ...)."""

    sources: tuple[tuple[str, str], ...] = ()

    def describe(self, name: str) -> str:
        """`name=value (layer)`, e.g. "max_image_tokens=1024 (bundle)"."""
        return f"{name}={getattr(self, name)} ({dict(self.sources).get(name, 'default')})"


def resolve_limits(
    *,
    request: BudgetLimits | None = None,
    cli: BudgetLimits | None = None,
    profile: BudgetLimits | None = None,
    bundle: BudgetLimits | None = None,
) -> ResolvedLimits:
    """Merge the layers limit by limit; precedence request > cli > profile > bundle (`LIMIT_LAYERS`).

    `cli` is what the process was started with (`edgevlm run` flags, `edgevlm.load(...)` arguments); `request` is
    one call (`generate(...)` arguments, a server request's fields). A minimum above the maximum of a lower layer
    lifts that maximum; above a maximum of its own or a higher layer, it raises `BudgetError` naming both layers.
    """
    layers = dict(zip(LIMIT_LAYERS, (request, cli, profile, bundle), strict=True))
    values: dict[str, int | None] = {}
    sources: list[tuple[str, str]] = []
    for field in fields(BudgetLimits):
        values[field.name] = None
        for layer_name, layer in layers.items():
            value = getattr(layer, field.name) if layer is not None else None
            if value is not None:
                values[field.name] = value
                sources.append((field.name, layer_name))
                break
    low, high = values["min_image_tokens"], values["max_image_tokens"]
    where = dict(sources)
    if low is not None and high is not None and low > high and _outranks(where["min_image_tokens"], where["max_image_tokens"]):  # fmt: skip
        # a minimum asked for explicitly lifts a default maximum of a lower layer (`--min-image-tokens 1000` on a
        # profile that caps images at 256): the maximum becomes the minimum, noted as coming from that layer
        values["max_image_tokens"] = high = low
        sources = [(name, layer) for name, layer in sources if name != "max_image_tokens"]
        sources.append(("max_image_tokens", where["min_image_tokens"]))
    if low is not None and high is not None and low > high:
        raise BudgetError(
            f"min_image_tokens={low} (from {where['min_image_tokens']}) is above max_image_tokens={high} "
            f"(from {where['max_image_tokens']}); lower the minimum or raise the maximum"
        )
    return ResolvedLimits(**values, sources=tuple(sources))


def _outranks(layer: str, other: str) -> bool:
    return LIMIT_LAYERS.index(layer) < LIMIT_LAYERS.index(other)


# --------------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Crop:
    """A region of interest: (left, top, right, bottom) in pixels, or in fractions of the width/height if `relative`.

    A pixel box reaching past the image is clipped to it; a box with nothing left inside the image is an error.
    """

    left: float
    top: float
    right: float
    bottom: float
    relative: bool = False

    def __post_init__(self) -> None:
        box = (self.left, self.top, self.right, self.bottom)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in box):
            raise BudgetError(f"crop box {box!r}: expected four finite numbers (left, top, right, bottom)")
        if self.right <= self.left or self.bottom <= self.top:
            raise BudgetError(f"crop box {box!r}: right must be > left and bottom > top")
        if self.relative and not all(0 <= v <= 1 for v in box):
            raise BudgetError(f"relative crop box {box!r}: values must lie in [0, 1]")

    @classmethod
    def parse(cls, text: str) -> Crop:
        """`"left,top,right,bottom"`; when all four values lie in [0, 1] they are fractions, otherwise pixels."""
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            values = []
        if len(values) != 4:
            raise BudgetError(f"crop {text!r}: expected left,top,right,bottom (pixels, or fractions in [0, 1])")
        return cls(*values, relative=all(0 <= v <= 1 for v in values))

    def pixel_box(self, width: int, height: int) -> Box:
        """The crop as whole pixels inside a width x height image (outward rounding, clipped to the image)."""
        scale_x, scale_y = (width, height) if self.relative else (1, 1)
        left = max(0, math.floor(self.left * scale_x))
        top = max(0, math.floor(self.top * scale_y))
        right = min(width, math.ceil(self.right * scale_x))
        bottom = min(height, math.ceil(self.bottom * scale_y))
        if right <= left or bottom <= top:
            raise BudgetError(
                f"crop box ({self.left:g}, {self.top:g}, {self.right:g}, {self.bottom:g}) lies outside the "
                f"{width}x{height} image (width x height); give a box inside it"
            )
        return left, top, right, bottom


@dataclass(frozen=True)
class ImageRequest:
    """One input image as the planner sees it: its size (after EXIF orientation), and how to spend tokens on it.

    `tiles` = 0 encodes the (cropped) image once; K >= 1 encodes a low-resolution global view plus up to K tiles
    at up to full resolution, each its own image span (see `tile_grid`).
    """

    width: int
    height: int
    crop: Crop | None = None
    tiles: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise BudgetError(f"image {name}={value!r}: expected a positive number of pixels")
        if isinstance(self.tiles, bool) or not isinstance(self.tiles, numbers.Integral) or self.tiles < 0:
            raise BudgetError(f"tiles={self.tiles!r}: expected 0 (no tiling) or the most tiles per image, K >= 1")


def tile_grid(width: int, height: int, max_tiles: int, factor: int) -> tuple[int, int]:
    """(rows, cols) of at most `max_tiles` equal tiles covering a width x height region.

    Picks the grid with the most tiles per unit of tile elongation (n / max(aspect, 1/aspect)): a 4:3 photo gets
    2x2 for K = 4 or 5, 1x3 for K = 3. Tiles narrower than `factor` pixels (one token) are not considered; ties go
    to more tiles, then fewer rows.
    """
    best, best_key = (1, 1), None
    for rows in range(1, max_tiles + 1):
        for cols in range(1, max_tiles // rows + 1):
            tile_w, tile_h = width / cols, height / rows
            if rows * cols > 1 and min(tile_w, tile_h) < factor:
                continue
            elongation = max(tile_w / tile_h, tile_h / tile_w)
            key = (-(rows * cols) / elongation, -(rows * cols), rows)
            if best_key is None or key < best_key:
                best, best_key = (rows, cols), key
    return best


@dataclass(frozen=True)
class _Region:
    image_index: int
    view: str  # "full" | "crop" | "global" | "tile"
    box: Box
    weight: float  # share of the total by area; a global view counts as one tile

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in source pixels."""
        return self.box[3] - self.box[1], self.box[2] - self.box[0]


def pan_and_scan_boxes(box: Box, max_crops: int, min_crop_size: int, min_ratio: float) -> list[Box]:
    """Gemma 3's pan-and-scan crops of a region (transformers' `Gemma3ImageProcessor.pan_and_scan`): a region at
    least `min_ratio` times wider than high (or higher than wide) is cut along its long side into
    clamp(round(ratio), 2, max_crops) crops of ceil(side / n) pixels (the last one cut by the edge), none smaller than
    `min_crop_size`; otherwise no crops."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    long, short = max(width, height), min(width, height)
    if long / short < min_ratio:
        return []
    n = min(max_crops, max(2, min(math.floor(long / min_crop_size), math.floor(long / short + 0.5))))
    cols, rows = (n, 1) if width >= height else (1, n)
    crop_w, crop_h = math.ceil(width / cols), math.ceil(height / rows)
    if n < 2 or min(crop_w, crop_h) < min_crop_size:  # one crop would repeat the region's own view
        return []
    boxes = [(left + c * crop_w, top + r * crop_h, min(right, left + (c + 1) * crop_w), min(bottom, top + (r + 1) * crop_h))
             for r in range(rows) for c in range(cols)]  # fmt: skip
    return [b for b in boxes if b[2] > b[0] and b[3] > b[1]]  # ceil can leave nothing for the last crop


def _tile_boxes(box: Box, max_tiles: int, spec: Preprocessing) -> list[Box]:
    """The tiles of a region: the spec's own crops where its `tiling` is "pan-and-scan", else `tile_grid`'s."""
    if getattr(spec, "tiling", "grid") == "pan-and-scan":
        return pan_and_scan_boxes(box, min(max_tiles, spec.pan_and_scan_max_crops), spec.pan_and_scan_min_crop_size,
                                  spec.pan_and_scan_min_ratio)  # fmt: skip
    left, top, right, bottom = box
    rows, cols = tile_grid(right - left, bottom - top, max_tiles, spec.factor)
    if rows * cols == 1:
        return []
    xs = [left + round(i * (right - left) / cols) for i in range(cols + 1)]
    ys = [top + round(i * (bottom - top) / rows) for i in range(rows + 1)]
    return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(rows) for c in range(cols)]


def _regions(request: ImageRequest, image_index: int, spec: Preprocessing) -> list[_Region]:
    box = request.crop.pixel_box(request.width, request.height) if request.crop else (0, 0, request.width, request.height)  # fmt: skip
    view = "crop" if request.crop else "full"
    left, top, right, bottom = box
    area = float((right - left) * (bottom - top))
    boxes = _tile_boxes(box, request.tiles, spec) if request.tiles else []
    if not boxes:  # no tiling, or one tile: the region itself (a global view would repeat it)
        return [_Region(image_index, view, box, area)]
    tiles = [_Region(image_index, "tile", b, float((b[2] - b[0]) * (b[3] - b[1]))) for b in boxes]
    return [_Region(image_index, "global", box, area / len(boxes)), *tiles]


def count_spans(requests: Sequence[ImageRequest], spec: Preprocessing) -> int:
    """How many image spans the prompt needs for `requests` (tiling adds spans); independent of the limits."""
    return sum(len(_regions(request, i, spec)) for i, request in enumerate(requests))


# --------------------------------------------------------------------------------------------------- one span


def n_tokens_of(resized_size: tuple[int, int], factor: int) -> int:
    """Visual tokens of an image resized to (height, width), both multiples of `factor`."""
    return (resized_size[0] // factor) * (resized_size[1] // factor)


def model_token_range(spec: Preprocessing) -> tuple[int, int]:
    """The model's own (min, max) tokens per image (Qwen2-VL: from its preprocessor's min_pixels and max_pixels)."""
    return spec.token_range()


def fit_resize(height: int, width: int, spec: Preprocessing, min_tokens: int, max_tokens: int) -> tuple[int, int]:  # fmt: skip
    """The (height, width) a height x width region is resized to with min_tokens <= tokens <= max_tokens.

    The model's own resize when it is inside the window. Otherwise the region is scaled, aspect ratio kept, to the
    limit it crossed (max_tokens when too large, min_tokens when too small) and each side is rounded down or up
    to whole tokens: of the four roundings inside the window, the one with the most tokens (fewest when growing),
    then the closest aspect ratio. When no rounding fits (a side below one token), the closest-aspect grid inside
    the window (`_closest_grid`).
    """
    if not 1 <= min_tokens <= max_tokens:
        raise BudgetError(f"token window [{min_tokens}, {max_tokens}] is empty; the minimum must be <= the maximum")
    factor = spec.factor
    native = spec.native_size(height, width)  # Qwen2-VL's raises beyond 200:1
    native_tokens = n_tokens_of(native, factor)
    if min_tokens <= native_tokens <= max_tokens:
        return native
    growing = native_tokens < min_tokens
    scale = math.sqrt((min_tokens if growing else max_tokens) * factor**2 / (height * width))
    rows, cols = height * scale / factor, width * scale / factor
    roundings = {(max(1, r(rows)), max(1, c(cols))) for r in (math.floor, math.ceil) for c in (math.floor, math.ceil)}
    inside = [(r, c) for r, c in roundings if min_tokens <= r * c <= max_tokens]
    if inside:
        best = min(inside, key=lambda g: ((g[0] * g[1]) if growing else -(g[0] * g[1]), _distortion(g, width / height), g))  # fmt: skip
    else:  # the model never wants more than its maximum, which also bounds the search
        best = _closest_grid(width / height, min_tokens, min(max_tokens, max(min_tokens, model_token_range(spec)[1])))
    return best[0] * factor, best[1] * factor


def _distortion(grid: tuple[int, int], aspect: float) -> float:
    return abs(math.log(grid[1] / grid[0] / aspect))


def _closest_grid(aspect: float, min_tokens: int, max_tokens: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols in [min_tokens, max_tokens] whose cols / rows is closest to `aspect` (w / h);
    ties go to more tokens, then fewer rows. Rows beyond sqrt(max / aspect) + 1 only get worse, so the search stops."""
    best, best_key = (1, min_tokens), None
    for rows in range(1, min(max_tokens, math.isqrt(int(max_tokens / aspect)) + 2) + 1):
        low, high = -(-min_tokens // rows), max_tokens // rows
        if low > high:
            continue
        for cols in {min(high, max(low, math.floor(rows * aspect))), min(high, max(low, math.ceil(rows * aspect)))}:
            key = (_distortion((rows, cols), aspect), -rows * cols, rows)
            if best_key is None or key < best_key:
                best, best_key = (rows, cols), key
    return best


# --------------------------------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class VisionTowerSize:
    """The sizes of a ViT vision tower + patch merger that encode-cost estimates need (from the manifest)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_dim: int  # values per input patch, channels * temporal_patch_size * patch_size²
    merge_size: int
    out_dim: int  # the language model's hidden size
    bytes_per_value: int = 4  # 4 for the fp32 and int8 graphs (activations stay fp32), 2 for fp16


def estimate_encode_flops(n_patches: int, tower: VisionTowerSize) -> float:
    """Floating-point operations (multiply-add = 2) of encoding one image of `n_patches` patches.

    patch embedding 2·n·p·d; per block: qkv, proj and MLP matmuls 2·n·d²·(4 + 2·mlp_ratio) plus full attention
    (QKᵀ and AV) 4·n²·d; merger 2·n·d·(m²·d + out_dim). Attention makes it grow with n², so with tokens².
    """
    n, d, m = n_patches, tower.embed_dim, tower.merge_size
    per_block = 2 * n * d * d * (4 + 2 * tower.mlp_ratio) + 4 * n * n * d
    return 2 * n * tower.patch_dim * d + tower.depth * per_block + 2 * n * d * (m * m * d + tower.out_dim)


def estimate_activation_bytes(n_patches: int, tower: VisionTowerSize) -> int:
    """Peak working memory of encoding one image of `n_patches` patches, weights not included.

    The graph materializes full attention (heads x n x n floats per buffer), which dominates for large images,
    plus per-patch activations and the input patches (n·p):
    bytes = bytes_per_value · (5·heads·n² + 48·d·n + n·p).
    The coefficients are fitted to onnxruntime 1.32 on CPU in its steady state for repeated images of one size
    (its memory pattern, on by default, is built from the 2nd run of a shape when no other shape came first, and
    roughly doubles the peak): measured growth of peak RSS 0.53 / 6.0 GiB for the 2B tower at 1008 / 4032 patches
    and 1.1 / 4.3 GiB for the tiny test tower at 4032 / 8100; the formula gives 0.96-1.16x those. A first run of a
    shape, or `SessionOptions.enable_mem_pattern = False` (measured no slower), peaks at about 55-60%.
    """
    n = n_patches
    values = 5 * tower.num_heads * n * n + 48 * tower.embed_dim * n + tower.patch_dim * n
    return int(tower.bytes_per_value * values)


def vision_tower_size(manifest: Any, vision_dtype: str | None = None) -> VisionTowerSize | None:
    """The tower sizes a bundle manifest records, or None for bundles exported before edgevlm recorded them."""
    vision = manifest.vision
    if None in (vision.embed_dim, vision.depth, vision.num_heads, vision.mlp_ratio):
        return None
    spec = manifest.preprocessing
    return VisionTowerSize(
        embed_dim=vision.embed_dim,
        depth=vision.depth,
        num_heads=vision.num_heads,
        mlp_ratio=vision.mlp_ratio,
        patch_dim=spec.patch_dim,
        merge_size=spec.merge_size,
        out_dim=vision.embedding_dim,
        bytes_per_value=2 if (vision_dtype or vision.default) == "fp16" else 4,
    )


# --------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class SpanPlan:
    """One image span the language model sees: a region of a source image, resized for the vision encoder."""

    image_index: int  # which input image
    view: str  # "full" | "crop" | "global" (the whole region, low resolution, before its tiles) | "tile"
    box: Box  # (left, top, right, bottom) of the region in the source image, pixels
    resized_size: tuple[int, int]  # (height, width) handed to `preprocess(..., resized_size=...)` (`contract.kinds.preprocessing`)
    grid: tuple[int, int, int]  # (t, h, w) in patches, like transformers' image_grid_thw
    n_tokens: int
    limited_by: str | None  # None: the model's own resize; else "max_image_tokens", "min_image_tokens",
    #                         "image_budget" or "context"
    activation_bytes: int | None = None  # estimate; None when the bundle does not record the tower's size
    encode_flops: float | None = None
    tiling: TileGrid | None = None  # a tiling model's grid for this image (`edgevlm.tile_budget`)
    tile: TileView | None = None  # which of its views this span is

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclass(frozen=True)
class BudgetPlan:
    """Every image span of a request, in prompt order, and the limits they were planned under."""

    spans: tuple[SpanPlan, ...]
    limits: ResolvedLimits
    image_token_cap: int | None  # the most image tokens allowed in total (budget and context); None: no cap
    n_prompt_tokens: int
    max_new_tokens: int
    n_ctx: int | None

    @property
    def n_image_tokens(self) -> int:
        return sum(span.n_tokens for span in self.spans)

    @property
    def peak_activation_bytes(self) -> int | None:
        """Images are encoded one at a time, so the largest span sets the peak."""
        if not self.spans or any(span.activation_bytes is None for span in self.spans):
            return None
        return max(span.activation_bytes for span in self.spans)

    def encode_seconds(self, gflops_per_s: float = DEFAULT_VISION_GFLOPS) -> float | None:
        """Estimated vision time of all spans at an assumed sustained throughput (GFLOP/s)."""
        if any(span.encode_flops is None for span in self.spans):
            return None
        return sum(span.encode_flops for span in self.spans) / (gflops_per_s * 1e9)


def plan_images(
    requests: Sequence[ImageRequest],
    spec: Preprocessing,
    limits: BudgetLimits | None = None,
    *,
    n_ctx: int | None = None,
    n_prompt_tokens: int = 0,
    max_new_tokens: int = 0,
    tower: VisionTowerSize | None = None,
) -> BudgetPlan:
    """Plan the image spans of one request; deterministic, and never beyond any limit (see the module docstring).

    `n_prompt_tokens` counts the text tokens of the rendered prompt, span markers included; with `n_ctx` set, the
    images get at most n_ctx - n_prompt_tokens - max_new_tokens tokens. `limits` may be a `resolve_limits` result
    (its sources then appear in errors) or plain `BudgetLimits`.

    Raises:
        BudgetError: limits contradict the model (a minimum above its maximum tokens per image, a maximum below its
            minimum), or the image budget cannot hold every span's minimum.
        ContextOverflowError: the context cannot hold the prompt, max_new_tokens and every span's minimum.
        ImageError: an image (or crop, or tile) beyond the model's 200:1 aspect-ratio limit.
    """
    if not isinstance(limits, ResolvedLimits):
        limits = resolve_limits(request=limits)
    factor = spec.factor
    model_min, model_max = model_token_range(spec)
    limits = within_model_range(limits, spec)
    low = max(limits.min_image_tokens or 0, model_min)
    high = limits.max_image_tokens if limits.max_image_tokens is not None else _UNBOUNDED
    regions = [region for i, request in enumerate(requests) for region in _regions(request, i, spec)]
    wanted = [fit_resize(*region.size, spec, low, high) for region in regions]

    room = None if n_ctx is None else n_ctx - n_prompt_tokens - max_new_tokens
    caps = [cap for cap in (limits.image_budget, room) if cap is not None]
    cap = min(caps) if caps else None
    binding = "context" if room is not None and cap == room else "image_budget"
    if regions and cap is not None and len(regions) * low > cap:
        _refuse(len(regions), low, limits, room, n_ctx, n_prompt_tokens, max_new_tokens, (model_min, model_max), binding)

    wanted_tokens = [n_tokens_of(size, factor) for size in wanted]
    if cap is None or not regions or sum(wanted_tokens) <= cap:
        shares = wanted_tokens
    else:
        shares = _share_by_area([r.weight for r in regions], wanted_tokens, low, cap)

    spans = []
    for region, size, want, share in zip(regions, wanted, wanted_tokens, shares, strict=True):
        if share >= want:
            limited_by = _limited_by(region, size, spec)
        else:
            size, limited_by = fit_resize(*region.size, spec, low, share), binding
        grid = (1, size[0] // spec.patch_size, size[1] // spec.patch_size)
        n_patches = grid[1] * grid[2]
        spans.append(SpanPlan(
            image_index=region.image_index, view=region.view, box=region.box, resized_size=size, grid=grid,
            n_tokens=n_tokens_of(size, factor), limited_by=limited_by,
            activation_bytes=estimate_activation_bytes(n_patches, tower) if tower else None,
            encode_flops=estimate_encode_flops(n_patches, tower) if tower else None,
        ))  # fmt: skip
    return BudgetPlan(tuple(spans), limits, cap, n_prompt_tokens, max_new_tokens, n_ctx)


def within_model_range(limits: ResolvedLimits, spec: Preprocessing) -> ResolvedLimits:
    """`limits` with the profile's and bundle's per-image limits moved into the model's own token range; a request's
    or the caller's limit outside it raises `BudgetError` (see the module docstring)."""
    model_min, model_max = model_token_range(spec)
    where = dict(limits.sources)
    fixed = f"every image costs {model_min} tokens in this model" if model_min == model_max else ""
    moved: dict[str, int] = {}
    minimum, maximum = limits.min_image_tokens, limits.max_image_tokens
    if minimum is not None and minimum > model_max:
        if where.get("min_image_tokens") not in DEFAULT_LAYERS:
            raise BudgetError(f"{limits.describe('min_image_tokens')} is above this model's maximum of {model_max} tokens per image ({fixed or spec.describe_range()}); use at most {model_max}")  # fmt: skip
        moved["min_image_tokens"] = model_max
    if maximum is not None and maximum < model_min:
        if where.get("max_image_tokens") not in DEFAULT_LAYERS:
            raise BudgetError(f"{limits.describe('max_image_tokens')} is below this model's minimum of {model_min} tokens per image ({fixed or spec.describe_range()}); use at least {model_min}" + (", or leave it unset" if fixed else ""))  # fmt: skip
        moved["max_image_tokens"] = model_min
    return dataclasses.replace(limits, **moved) if moved else limits


def _limited_by(region: _Region, size: tuple[int, int], spec: Preprocessing) -> str | None:
    native = spec.native_size(*region.size)
    if size == native:
        return None
    return "max_image_tokens" if n_tokens_of(size, spec.factor) < n_tokens_of(native, spec.factor) else "min_image_tokens"


def _share_by_area(weights: list[float], wanted: list[int], low: int, cap: int) -> list[int]:
    """Integer shares clamp(floor(lambda * weight), low, wanted) with the largest lambda whose total fits in cap."""

    def shares(lam: float) -> list[int]:
        return [min(want, max(low, math.floor(lam * weight))) for weight, want in zip(weights, wanted, strict=True)]

    lo_lam, hi_lam = 0.0, max(want / weight for weight, want in zip(weights, wanted, strict=True)) + 1.0
    for _ in range(100):  # bisection on a monotone step function; fixed iterations keep it deterministic
        mid = (lo_lam + hi_lam) / 2
        if sum(shares(mid)) <= cap:
            lo_lam = mid
        else:
            hi_lam = mid
    return shares(lo_lam)


def _refuse(n_spans: int, low: int, limits: ResolvedLimits, room: int | None, n_ctx: int | None,
            n_prompt: int, max_new: int, model_range: tuple[int, int], binding: str) -> None:  # fmt: skip
    need = n_spans * low
    model_min = model_range[0]
    floor = limits.describe("min_image_tokens") if limits.min_image_tokens and limits.min_image_tokens >= model_min else f"the model's minimum of {model_min}"  # fmt: skip
    if model_range[0] == model_range[1]:
        floor = f"{model_min} tokens each: this model encodes every image at one size"
    what = f"{n_spans} image span(s) need at least {n_spans} x {low} = {need} tokens ({floor}{'' if model_range[0] == model_range[1] else ' per span'})"  # fmt: skip
    fixes = []
    if binding == "context" and n_ctx is not None and room is not None:
        detail = f"the context holds {n_ctx}: {n_ctx} - {n_prompt} prompt tokens - {max_new} max_tokens = {room} left for images"  # fmt: skip
        if n_ctx - n_prompt - need >= 1:
            fixes.append(f"max_tokens <= {n_ctx - n_prompt - need}")
        fixes.append(f"n_ctx >= {n_prompt + max_new + need}")
    else:
        detail = f"{limits.describe('image_budget')} allows {limits.image_budget}"
        fixes.append(f"image_budget >= {need}")
    cap = room if binding == "context" else limits.image_budget
    if cap is not None and cap // n_spans >= model_min and limits.min_image_tokens and low > model_min:
        fixes.append(f"min_image_tokens <= {cap // n_spans}")
    fixes.append("fewer images or tiles")
    error = ContextOverflowError if binding == "context" else BudgetError
    raise error(f"{what}, but {detail}. To fit, use {', or '.join(fixes)}.")
