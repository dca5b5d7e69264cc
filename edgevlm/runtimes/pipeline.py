"""Stitching: images → ONNX vision embeddings → llama.cpp, with the model's own positions, streamed as text."""

from __future__ import annotations

import codecs
import logging
import os
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

from ..budget import (
    BudgetLimits, BudgetPlan, Crop, ImageRequest, ResolvedLimits, count_spans, plan_images, resolve_limits,
    vision_tower_size,
)  # fmt: skip
from ..bundle import Bundle
from ..errors import BundleError, ContextOverflowError
from ..images import PreparedImage, Qwen2VLPreprocessing, image_size, load_image, preprocess
from .llm import LlamaLM, LlamaSettings, SamplingParams
from .positions import image_positions, text_positions
from .vision import VisionEncoder

logger = logging.getLogger(__name__)


@dataclass
class Timings:
    """Where the time of one generation went."""

    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0  # decoding prompt tokens and image embeddings into the KV cache
    image_prefill_ms: float = 0.0  # the part of prefill_ms spent on image embeddings
    time_to_first_token_ms: float = 0.0
    decode_ms: float = 0.0
    n_prompt_tokens: int = 0  # text tokens of the prompt
    n_image_tokens: int = 0
    n_generated: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.n_generated - 1) / (self.decode_ms / 1000) if self.n_generated > 1 and self.decode_ms else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.n_prompt_tokens + self.n_image_tokens
        return n / (self.prefill_ms / 1000) if self.prefill_ms else 0.0

    @property
    def text_prefill_tokens_per_s(self) -> float:
        text_ms = self.prefill_ms - self.image_prefill_ms
        return self.n_prompt_tokens / (text_ms / 1000) if text_ms > 0 else 0.0


@dataclass
class GenerationStep:
    """One streamed piece: the new text (may be empty while a UTF-8 character is incomplete) and its token.

    The last step has `finish_reason` set ("stop": end of generation token, "length": max_new_tokens or the
    context is full) and complete `timings`.
    """

    text: str
    token: int | None
    finish_reason: str | None = None
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class _Span:
    """A piece of the prompt: text tokens, or one image."""

    tokens: list[int] | None = None
    image: PreparedImage | None = None


