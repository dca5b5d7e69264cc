"""A prompt as spans: its text pieces (token ids) and, between them, the image spans the planner chose, cut from the
decoded images and preprocessed exactly as planned."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ..budget import BudgetPlan, Crop, ImageRequest
from ..contract.kinds.preprocessing import PreparedImage, preprocess
from ..contract.kinds.tiling import Preprocessing
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
                  vision_dtype: str) -> list[Span]:  # fmt: skip
    """The prompt's spans: text `pieces` with the planned image spans between them. Images are decoded one at a time
    and their spans cut/resized/patchified as planned: at most one decoded image is alive, and its memory goes back
    to the OS after."""
    prepared: list[PreparedImage] = []  # in span order, which is image order
    for index in range(len(images.sources)):
        decoded = images.decode(index)
        prepared += [preprocess(_region(decoded, span.box), preprocessing, resized_size=span.resized_size)
                     for span in plan.spans if span.image_index == index]  # fmt: skip
        del decoded
    if images.sources:
        return_freed_memory()  # else glibc keeps the freed decode buffers resident
    spans: list[Span] = []
    for i, piece in enumerate(pieces):
        if piece:
            spans.append(Span(tokens=piece))
        if i < len(prepared):
            spans.append(Span(image=prepared[i], key=image_key(prepared[i], vision_dtype)))
    return spans


def _region(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    return image if box == (0, 0, *image.size) else image.crop(box)
