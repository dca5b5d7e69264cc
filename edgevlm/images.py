"""Image loading and model preprocessing in numpy/Pillow only (the device side never imports torch).

A bundle's manifest names its preprocessing `kind`; `preprocessing_from_dict` reads it into the matching spec and
`preprocess` runs it. Each kind reproduces a transformers image processor exactly (max abs difference 0 in tests).

`qwen2_vl` (`Qwen2VLPreprocessing`, transformers' `Qwen2VLImageProcessorPil`), any image size:

1. convert to RGB, compositing any transparency onto white (transformers' `convert_to_rgb`);
2. `smart_resize` picks (h, w), multiples of `patch_size * merge_size`, with h * w in [min_pixels, max_pixels];
3. resize the uint8 image with PIL BICUBIC (no `reducing_gap`), as transformers' PIL backend does;
4. rescale in float64 then cast to float32, normalize in float32 ((x - mean) / std) -- done here as a 256-entry
   lookup table per channel, which gives the same float32 values bit for bit;
5. patchify: rows ordered (merge-block row, merge-block col, row in block, col in block), each row laid out
   (channel, temporal copy, patch row, patch col), the single frame repeated `temporal_patch_size` times.

`clip` (`ClipPreprocessing`, transformers' `CLIPImageProcessorPil` / `LlavaImageProcessorPil`), one fixed size:
RGB; optionally pad to a square with the mean colour (the original LLaVA's `pad`); resize the shortest edge with
PIL BICUBIC; center crop; rescale and normalize as above; patchify row-major, each row (channel, patch row, col).

Large photos are resized by PIL before any float work, so memory scales with the resized image, not the photo.
Untrusted images are measured from their headers first (`check_images`): a request above the pixel caps of
`ImageLimits` is refused before any of it is decoded.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from edgevlm.errors import ImageError, ImageTooLargeError

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# smart_resize refuses thinner images than this (same limit and check as transformers).
MAX_ASPECT_RATIO = 200

# The formats Pillow may open: photos and screenshots. Not every format Pillow knows: EPS, for one, runs Ghostscript.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# Exceptions Pillow raises for corrupt or truncated data while identifying or decoding a file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray


# --------------------------------------------------------------------------------------------------- limits

# A 48-megapixel phone photo (8000x6000) passes per image, and two of them per request; the 88-megapixel 1-bit PNG
# bomb of issue 17 (9400x9400, 14 KB, 265 MB once RGB) does not.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000


@dataclass(frozen=True)
class ImageLimits:
    """Pixel caps checked from image headers before anything is decoded (a guard against decompression bombs).

    `max_image_pixels` caps width x height of each image, `max_request_pixels` the sum over one request's images;
    None: no cap. Decoding costs about 3 bytes per pixel (RGB), up to 15 with transparency, so the defaults
    (50 and 100 megapixels) bound one request to a few hundred MB. Pillow's own `PIL.Image.MAX_IMAGE_PIXELS`
    (89.5 megapixels unless changed) stays a process-wide ceiling above these: a cap beyond it needs it raised
    too (`edgevlm run/serve --max-image-pixels` do that).
    """

    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    max_request_pixels: int | None = DEFAULT_MAX_REQUEST_PIXELS

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_request_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"ImageLimits {name}={value!r}: expected a positive number of pixels or None")

    def check_image(self, width: int, height: int, what: str) -> None:
        """Refuse one image above the per-image cap or above Pillow's MAX_IMAGE_PIXELS, naming the cap that binds."""
        pixels = width * height
        if self.max_image_pixels is not None and pixels > self.max_image_pixels:
            raise ImageTooLargeError(
                f"{what} is {width}x{height} = {pixels:,} pixels, above the per-image cap of {self.max_image_pixels:,} "
                "pixels (a guard against decompression bombs). Downscale it, or raise the cap if the device has the "
                "memory (about 3 bytes per pixel): ImageLimits(max_image_pixels=...) in Python, --max-image-pixels "
                "for edgevlm run/serve."
            )
        ceiling = Image.MAX_IMAGE_PIXELS
        if ceiling is not None and pixels > ceiling:
            raise ImageTooLargeError(
                f"{what} is {width}x{height} = {pixels:,} pixels, above Pillow's process-wide limit "
                f"PIL.Image.MAX_IMAGE_PIXELS = {ceiling:,} (a guard against decompression bombs). Downscale it, or "
                "raise PIL.Image.MAX_IMAGE_PIXELS if it is trusted."
            )

    def check_request(self, sizes: Sequence[tuple[int, int]]) -> None:
        """Refuse a request whose images have more pixels together than the per-request cap."""
        total = sum(width * height for width, height in sizes)
        if self.max_request_pixels is not None and total > self.max_request_pixels:
            raise ImageTooLargeError(
                f"the request's {len(sizes)} images have {total:,} pixels together, above the per-request cap of "
                f"{self.max_request_pixels:,} pixels. Send fewer or smaller images, or raise the cap: "
                "ImageLimits(max_request_pixels=...) in Python, --max-request-pixels for edgevlm run/serve."
            )


