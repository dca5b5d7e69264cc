"""Image loading in numpy/Pillow only (the device side never imports torch): paths, bytes, PIL images and arrays
to RGB, with the pixel caps checked from the headers first.

Untrusted images are measured from their headers first (`check_images`): a request above the pixel caps of
`ImageLimits` is refused before any of it is decoded. Model preprocessing (resize, normalize, patchify) is the
manifest's `preprocessing` strategy (`edgevlm.contract.kinds.preprocessing`).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from edgevlm.errors import ImageError, ImageTooLargeError

logger = logging.getLogger(__name__)

# The formats Pillow may open: photos and screenshots. Not every format Pillow knows: EPS, for one, runs Ghostscript.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# Exceptions Pillow raises for corrupt or truncated data while identifying or decoding a file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray


# One image where a list of images is expected: never iterated (a path string would become its characters).
_SINGLE_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)
COLOR_ORDERS = ("rgb", "bgr")


def as_image_list(images: ImageSource | Sequence[ImageSource] | None) -> list[ImageSource]:
    """A request's images as a list: one path, bytes, PIL image or array is one image; None is none."""
    if images is None:
        return []
    if isinstance(images, _SINGLE_IMAGE_TYPES):
        return [images]
    return list(images)


def check_color_order(color_order: Any) -> str:
    """`color_order` if it is "rgb" or "bgr"; anything else is an ImageError that says which to use."""
    if color_order not in COLOR_ORDERS:
        raise ImageError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}: 'bgr' for frames from OpenCV "
                         "(cv2.imread, VideoCapture.read), 'rgb' (the default) for Pillow, imageio and most others")  # fmt: skip
    return color_order


def in_color_order(source: ImageSource, color_order: str) -> ImageSource:
    """`source` with its channels as RGB: an HxWx3 array given as "bgr" is flipped (a view, no copy); other sources
    (files, bytes, PIL images, grayscale arrays) carry their own channel order and pass through."""
    if check_color_order(color_order) == "bgr" and isinstance(source, np.ndarray) and source.ndim == 3 and source.shape[2] == 3:  # fmt: skip
        return source[:, :, ::-1]
    return source


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
