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
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..bundle import Bundle
from ..errors import BundleError, ContextOverflowError
from ..images import PreparedImage, Qwen2VLPreprocessing, load_image, preprocess
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


def _render_chat(template: str, messages: list[dict[str, Any]]) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


class EdgeVLM:
    """A loaded bundle: the vision graph in onnxruntime and the language model in llama.cpp."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        vision_dtype: str | None = None,
        providers: Sequence[str] | None = None,
    ):
        self.bundle = bundle
        manifest = bundle.manifest
        self.manifest = manifest
        if manifest.preprocessing.get("kind") != Qwen2VLPreprocessing.kind:
            raise BundleError(f"preprocessing kind {manifest.preprocessing.get('kind')!r} is not known to this "
                              "edgevlm; upgrade edgevlm.")  # fmt: skip
        self.preprocessing = Qwen2VLPreprocessing.from_dict(manifest.preprocessing)
        vision_dtype = vision_dtype or manifest.vision.default
        if vision_dtype not in manifest.vision.variants:
            raise BundleError(f"bundle {bundle.path} has no {vision_dtype} vision graph; it has "
                              f"{', '.join(sorted(manifest.vision.variants))}.")  # fmt: skip
        threads = n_threads or max(1, os.cpu_count() or 1)
        self.vision_dtype = vision_dtype
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

    # -- prompt ---------------------------------------------------------------------------------------------------
    def render_prompt(self, prompt: str, n_images: int) -> str:
        """The chat-formatted prompt text for one user turn with `n_images` images before the text."""
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        return _render_chat(self.chat_template, [{"role": "user", "content": content}])

    def _spans(self, rendered: str, images: list[PreparedImage]) -> list[_Span]:
        if self.manifest.llm.text_normalization:
            rendered = unicodedata.normalize(self.manifest.llm.text_normalization, rendered)
        pieces = rendered.split(self.manifest.tokens.image_pad)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"the prompt has {len(pieces) - 1} image placeholders but {len(images)} images were given")
        spans: list[_Span] = []
        for i, piece in enumerate(pieces):
            if piece:
                spans.append(_Span(tokens=self.llm.tokenize(piece)))
            if i < len(images):
                spans.append(_Span(image=images[i]))
        return spans

    def prepare_images(self, images: Sequence[Any]) -> list[PreparedImage]:
        return [preprocess(load_image(image), self.preprocessing) for image in images]

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
    ) -> Iterator[GenerationStep]:
        """Stream the answer to `prompt` about `images` (paths, bytes, PIL images or HxWx3 uint8 arrays)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        timings = Timings()
        t_begin = time.perf_counter()
        prepared = self.prepare_images(images)
        timings.preprocess_ms = (time.perf_counter() - t_begin) * 1000
        spans = self._spans(self.render_prompt(prompt, len(prepared)), prepared)
        timings.n_prompt_tokens = sum(len(s.tokens) for s in spans if s.tokens is not None)
        timings.n_image_tokens = sum(s.image.n_tokens for s in spans if s.image is not None)
        n_prompt = timings.n_prompt_tokens + timings.n_image_tokens
        if n_prompt + 1 > self.llm.n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {n_prompt} tokens ({timings.n_prompt_tokens} text + {timings.n_image_tokens} "
                f"image) plus at least 1 to generate, but the context holds {self.llm.n_ctx}; shorten the prompt, "
                "use fewer or smaller images, or load with a larger n_ctx."
            )

        embeddings = []
        t0 = time.perf_counter()
        for image in prepared:
            embeddings.append(self.vision.encode(image.pixel_patches, image.grid))
        timings.vision_ms = (time.perf_counter() - t0) * 1000

        t_prefill = time.perf_counter()
        position, _ = self._prefill(spans, embeddings)
        timings.prefill_ms = (time.perf_counter() - t_prefill) * 1000

        self.llm.set_sampling(SamplingParams(temperature, top_k, top_p, 0xFFFFFFFF if seed is None else seed))
        yield from self._decode_loop(position, max_new_tokens, timings, t_begin)

    def _prefill(self, spans: list[_Span], embeddings: list[np.ndarray], logits: str = "last") -> tuple[int, np.ndarray | None]:  # fmt: skip
        """Decode the prompt into a fresh KV cache; returns the next text position (and all logits if asked)."""
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
                rows.append(self.llm.decode_embeddings(embeds, positions, logits=span_logits))
        return position, (np.concatenate(rows) if logits == "all" else None)

    def prompt_logits(self, prompt: str, images: Sequence[Any] = ()) -> np.ndarray:
        """Logits at every prompt position (text and image), shape (n_prompt, n_vocab): for parity checks."""
        prepared = self.prepare_images(images)
        spans = self._spans(self.render_prompt(prompt, len(prepared)), prepared)
        embeddings = [self.vision.encode(image.pixel_patches, image.grid) for image in prepared]
        return self._prefill(spans, embeddings, logits="all")[1]

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