@dataclass(frozen=True)
class CheckedImages:
    """A request's image sources whose headers passed the pixel caps: sizes known, nothing decoded yet.

    `check_images` makes one; `decode(i)` decodes image i when the model's turn comes, so requests waiting in a
    queue hold encoded bytes (or paths), never decoded pixels.
    """

    sources: tuple[Any, ...]
    sizes: tuple[tuple[int, int], ...]  # (width, height), upright
    limits: ImageLimits

    def decode(self, index: int) -> Image.Image:
        """Image `index` as `load_image` gives it; refused if it is not the size its header gave."""
        image = load_image(self.sources[index], self.limits)
        if image.size != self.sizes[index]:
            (w, h), (now_w, now_h) = self.sizes[index], image.size
            raise ImageError(f"image {index + 1} is {now_w}x{now_h} once decoded, but its header said {w}x{h}: the "
                             "file changed while the request waited, or it is a PNG whose EXIF orientation comes "
                             "after its pixels. Send it again, saved with the orientation applied.")  # fmt: skip
        return image


def check_images(sources: Sequence[ImageSource], limits: ImageLimits | None = None) -> CheckedImages:
    """Read every image's header (`image_size`) and refuse the request, before decoding any of it, when an image is
    above `limits.max_image_pixels` or all of them together above `limits.max_request_pixels` (default
    `ImageLimits()`). Raises ImageError (`ImageTooLargeError` for a cap) naming the image and the cap."""
    limits = ImageLimits() if limits is None else limits
    sizes = []
    for index, source in enumerate(sources):
        width, height = image_size(source)
        limits.check_image(width, height, f"image {index + 1} of {len(sources)}")
        sizes.append((width, height))
    limits.check_request(sizes)
    return CheckedImages(tuple(sources), tuple(sizes), limits)


# --------------------------------------------------------------------------------------------------- loading


def load_image(source: ImageSource, limits: ImageLimits | None = None) -> Image.Image:
    """Load `source` as a fully decoded RGB PIL image.

    `source` is a file path, the encoded bytes of an image file, a PIL image (any mode), an HxWx3 uint8 RGB array
    (a camera frame) or an HxW / HxWx1 uint8 grayscale array. Like transformers' `load_image`, the EXIF orientation
    is applied to PIL sources; like its image processors' `convert_to_rgb`, transparency (an alpha band or a
    `transparency` entry, as in palette PNGs) is composited onto white.

    An image above `limits.max_image_pixels` (default `ImageLimits()`: 50 megapixels) or Pillow's
    `PIL.Image.MAX_IMAGE_PIXELS` is refused from its header, before decoding. A path must be a regular file: a FIFO,
    device, socket or directory is refused before it is opened, so it cannot block.

    Raises:
        ImageError: missing file, not a regular file, bytes that are not an image, a truncated or corrupt file, an
            array of the wrong shape or dtype, or an image above a pixel cap (`ImageTooLargeError`). The message says
            what to do.
    """
    limits = ImageLimits() if limits is None else limits
    if isinstance(source, Image.Image):
        limits.check_image(*source.size, what="the PIL image")
        return _decoded_rgb(source, what="the PIL image")
    if isinstance(source, np.ndarray):
        _check_array(source)
        limits.check_image(source.shape[1], source.shape[0], what="the array")
        return _array_to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("The image bytes are empty (0 bytes); pass the contents of an image file (JPEG, PNG).")
        return _open_encoded(io.BytesIO(data), f"image bytes ({len(data)} bytes)", limits)
    if isinstance(source, (str, os.PathLike)):
        path = _as_path(source)
        with _open_regular_file(path) as file:
            # Decoded completely inside the `with`: the returned image no longer needs the file.
            return _open_encoded(file, str(path), limits)
    raise ImageError(
        f"Cannot load an image from a {type(source).__name__}; pass a file path, encoded image bytes, "
        "a PIL image, or an HxWx3 uint8 numpy array."
    )


