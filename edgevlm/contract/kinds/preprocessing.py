"""Model preprocessing, the manifest's `preprocessing` section: numpy and Pillow only (never torch).

Each kind reproduces a transformers image processor exactly (max abs difference 0 in tests).

`dynamic-patches` (`DynamicPatches`; transformers' `Qwen2VLImageProcessorPil`), any image size:

1. convert to RGB, compositing any transparency onto white (transformers' `convert_to_rgb`);
2. `smart_resize` picks (h, w), multiples of `patch_size * merge_size`, with h * w in [min_pixels, max_pixels];
3. resize the uint8 image with PIL BICUBIC (no `reducing_gap`), as transformers' PIL backend does;
4. rescale in float64 then cast to float32, normalize in float32 ((x - mean) / std) -- done here as a 256-entry
   lookup table per channel, which gives the same float32 values bit for bit;
5. patchify: rows ordered (merge-block row, merge-block col, row in block, col in block), each row laid out
   (channel, temporal copy, patch row, patch col), the single frame repeated `temporal_patch_size` times.

`fixed-resize` (`FixedResize`; transformers' `CLIPImageProcessorPil` / `LlavaImageProcessorPil`, or with `resize`
"square" `Gemma3ImageProcessorPil`), one fixed size: RGB; optionally pad to a square with the mean colour (the
original LLaVA's `pad`); resize the shortest edge and center crop, or resize straight to the square ("square"), with
PIL BICUBIC or BILINEAR; rescale and normalize as above; patchify row-major, each row (channel, patch row, col).

Large photos are resized by PIL before any float work, so memory scales with the resized image, not the photo.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ...errors import ImageError
from ...images import to_rgb
from .registry import OMIT_DEFAULT, Section, check_positive_ints, register

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

FIXED_RESIZES = ("shortest-edge", "square")
FIXED_TILINGS = ("grid", "pan-and-scan")
MAX_PAN_AND_SCAN_CROPS = 64  # transformers' default is 4; a bundle asking for more is not a model's processor
RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

# smart_resize refuses thinner images than this (same limit and check as transformers).
MAX_ASPECT_RATIO = 200


# --------------------------------------------------------------------------------------------------- spec


@register("preprocessing", "dynamic-patches")
@dataclass(frozen=True)
class DynamicPatches(Section):
    """Dynamic resolution (Qwen2-VL): any image size, resized to a multiple of patch_size * merge_size pixels within
    [min_pixels, max_pixels] and cut into patches."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        check_positive_ints(self, "preprocessing", ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"))  # fmt: skip
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"preprocessing min_pixels={self.min_pixels} is above max_pixels={self.max_pixels}; "
                "min_pixels must be <= max_pixels"
            )
        _check_normalization(self)

    @property
    def factor(self) -> int:
        """Side lengths of a resized image are multiples of this (one merged token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values per row of `PreparedImage.pixel_patches`: channels * temporal_patch_size * patch_size²."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def token_range(self) -> tuple[int, int]:
        """The model's own (min, max) tokens per image, from min_pixels and max_pixels."""
        area = self.factor**2
        return -(-self.min_pixels // area), max(1, self.max_pixels // area)

    def describe_range(self) -> str:
        """Where `token_range` comes from, for error messages."""
        return f"min_pixels={self.min_pixels}, max_pixels={self.max_pixels}"

    def native_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the model's own processor resizes a height x width image to (`smart_resize`)."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def prepare(self, image: Image.Image, *, resized_size: tuple[int, int] | None = None) -> PreparedImage:
        return _prepare_dynamic(image, self, resized_size)

    @classmethod
    def from_preprocessor_config(cls, cfg: Mapping[str, Any]) -> DynamicPatches:
        """Build from a Hugging Face `preprocessor_config.json` dict of a Qwen2-VL model.

        Pixel bounds follow transformers: `size` ({"shortest_edge", "longest_edge"}, or the older
        {"min_pixels", "max_pixels"}) first, then top-level `min_pixels`/`max_pixels` override it. Settings this
        pipeline cannot reproduce (do_resize/do_rescale/do_normalize false, a resample filter other than BICUBIC)
        raise ValueError; keys that do not affect the pixels (processor class names, ...) are ignored.
        """
        _check_reproducible(cfg, "Qwen2-VL", ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"))
        values: dict[str, Any] = {}
        size = cfg.get("size") or {}
        if not isinstance(size, Mapping):
            raise ValueError(f"preprocessor config size={size!r}: expected a dict with shortest_edge and longest_edge")
        size_spellings = {"min_pixels": ("shortest_edge", "min_pixels"), "max_pixels": ("longest_edge", "max_pixels")}
        for ours, spellings in size_spellings.items():
            for key in spellings:
                if size.get(key) is not None:
                    values[ours] = size[key]
                    break
            if cfg.get(ours) is not None:
                values[ours] = cfg[ours]
        for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor"):
            if cfg.get(key) is not None:
                values[key] = cfg[key]
        return cls(**values, **_normalization_values(cfg))


@register("preprocessing", "fixed-resize")
@dataclass(frozen=True)
class FixedResize(Section):
    """Image preprocessing to one fixed square size (LLaVA-1.5's CLIP, Gemma 3's SigLIP).

    Every image becomes `crop_size` x `crop_size` pixels, (crop_size / patch_size / merge_size)² tokens (576 for
    LLaVA-1.5's 336 / 14; 256 for Gemma 3's 896 / 14 pooled 4x4), whatever its size: token limits cannot change it
    (see `edgevlm.budget`).
    """

    crop_size: int = 336
    shortest_edge: int = 336  # the resize target of the shorter side, before the center crop ("shortest-edge")
    patch_size: int = 14
    pad_to_square: bool = False  # pad to a square with the mean colour first (the original LLaVA's "pad")
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    # patches per token side: the vision graph pools merge_size x merge_size patches into one (Gemma 3: 4)
    merge_size: int = field(default=1, metadata=OMIT_DEFAULT)
    # "shortest-edge" + center crop (CLIP), or "square": the whole image squashed (Gemma 3)
    resize: str = field(default="shortest-edge", metadata=OMIT_DEFAULT)
    resample: str = field(default="bicubic", metadata=OMIT_DEFAULT)  # PIL filter: "bicubic" (CLIP), "bilinear"
    # how `tiles` cuts an image: `budget.tile_grid`'s grid, or Gemma 3's "pan-and-scan" crops with these parameters
    # (`budget.pan_and_scan_boxes`; transformers' defaults)
    tiling: str = field(default="grid", metadata=OMIT_DEFAULT)
    pan_and_scan_min_crop_size: int = field(default=256, metadata=OMIT_DEFAULT)
    pan_and_scan_max_crops: int = field(default=4, metadata=OMIT_DEFAULT)
    pan_and_scan_min_ratio: float = field(default=1.2, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        check_positive_ints(self, "preprocessing", ("crop_size", "shortest_edge", "patch_size", "merge_size",
                                                    "pan_and_scan_min_crop_size", "pan_and_scan_max_crops"))  # fmt: skip
        _check_choice("tiling", self.tiling, FIXED_TILINGS)
        if self.pan_and_scan_max_crops > MAX_PAN_AND_SCAN_CROPS:
            raise ValueError(f"preprocessing pan_and_scan_max_crops={self.pan_and_scan_max_crops}: expected at most "
                             f"{MAX_PAN_AND_SCAN_CROPS}")  # fmt: skip
        if not _is_real(self.pan_and_scan_min_ratio) or self.pan_and_scan_min_ratio < 1:
            raise ValueError(f"preprocessing pan_and_scan_min_ratio={self.pan_and_scan_min_ratio!r}: expected a number >= 1")  # fmt: skip
        if self.crop_size % (self.patch_size * self.merge_size):
            raise ValueError(f"preprocessing crop_size={self.crop_size} is not a multiple of patch_size * merge_size = "
                             f"{self.patch_size} * {self.merge_size}")  # fmt: skip
        _check_choice("resize", self.resize, FIXED_RESIZES)
        _check_choice("resample", self.resample, RESAMPLING)
        if self.shortest_edge < self.crop_size:
            raise ValueError(
                f"preprocessing shortest_edge={self.shortest_edge} is below crop_size={self.crop_size}; "
                "the center crop would need padding, which edgevlm does not reproduce"
            )
        if not isinstance(self.pad_to_square, bool):
            raise ValueError(f"preprocessing pad_to_square={self.pad_to_square!r}: expected true or false")
        _check_normalization(self)

    @property
    def factor(self) -> int:
        """Pixels per token side."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values per row of `PreparedImage.pixel_patches`: channels * patch_size²."""
        return 3 * self.patch_size**2

    def token_range(self) -> tuple[int, int]:
        """(n, n): every image costs the same n tokens."""
        n_tokens = (self.crop_size // self.factor) ** 2
        return n_tokens, n_tokens

    def describe_range(self) -> str:
        pooled = f", merge_size={self.merge_size}" if self.merge_size > 1 else ""
        return f"crop_size={self.crop_size}, patch_size={self.patch_size}{pooled}"

    def native_size(self, height: int, width: int) -> tuple[int, int]:
        if height <= 0 or width <= 0:
            raise ImageError(f"Image size {width}x{height} (width x height) has no pixels; pass a non-empty image.")
        return self.crop_size, self.crop_size

    def prepare(self, image: Image.Image, *, resized_size: tuple[int, int] | None = None) -> PreparedImage:
        return _prepare_fixed(image, self, resized_size)

    @classmethod
    def from_preprocessor_config(cls, cfg: Mapping[str, Any], patch_size: int) -> FixedResize:
        """Build from a `preprocessor_config.json` dict of `CLIPImageProcessor` / `LlavaImageProcessor`; the patch
        size comes from the vision tower's config. Settings this pipeline cannot reproduce raise ValueError."""
        _check_reproducible(cfg, "CLIP", ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"))  # fmt: skip
        size, crop = cfg.get("size", 336), cfg.get("crop_size", 336)
        shortest_edge = size.get("shortest_edge") if isinstance(size, Mapping) else size
        if isinstance(crop, Mapping):
            if crop.get("height") != crop.get("width"):
                raise ValueError(f"preprocessor config crop_size={crop!r}: edgevlm's CLIP pipeline needs a square crop")
            crop = crop.get("height")
        values: dict[str, Any] = {"crop_size": crop, "shortest_edge": shortest_edge, "patch_size": patch_size}
        values["pad_to_square"] = bool(cfg.get("do_pad", False))
        if cfg.get("rescale_factor") is not None:
            values["rescale_factor"] = cfg["rescale_factor"]
        return cls(**values, **_normalization_values(cfg))


# The kinds whose image spans are each one resize of a region (the tiling kinds are in `tiling`).
SingleViewPreprocessing = DynamicPatches | FixedResize


def _check_normalization(spec: Any) -> None:
    """Check and freeze image_mean, image_std (3 numbers each, std > 0) and rescale_factor of a spec."""
    for name in ("image_mean", "image_std"):
        value = getattr(spec, name)
        if (
            isinstance(value, (str, bytes))
            or not isinstance(value, Sequence)
            or len(value) != 3
            or not all(_is_real(v) for v in value)
        ):
            raise ValueError(f"preprocessing {name}={value!r}: expected 3 numbers (R, G, B)")
        object.__setattr__(spec, name, tuple(float(v) for v in value))
    if any(v <= 0 for v in spec.image_std):
        raise ValueError(f"preprocessing image_std={spec.image_std!r}: every value must be > 0")
    if not _is_real(spec.rescale_factor) or not 0 < spec.rescale_factor < math.inf:
        raise ValueError(f"preprocessing rescale_factor={spec.rescale_factor!r}: expected a positive number")
    object.__setattr__(spec, "rescale_factor", float(spec.rescale_factor))


def _check_reproducible(cfg: Mapping[str, Any], family: str, flags: Sequence[str]) -> None:
    """Refuse preprocessor settings edgevlm does not reproduce: a step switched off, a filter other than BICUBIC."""
    for flag in flags:
        if cfg.get(flag, True) is not True:
            raise ValueError(f"preprocessor config {flag}={cfg[flag]!r}: edgevlm's {family} pipeline needs it true")
    resample = cfg.get("resample", Image.Resampling.BICUBIC)
    if resample != Image.Resampling.BICUBIC:
        raise ValueError(
            f"preprocessor config resample={resample!r}: edgevlm's {family} pipeline uses BICUBIC "
            f"({int(Image.Resampling.BICUBIC)}) only"
        )


def _normalization_values(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {key: tuple(cfg[key]) if isinstance(cfg[key], list) else cfg[key] for key in ("image_mean", "image_std") if cfg.get(key) is not None}  # fmt: skip


def _is_real(value: Any) -> bool:
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    try:
        return is_number and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _check_choice(key: str, value: object, choices: Collection[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"preprocessing {key}={value!r}: expected one of {', '.join(choices)}")


# --------------------------------------------------------------------------------------------------- resize


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """The (height, width) Qwen2-VL resizes an image to; identical to transformers' `smart_resize`.

    Both sides become multiples of `factor`, the pixel count lands in [min_pixels, max_pixels] (rounding to
    multiples of `factor` can overshoot max_pixels for very thin images only), and the aspect ratio is kept as
    closely as possible.

    Raises:
        ImageError: a side is not positive, or the aspect ratio is above 200 (transformers raises ValueError
            there too; ImageError is a ValueError). Crop such panoramas/strips into pieces first.
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"Image size {width}x{height} (width x height) has no pixels; pass a non-empty image.")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"Image {width}x{height} (width x height) has aspect ratio {ratio:.1f}, above Qwen2-VL's limit of "
            f"{MAX_ASPECT_RATIO}. Crop it into pieces of aspect ratio <= {MAX_ASPECT_RATIO} or pad it."
        )
    # Kept line for line as transformers has it: Python's round() rounds half to even, and beta is a float.
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --------------------------------------------------------------------------------------------------- preprocess


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is elementwise, not a bool
class PreparedImage:
    """An image ready for the vision encoder: flattened patches plus the patch grid."""

    pixel_patches: np.ndarray  # float32 (grid_t * grid_h * grid_w, C * T * P * P), row order as transformers
    grid: tuple[int, int, int]  # (grid_t, grid_h, grid_w) in patches, like transformers' image_grid_thw
    merge_size: int

    def __post_init__(self) -> None:
        n_patches = self.grid[0] * self.grid[1] * self.grid[2]
        if self.pixel_patches.ndim != 2 or self.pixel_patches.shape[0] != n_patches:
            raise ValueError(
                f"pixel_patches shape {self.pixel_patches.shape} does not match grid {self.grid} "
                f"({n_patches} patch rows expected)"
            )

    @property
    def n_tokens(self) -> int:
        """Visual tokens this image costs in the language model (merge_size**2 patches make one token)."""
        grid_t, grid_h, grid_w = self.grid
        return grid_t * grid_h * grid_w // self.merge_size**2

    @property
    def graph_inputs(self) -> dict[str, np.ndarray]:
        """What the vision graph takes for this image besides its pixels and the `patch_positions` kind's inputs
        (a kind whose graph packs its features by the image's size, as AnyRes, brings them here)."""
        return {}

    @property
    def position_grid(self) -> tuple[int, int, int]:
        """The grid the `positions` kind lays this image's tokens out on: the patch grid, unless the graph packs
        the tokens otherwise (AnyRes: a row of `n_tokens`)."""
        return self.grid


def preprocess(image: Image.Image, spec: SingleViewPreprocessing, *, resized_size: tuple[int, int] | None = None) -> PreparedImage:  # fmt: skip
    """Resize, normalize and patchify `image` exactly like transformers' image processor of `spec`'s kind.

    `resized_size` = (height, width) replaces the model's own choice (the token-budget planner passes it): for
    `dynamic-patches` both must be positive multiples of `spec.factor`, for `fixed-resize` it must be the crop size; else
    ValueError. Images not in RGB mode are converted with `to_rgb`.
    """
    return spec.prepare(image, resized_size=resized_size)


def _prepare_dynamic(image: Image.Image, spec: DynamicPatches, resized_size: tuple[int, int] | None) -> PreparedImage:  # fmt: skip
    width, height = image.size
    if resized_size is None:
        resized_height, resized_width = smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
    else:
        resized_height, resized_width = _check_resized_size(resized_size, spec.factor)
    rgb = to_rgb(image)
    resized = rgb.resize((resized_width, resized_height), Image.Resampling.BICUBIC)
    logger.debug("dynamic-patches preprocess: %dx%d -> %dx%d (w x h)", width, height, resized_width, resized_height)

    pixels = np.asarray(resized, dtype=np.uint8)  # (H, W, 3)
    lut = _normalization_lut(spec.rescale_factor, spec.image_mean, spec.image_std)  # (3, 256) float32
    normalized = lut[np.arange(3)[:, None, None], pixels.transpose(2, 0, 1)]  # (3, H, W) float32

    patch, merge, temporal = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    channels = normalized.shape[0]
    grid_h, grid_w = resized_height // patch, resized_width // patch
    blocks = normalized.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # (block row, block col, row in block, col in block, C, P, P)
    # An image is one frame; the encoder's temporal patch takes it `temporal` times, as in transformers.
    blocks = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], temporal, patch, patch))
    pixel_patches = blocks.reshape(grid_h * grid_w, channels * temporal * patch * patch)
    return PreparedImage(
        pixel_patches=np.ascontiguousarray(pixel_patches), grid=(1, grid_h, grid_w), merge_size=spec.merge_size
    )


def _prepare_fixed(image: Image.Image, spec: FixedResize, resized_size: tuple[int, int] | None) -> PreparedImage:  # fmt: skip
    side = spec.crop_size
    if resized_size is not None and tuple(resized_size) != (side, side):
        raise ValueError(f"resized_size={resized_size!r}: this model takes {side}x{side} images only")
    rgb = to_rgb(image)
    if spec.pad_to_square and rgb.width != rgb.height:
        rgb = _pad_to_square(rgb, tuple(int(m * 255) for m in spec.image_mean))
    if spec.resize == "square":
        new_size = (side, side)
    else:  # transformers' shortest-edge resize: the long side is int(shortest_edge * long / short), rounded down
        short, long = sorted(rgb.size)
        new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
        new_size = (new_short, new_long) if rgb.width <= rgb.height else (new_long, new_short)  # (width, height)
    resized = rgb.resize(new_size, RESAMPLING[spec.resample])
    left, top = (resized.width - side) // 2, (resized.height - side) // 2
    pixels = np.asarray(resized, dtype=np.uint8)[top : top + side, left : left + side]  # (side, side, 3)
    logger.debug("fixed-resize preprocess: %dx%d -> %dx%d -> crop %d (w x h)", *image.size, *new_size, side)

    grid = side // spec.patch_size
    return PreparedImage(square_patches(pixels, spec.patch_size, spec), grid=(1, grid, grid), merge_size=spec.merge_size)  # fmt: skip


def square_patches(pixels: np.ndarray, patch_size: int, spec: Any) -> np.ndarray:
    """A (side, side, 3) uint8 square normalized by `spec`'s rescale_factor, image_mean and image_std and cut into
    (n * n, 3 * patch_size²) float32 patches, n = side // patch_size, row-major, each row (channel, patch row, patch
    col). Pixels past n * patch_size are dropped, as the tower's strided patch convolution drops them."""
    n = pixels.shape[0] // patch_size
    lut = _normalization_lut(spec.rescale_factor, spec.image_mean, spec.image_std)  # (3, 256) float32
    normalized = lut[np.arange(3)[:, None, None], pixels[: n * patch_size, : n * patch_size].transpose(2, 0, 1)]
    patches = normalized.reshape(3, n, patch_size, n, patch_size).transpose(1, 3, 0, 2, 4)  # (row, col, C, P, P)
    return np.ascontiguousarray(patches.reshape(n * n, 3 * patch_size**2))


def _pad_to_square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """The image centered on a square of `color`, as transformers' `LlavaImageProcessor.pad_to_square`."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), color)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def _check_resized_size(resized_size: tuple[int, int], factor: int) -> tuple[int, int]:
    if len(resized_size) != 2:
        raise ValueError(f"resized_size={resized_size!r}: expected (height, width)")
    height, width = resized_size
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value % factor:
            raise ValueError(
                f"resized_size {name}={value!r}: expected a positive multiple of {factor} (patch_size * merge_size)"
            )
    return int(height), int(width)


def _normalization_lut(
    rescale_factor: float, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> np.ndarray:
    """float32 value of every uint8 level per channel, computed in transformers' order and dtypes.

    transformers rescales in float64 and casts to float32, then normalizes in float32; elementwise IEEE arithmetic
    makes a table of the 256 levels give bit-identical results at a fraction of the cost.
    """
    levels = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return (levels[None, :] - mean32) / std32
