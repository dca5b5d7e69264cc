"""A prompt as spans: its text pieces (token ids) and, between them, the image spans the planner chose, cut from the
decoded images and preprocessed exactly as planned (a tiling model's image: its views and the text between them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from ..budget import BudgetPlan, Crop, ImageRequest
from ..contract.kinds.preprocessing import PreparedImage, preprocess
from ..contract.kinds.tiling import Preprocessing, TiledPreprocessing, TileGrid
from ..images import CheckedImages
from .reuse import Unit, image_key
from .vision import return_freed_memory

CropArg = Crop | Sequence[Crop | None] | None


@dataclass(frozen=True)
class Span:
    """A piece of the prompt: text tokens, or one image (with its content key for the caches)."""

    tokens: list[int] | None = None
    image: PreparedImage | None = None
    key: str = ""

    @property
    def units(self) -> list[Unit]:
        return list(self.tokens) if self.tokens is not None else [self.key]


def image_requests(sizes: list[tuple[int, int]], crop: CropArg, tiles: int | None) -> list[ImageRequest]:
    """One `ImageRequest` per (width, height); `crop` is one Crop for every image or one entry (or None) per image."""
    crops = [crop] * len(sizes) if crop is None or isinstance(crop, Crop) else list(crop)
    if len(crops) != len(sizes):
        raise ValueError(f"{len(crops)} crops given for {len(sizes)} images; give one per image (None: no crop)")
    return [ImageRequest(w, h, crop=c, tiles=tiles or 0) for (w, h), c in zip(sizes, crops, strict=True)]


def prepare_spans(pieces: list[list[int]], images: CheckedImages, plan: BudgetPlan, preprocessing: Preprocessing,
                  vision_dtype: str, tokenize: Callable[[str], list[int]]) -> list[Span]:  # fmt: skip
    """The prompt's spans: text `pieces` with the planned images between them. Images are decoded one at a time
    and their spans cut/resized/patchified as planned: at most one decoded image is alive, and its memory goes back
    to the OS after. A tiling model's image becomes its layout: its views, with the layout's text between them
    (`tokenize`d with special tokens parsed)."""
    per_image: list[list[Span]] = []  # in image order; pieces hold one placeholder per span (per image when tiled)
    for index in range(len(images.sources)):
        decoded = images.decode(index)
        planned = [span for span in plan.spans if span.image_index == index]
        if isinstance(preprocessing, TiledPreprocessing):
            per_image.append(_tiled(_region(decoded, planned[0].box), planned[0].tiling, preprocessing, vision_dtype, tokenize))  # fmt: skip
        else:
            per_image += [[_image_span(preprocess(_region(decoded, span.box), preprocessing, resized_size=span.resized_size), vision_dtype)]
                          for span in planned]  # fmt: skip
        del decoded
    if images.sources:
        return_freed_memory()  # else glibc keeps the freed decode buffers resident
    spans: list[Span] = []
    for i, piece in enumerate(pieces):
        if piece:
            spans.append(Span(tokens=piece))
        if i < len(per_image):
            spans += per_image[i]
    return spans


def _tiled(region: Image.Image, grid: TileGrid, spec: TiledPreprocessing, vision_dtype: str,
           tokenize: Callable[[str], list[int]]) -> list[Span]:  # fmt: skip
    """A tiling model's image as spans: the layout's text and views in order."""
    views = spec.prepare_views(region, grid)
    out: list[Span] = []
    for item in spec.layout(grid, *region.size):
        if isinstance(item, str):
            out += [Span(tokens=tokens)] if (tokens := tokenize(item)) else []
        else:
            out.append(_image_span(views[item], vision_dtype))
    return out


def _image_span(image: PreparedImage, vision_dtype: str) -> Span:
    return Span(image=image, key=image_key(image, vision_dtype))


def _region(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    return image if box == (0, 0, *image.size) else image.crop(box)