# EXIF orientations that turn the image by 90 degrees (transposed, rotated 90/270, transversed): width and height swap.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) of the image `load_image(source)` would return, read from the file header without decoding.

    Instant even for a 12-megapixel photo: the token-budget planner needs only sizes. EXIF orientation is applied
    (a portrait photo stored sideways reports its upright size). Errors are `load_image`'s, except for the ones only
    decoding finds (a truncated body); no pixel cap is applied here (`check_images` does that).
    """
    if isinstance(source, np.ndarray):
        _check_array(source)
        return int(source.shape[1]), int(source.shape[0])
    if isinstance(source, Image.Image):
        return _upright_size(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not bytes(source):
            raise ImageError("The image bytes are empty (0 bytes); pass the contents of an image file (JPEG, PNG).")
        return _upright_size(_identify(io.BytesIO(bytes(source)), what=f"image bytes ({len(source)} bytes)"), header_only=True)  # fmt: skip
    if isinstance(source, (str, os.PathLike)):
        path = _as_path(source)
        with _open_regular_file(path) as file:
            return _upright_size(_identify(file, what=str(path)), header_only=True)
    return load_image(source).size  # raises the clear error for an unsupported type


@functools.cache
def _openable_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin Pillow has (MPO, WebP, ... are not loaded up front)
    return tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)


def _identify(file: IO[bytes], what: str) -> Image.Image:
    """Open an encoded image (header only); a file Pillow cannot identify or a decompression bomb is an ImageError."""
    try:
        return Image.open(file, formats=_openable_formats())
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(
            f"Refusing to decode {what}: {err} That is above Pillow's process-wide ceiling (twice "
            "PIL.Image.MAX_IMAGE_PIXELS) and edgevlm's per-image cap. Downscale it, or, if it is trusted, raise "
            "PIL.Image.MAX_IMAGE_PIXELS and the cap (ImageLimits(max_image_pixels=...), --max-image-pixels)."
        ) from err
    except _DECODE_ERRORS as err:
        # UnidentifiedImageError's own text only repeats the file object's repr.
        detail = "" if isinstance(err, UnidentifiedImageError) else f" ({err})"
        raise ImageError(
            f"Cannot read {what}: it is not an image Pillow recognizes{detail}. "
            "Pass a JPEG, PNG, WebP, BMP, GIF or TIFF file."
        ) from err


def _upright_size(image: Image.Image, *, header_only: bool = False) -> tuple[int, int]:
    width, height = image.size
    try:
        # Pillow's PNG plugin decodes the whole image to look for EXIF after the pixels (and a 14 KB PNG can hold
        # 88 megapixels): header_only reads the orientation from the chunks before them.
        exif = Image.Image.getexif(image) if header_only else image.getexif()
        orientation = exif.get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        orientation = 1  # unreadable EXIF: load_image fails on it too, with its own message
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def _as_path(source: str | os.PathLike) -> Path:
    if isinstance(source, str) and "://" in source and not os.path.exists(source):
        raise ImageError(f"{source!r} looks like a URL; edgevlm loads local files only. Download it and pass the path.")
    return Path(source)


# Files that are not regular ones, as stat names them: reading a FIFO or a device can block forever or never end.
_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))  # fmt: skip
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _open_regular_file(path: Path) -> IO[bytes]:
    """Open `path` for reading if it is a non-empty regular file; anything else is an ImageError.

    `os.stat` refuses FIFOs, devices, sockets and directories before anything opens them; the open itself is
    non-blocking and `fstat` checks the opened file again, so a file swapped for a FIFO in between cannot block.
    """
    text = str(path)
    try:
        _check_regular(os.stat(path), text)
        fd = os.open(path, _OPEN_FLAGS)
    except ImageError:  # a ValueError too: not to be wrapped below
        raise
    except FileNotFoundError as err:
        raise ImageError(
            f"Image file not found: {text}. Check the path (relative paths start at {Path.cwd()})."
        ) from err
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise ImageError(f"Cannot read image file {text[:300]!r} ({err}). Check that it is a readable file.") from err
    try:
        _check_regular(os.fstat(fd), text)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _check_regular(info: os.stat_result, text: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{text} is a directory, not an image file; pass the path of one image inside it.")
    kind = next((name for is_kind, name in _NOT_REGULAR if is_kind(info.st_mode)), None)
    if kind is not None or not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{text} is {kind or 'not a regular file'}, not an image file: edgevlm reads images from "
                         "regular files only (a pipe or device could block). Save the image to a file and pass it.")  # fmt: skip
    if info.st_size == 0:
        raise ImageError(f"Image file {text} is empty (0 bytes); re-copy or re-capture it.")


def _open_encoded(file: IO[bytes], what: str, limits: ImageLimits) -> Image.Image:
    """Identify, size-check, fully decode and convert an encoded image; all decoding errors become ImageError."""
    image = _identify(file, what)
    limits.check_image(*image.size, what=what)
    return _decoded_rgb(image, what=what)


def _decoded_rgb(image: Image.Image, what: str) -> Image.Image:
    try:
        image.load()  # decode now, so a truncated file fails here and not in the middle of inference
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)  # as transformers' load_image: the upright image
        return to_rgb(image)
    except _DECODE_ERRORS as err:
        raise ImageError(
            f"Cannot decode {what}: it is truncated or corrupt ({err}). Re-copy or re-capture the image."
        ) from err


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    _check_array(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    image = Image.fromarray(np.ascontiguousarray(array))  # L for 2-D, RGB for HxWx3
    return image.convert("RGB")  # grayscale repeated into 3 channels, as transformers' np.repeat does


def _check_array(array: np.ndarray) -> None:
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3))
    if not shape_ok or array.dtype != np.uint8 or array.size == 0:
        raise ImageError(
            f"Expected an HxWx3 RGB or HxW grayscale uint8 array, got shape {array.shape} dtype {array.dtype}. "
            "Convert floats in [0, 1] with (a * 255).round().astype(np.uint8), CxHxW with a.transpose(1, 2, 0); "
            "for RGBA pass Image.fromarray(a) to composite alpha on white."
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB exactly like transformers' `convert_to_rgb`: transparency is composited onto white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# --------------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class Qwen2VLPreprocessing:
    """Qwen2-VL image preprocessing parameters, as stored in a bundle manifest (`kind` = "qwen2_vl")."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    kind: ClassVar[str] = "qwen2_vl"

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"))
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
        return _prepare_qwen2_vl(image, self, resized_size)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict, `kind` included; `from_dict` reads it back."""
        return _spec_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Qwen2VLPreprocessing:
        """Read `to_dict` output. Unknown keys, a different `kind` or bad values raise ValueError naming them."""
        return _spec_from_dict(cls, d)

    @classmethod
    def from_preprocessor_config(cls, cfg: Mapping[str, Any]) -> Qwen2VLPreprocessing:
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


@dataclass(frozen=True)
class ClipPreprocessing:
    """CLIP image preprocessing to one fixed square size, as stored in a bundle manifest (`kind` = "clip").

    Every image becomes `crop_size` x `crop_size` pixels, (crop_size / patch_size)² tokens (576 for LLaVA-1.5's
    336 / 14), whatever its size: token limits cannot change it (see `edgevlm.budget`).
    """

    crop_size: int = 336
    shortest_edge: int = 336  # the resize target of the shorter side, before the center crop
    patch_size: int = 14
    pad_to_square: bool = False  # pad to a square with the mean colour first (the original LLaVA's "pad")
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    kind: ClassVar[str] = "clip"
    merge_size: ClassVar[int] = 1  # one token per patch

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("crop_size", "shortest_edge", "patch_size"))
        if self.crop_size % self.patch_size:
            raise ValueError(f"preprocessing crop_size={self.crop_size} is not a multiple of patch_size={self.patch_size}")  # fmt: skip
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
        return self.patch_size

    @property
    def patch_dim(self) -> int:
        """Values per row of `PreparedImage.pixel_patches`: channels * patch_size²."""
        return 3 * self.patch_size**2

    def token_range(self) -> tuple[int, int]:
        """(n, n): every image costs the same n tokens."""
        n_tokens = (self.crop_size // self.patch_size) ** 2
        return n_tokens, n_tokens

    def describe_range(self) -> str:
        return f"crop_size={self.crop_size}, patch_size={self.patch_size}"

    def native_size(self, height: int, width: int) -> tuple[int, int]:
        if height <= 0 or width <= 0:
            raise ImageError(f"Image size {width}x{height} (width x height) has no pixels; pass a non-empty image.")
        return self.crop_size, self.crop_size

    def prepare(self, image: Image.Image, *, resized_size: tuple[int, int] | None = None) -> PreparedImage:
        return _prepare_clip(image, self, resized_size)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict, `kind` included; `from_dict` reads it back."""
        return _spec_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClipPreprocessing:
        """Read `to_dict` output. Unknown keys, a different `kind` or bad values raise ValueError naming them."""
        return _spec_from_dict(cls, d)

    @classmethod
    def from_preprocessor_config(cls, cfg: Mapping[str, Any], patch_size: int) -> ClipPreprocessing:
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