def _compile_chat_template(template: str) -> Template:
    """The model's chat template, compiled once in a sandbox (it comes from a file, not from us)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


CropArg = Crop | Sequence[Crop | None] | None


def _image_requests(sizes: list[tuple[int, int]], crop: CropArg, tiles: int | None) -> list[ImageRequest]:
    """One `ImageRequest` per (width, height); `crop` is one Crop for every image or one entry (or None) per image."""
    crops = [crop] * len(sizes) if crop is None or isinstance(crop, Crop) else list(crop)
    if len(crops) != len(sizes):
        raise ValueError(f"{len(crops)} crops given for {len(sizes)} images; give one per image (None: no crop)")
    return [ImageRequest(w, h, crop=c, tiles=tiles or 0) for (w, h), c in zip(sizes, crops, strict=True)]


def _region(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    return image if box == (0, 0, *image.size) else image.crop(box)


class EdgeVLM:
    """A loaded bundle: the vision graph in onnxruntime and the language model in llama.cpp.

    Token limits for images come in layers (`edgevlm.budget.resolve_limits`): arguments of `generate`/`plan`
    (request) > the ones given here (cli: `edgevlm run` flags) > `profile_limits` (a hardware profile) > the
    bundle's manifest `budget` section.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        vision_dtype: str | None = None,
        providers: Sequence[str] | None = None,
        max_image_tokens: int | None = None,
        min_image_tokens: int | None = None,
        image_budget: int | None = None,
    ):
        self.cli_limits = BudgetLimits(max_image_tokens, min_image_tokens, image_budget)  # checked before loading
        self.profile_limits: BudgetLimits | None = None  # hardware profiles will set this layer
        self.bundle = bundle
        manifest = bundle.manifest
        self.manifest = manifest
        if manifest.preprocessing.get("kind") != Qwen2VLPreprocessing.kind:
            raise BundleError(f"preprocessing kind {manifest.preprocessing.get('kind')!r} is not known to this "
                              "edgevlm; upgrade edgevlm.")  # fmt: skip
        self.preprocessing = Qwen2VLPreprocessing.from_dict(manifest.preprocessing)
        plan_images([], self.preprocessing, self.resolve_limits())  # contradicting limits fail before any loading
        vision_dtype = vision_dtype or manifest.vision.default
        if vision_dtype not in manifest.vision.variants:
            raise BundleError(f"bundle {bundle.path} has no {vision_dtype} vision graph; it has "
                              f"{', '.join(sorted(manifest.vision.variants))}.")  # fmt: skip
        threads = n_threads or max(1, os.cpu_count() or 1)
        self.vision_dtype = vision_dtype
        self.vision_tower = vision_tower_size(manifest, vision_dtype)
        self.vision = VisionEncoder(
            bundle.file(manifest.vision.variants[vision_dtype].file),
            providers=list(providers) if providers else None,
            intra_op_threads=threads,
            allow_spinning=False,  # llama.cpp works on the same cores right after
            merge_size=self.preprocessing.merge_size,
        )
        n_ctx = min(n_ctx, manifest.llm.n_ctx_train)
        self.llm = LlamaLM(bundle.file(manifest.llm.file), LlamaSettings(n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers))  # fmt: skip
        self.chat_template = self.llm.chat_template
        if not self.chat_template:
            raise BundleError(f"{bundle.file(manifest.llm.file)} carries no chat template; re-export the bundle.")
        self._chat = _compile_chat_template(self.chat_template)

    # -- prompt ---------------------------------------------------------------------------------------------------
    def render_prompt(self, prompt: str, n_images: int) -> str:
        """The chat-formatted prompt text for one user turn with `n_images` images before the text."""
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        return self._chat.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True)

    def _text_pieces(self, rendered: str) -> list[list[int]]:
        """Tokens of the text between image placeholders: one more piece than there are image spans."""
        if self.manifest.llm.text_normalization:
            rendered = unicodedata.normalize(self.manifest.llm.text_normalization, rendered)
        return [self.llm.tokenize(piece) if piece else [] for piece in rendered.split(self.manifest.tokens.image_pad)]

    def resolve_limits(self, request: BudgetLimits | None = None) -> ResolvedLimits:
        """The token limits in force for a request: request > cli (this object's) > profile > bundle."""
        return resolve_limits(request=request, cli=self.cli_limits, profile=self.profile_limits, bundle=self.manifest.budget)  # fmt: skip

    def plan(
        self,
        prompt: str,
        images: Sequence[Any] = (),
        *,
        max_new_tokens: int = 256,
        max_image_tokens: int | None = None,
        min_image_tokens: int | None = None,
        image_budget: int | None = None,
        crop: CropArg = None,
        tiles: int | None = None,
    ) -> BudgetPlan:
        """The image spans `generate` would encode with these arguments, from the images' sizes only (no decoding)."""
        requests = _image_requests([image_size(image) for image in images], crop, tiles)
        request_limits = BudgetLimits(max_image_tokens, min_image_tokens, image_budget)
        return self._plan(prompt, requests, max_new_tokens, request_limits)[0]

    def _plan(self, prompt: str, requests: list[ImageRequest], max_new_tokens: int, request_limits: BudgetLimits) -> tuple[BudgetPlan, list[list[int]]]:  # fmt: skip
        n_spans = count_spans(requests, self.preprocessing)
        pieces = self._text_pieces(self.render_prompt(prompt, n_spans))
        if len(pieces) - 1 != n_spans:
            raise ValueError(f"the prompt has {len(pieces) - 1} image placeholders but {n_spans} image spans were planned "
                             f"(is {self.manifest.tokens.image_pad} in the prompt text?)")  # fmt: skip
        plan = plan_images(
            requests, self.preprocessing, self.resolve_limits(request_limits), n_ctx=self.llm.n_ctx,
            n_prompt_tokens=sum(map(len, pieces)), max_new_tokens=max_new_tokens, tower=self.vision_tower,
        )  # fmt: skip
        return plan, pieces

    def _prepare(self, prompt: str, images: Sequence[Any], max_new_tokens: int, request_limits: BudgetLimits,
                 crop: CropArg, tiles: int | None) -> tuple[list[_Span], BudgetPlan]:  # fmt: skip
        """Decode the images, plan their spans, and cut/resize/patchify each span exactly as planned."""
        loaded = [load_image(image) for image in images]
        requests = _image_requests([image.size for image in loaded], crop, tiles)
        plan, pieces = self._plan(prompt, requests, max_new_tokens, request_limits)
        prepared = [
            preprocess(_region(loaded[span.image_index], span.box), self.preprocessing, resized_size=span.resized_size)
            for span in plan.spans
        ]
        spans: list[_Span] = []
        for i, piece in enumerate(pieces):
            if piece:
                spans.append(_Span(tokens=piece))
            if i < len(prepared):
                spans.append(_Span(image=prepared[i]))
        return spans, plan

    # -- generation -----------------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        images: Sequence[Any] = (),
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        max_image_tokens: int | None = None,
        min_image_tokens: int | None = None,
        image_budget: int | None = None,
        crop: CropArg = None,
        tiles: int | None = None,
    ) -> Iterator[GenerationStep]:
        """Stream the answer to `prompt` about `images` (paths, bytes, PIL images or HxWx3 uint8 arrays).

        Token limits given here override the loaded ones for this call. `crop` (one `Crop` for every image, or one
        per image) encodes only that region; `tiles` = K encodes each image as a low-resolution global view plus up
        to K tiles, each its own image span (global view first, then tiles row by row). Images always leave room for
        the prompt and `max_new_tokens` in the context; `plan` shows the spans without encoding anything.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        request_limits = BudgetLimits(max_image_tokens, min_image_tokens, image_budget)
        timings = Timings()
        t_begin = time.perf_counter()
        spans, _ = self._prepare(prompt, images, max_new_tokens, request_limits, crop, tiles)
        timings.preprocess_ms = (time.perf_counter() - t_begin) * 1000
        timings.n_prompt_tokens = sum(len(s.tokens) for s in spans if s.tokens is not None)
        timings.n_image_tokens = sum(s.image.n_tokens for s in spans if s.image is not None)
        n_prompt = timings.n_prompt_tokens + timings.n_image_tokens
        if n_prompt + 1 > self.llm.n_ctx:  # text only: the planner reserved room whenever there are images
            raise ContextOverflowError(
                f"the prompt needs {n_prompt} tokens ({timings.n_prompt_tokens} text + {timings.n_image_tokens} "
                f"image) plus at least 1 to generate, but the context holds {self.llm.n_ctx}; shorten the prompt, "
                "use fewer or smaller images, or load with a larger n_ctx."
            )

        t0 = time.perf_counter()
        embeddings = self._encode_images(spans)
        timings.vision_ms = (time.perf_counter() - t0) * 1000

        t_prefill = time.perf_counter()
        position, _ = self._prefill(spans, embeddings, timings=timings)
        timings.prefill_ms = (time.perf_counter() - t_prefill) * 1000

        self.llm.set_sampling(SamplingParams(temperature, top_k, top_p, 0xFFFFFFFF if seed is None else seed))
        yield from self._decode_loop(position, max_new_tokens, timings, t_begin)

    def _prefill(self, spans: list[_Span], embeddings: list[np.ndarray], logits: str = "last", timings: Timings | None = None) -> tuple[int, np.ndarray | None]:  # fmt: skip
        """Decode the prompt into a fresh KV cache; returns the next text position (and all logits if asked).

        `timings.image_prefill_ms` receives the time spent decoding image embeddings."""
        self.llm.reset()
        position = 0
        image_index = 0
        rows = []
        for i, span in enumerate(spans):
            span_logits = logits if logits == "all" or i == len(spans) - 1 else "none"
            if span.tokens is not None:
                rows.append(self.llm.decode_tokens(span.tokens, text_positions(position, len(span.tokens)), logits=span_logits))  # fmt: skip
                position += len(span.tokens)
            else:
                embeds = embeddings[image_index]
                image_index += 1
                if len(embeds) != span.image.n_tokens:
                    raise RuntimeError(f"the vision graph returned {len(embeds)} embeddings for an image the "
                                       f"preprocessor planned as {span.image.n_tokens} tokens")  # fmt: skip
                positions, position = image_positions(self.manifest.positions, position, span.image.grid)
                t_image = time.perf_counter()
                rows.append(self.llm.decode_embeddings(embeds, positions, logits=span_logits))
                if timings is not None:
                    timings.image_prefill_ms += (time.perf_counter() - t_image) * 1000
        return position, (np.concatenate(rows) if logits == "all" else None)

    def prompt_logits(self, prompt: str, images: Sequence[Any] = ()) -> np.ndarray:
        """Logits at every prompt position (text and image), shape (n_prompt, n_vocab): for parity checks."""
        spans, _ = self._prepare(prompt, images, 0, BudgetLimits(), None, None)
        return self._prefill(spans, self._encode_images(spans), logits="all")[1]

    def _encode_images(self, spans: list[_Span]) -> list[np.ndarray]:
        """Vision embeddings of the image spans, in prompt order."""
        return [self.vision.encode(s.image.pixel_patches, s.image.grid) for s in spans if s.image is not None]

    def _decode_loop(
        self, position: int, max_new_tokens: int, timings: Timings, t_begin: float
    ) -> Iterator[GenerationStep]:
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        t_first = None
        for i in range(max_new_tokens):
            token = self.llm.sample()
            now = time.perf_counter()
            if t_first is None:
                t_first = now
                timings.time_to_first_token_ms = (now - t_begin) * 1000
            timings.n_generated = i + 1
            timings.decode_ms = (now - t_first) * 1000
            if self.llm.is_end_of_generation(token):
                yield GenerationStep(utf8.decode(b"", final=True), token, "stop", timings)
                return
            text = utf8.decode(self.llm.token_bytes(token))
            if i == max_new_tokens - 1 or self.llm.n_past >= self.llm.n_ctx:
                yield GenerationStep(text + utf8.decode(b"", final=True), token, "length", timings)
                return
            yield GenerationStep(text, token, None, timings)
            self.llm.decode_tokens([token], text_positions(position, 1))
            position += 1

    def close(self) -> None:
        self.llm.close()