Preprocessing = Qwen2VLPreprocessing | ClipPreprocessing
PREPROCESSING_KINDS: dict[str, type[Qwen2VLPreprocessing | ClipPreprocessing]] = {
    spec.kind: spec for spec in (Qwen2VLPreprocessing, ClipPreprocessing)
}


def preprocessing_from_dict(d: Mapping[str, Any]) -> Preprocessing:
    """The preprocessing spec of a manifest's `preprocessing` section, by its `kind`."""
    kind = d.get("kind")
    if kind not in PREPROCESSING_KINDS:
        raise ValueError(f"preprocessing kind {kind!r} is not known to this edgevlm (it knows {', '.join(PREPROCESSING_KINDS)}); upgrade edgevlm")  # fmt: skip
    return PREPROCESSING_KINDS[kind].from_dict(d)


def _spec_to_dict(spec: Any) -> dict[str, Any]:
    """A JSON-able dict, `kind` included; `from_dict` reads it back."""
    out: dict[str, Any] = {"kind": spec.kind}
    for field in fields(spec):
        value = getattr(spec, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def _spec_from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    values = dict(d)
    kind = values.pop("kind", cls.kind)
    if kind != cls.kind:
        raise ValueError(f"preprocessing kind={kind!r}: this reader handles kind={cls.kind!r}")
    known = {field.name for field in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown preprocessing key(s) {', '.join(f'{k}={values[k]!r}' for k in unknown)}; "
            f"known keys: kind, {', '.join(sorted(known))}"
        )
    return cls(**values)


def _check_positive_ints(spec: Any, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"preprocessing {name}={value!r}: expected a positive integer")


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
    return is_number and math.isfinite(value)


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


def preprocess(image: Image.Image, spec: Preprocessing, *, resized_size: tuple[int, int] | None = None) -> PreparedImage:  # fmt: skip
    """Resize, normalize and patchify `image` exactly like transformers' image processor of `spec`'s kind.

    `resized_size` = (height, width) replaces the model's own choice (the token-budget planner passes it): for
    `qwen2_vl` both must be positive multiples of `spec.factor`, for `clip` it must be the crop size; else
    ValueError. Images not in RGB mode are converted with `to_rgb`.
    """
    return spec.prepare(image, resized_size=resized_size)


def _prepare_qwen2_vl(image: Image.Image, spec: Qwen2VLPreprocessing, resized_size: tuple[int, int] | None) -> PreparedImage:  # fmt: skip
    width, height = image.size
    if resized_size is None:
        resized_height, resized_width = smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
    else:
        resized_height, resized_width = _check_resized_size(resized_size, spec.factor)
    rgb = to_rgb(image)
    resized = rgb.resize((resized_width, resized_height), Image.Resampling.BICUBIC)
    logger.debug("qwen2_vl preprocess: %dx%d -> %dx%d (w x h)", width, height, resized_width, resized_height)

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


def _prepare_clip(image: Image.Image, spec: ClipPreprocessing, resized_size: tuple[int, int] | None) -> PreparedImage:  # fmt: skip
    side = spec.crop_size
    if resized_size is not None and tuple(resized_size) != (side, side):
        raise ValueError(f"resized_size={resized_size!r}: this model takes {side}x{side} images only")
    rgb = to_rgb(image)
    if spec.pad_to_square and rgb.width != rgb.height:
        rgb = _pad_to_square(rgb, tuple(int(m * 255) for m in spec.image_mean))
    # transformers' shortest-edge resize: the long side is int(shortest_edge * long / short), rounded down
    short, long = sorted(rgb.size)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    new_size = (new_short, new_long) if rgb.width <= rgb.height else (new_long, new_short)  # (width, height)
    resized = rgb.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (resized.width - side) // 2, (resized.height - side) // 2
    pixels = np.asarray(resized, dtype=np.uint8)[top : top + side, left : left + side]  # (side, side, 3)
    logger.debug("clip preprocess: %dx%d -> %dx%d -> crop %d (w x h)", *image.size, *new_size, side)

    lut = _normalization_lut(spec.rescale_factor, spec.image_mean, spec.image_std)  # (3, 256) float32
    normalized = lut[np.arange(3)[:, None, None], pixels.transpose(2, 0, 1)]  # (3, side, side) float32
    patch, grid = spec.patch_size, side // spec.patch_size
    patches = normalized.reshape(3, grid, patch, grid, patch).transpose(1, 3, 0, 2, 4)  # (row, col, C, P, P)
    return PreparedImage(np.ascontiguousarray(patches.reshape(grid * grid, spec.patch_dim)), grid=(1, grid, grid), merge_size=1)  # fmt: skip


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
