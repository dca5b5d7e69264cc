"""Stitching: images → ONNX vision embeddings → llama.cpp, with the model's own positions, streamed as text."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..budget import BudgetLimits, BudgetPlan, ImageRequest, ResolvedLimits, model_token_range
from ..bundle import Bundle
from ..chat import (  # fmt: skip
    ImagePolicy,
    check_sampling,
    collect,
    grammar_for,
    parse_messages,
    parse_stop,
    resolve_images,
    stop_at,
)
from ..errors import BundleError, ContextOverflowError, ModelClosedError, ProfileError
from ..images import CheckedImages, ImageLimits, ImageSource, as_image_list, check_images, in_color_order
from ..planner import Planner
from ..profiles import Overrides, Profile, resolve_settings
from ..profiles.host import cores_taken_by_others
from ..results import ChatChunk, ChatResult, GenerationStep, Timings
from .decode import decode
from .llm import LlamaLM, SamplingParams
from .prefill import Prefill
from .prompt import PromptRenderer, Segment, SpecialTokens, joined
from .spans import CropArg, Span, image_requests, prepare_spans
from .token_embeddings import open_token_embeddings
from .turns import StopSignal, Turns
from .vision import VisionEncoder

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256  # the answer's cap when a call gives none

# Vision embeddings kept for repeated images: a 448x448 frame of a 2B model is 1.5 MB, so about 40 frames.
EMBEDDING_CACHE_BYTES = 64 * 2**20


class EdgeVLM:
    """A loaded bundle: the vision graph in onnxruntime and the language model in llama.cpp.

    The façade over the runtime's parts: `prompts` renders the chat template, `planner` plans image spans
    (`spans` cuts them from the images), `vision` encodes them, `prefill` fills llama.cpp's KV cache (reusing what
    earlier requests left) and `decode` streams the answer; this class loads them, takes turns and checks requests.
    Token limits for images come in layers (`planner`): arguments of `generate`/`plan` (request) > the ones given
    here (cli: `edgevlm run` flags) > the hardware profile's (after fitting its memory ceiling) > the bundle's
    manifest `budget` section. `settings` is everything the bundle was loaded with
    (`edgevlm.profiles.RuntimeSettings`).
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        profile: str | os.PathLike | Profile = "auto",
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        vision_dtype: str | None = None,
        providers: Sequence[Any] | None = None,
        max_image_tokens: int | None = None,
        min_image_tokens: int | None = None,
        image_budget: int | None = None,
        max_tiles: int | None = None,
    ):
        """Load `bundle` with a hardware profile ("auto", a shipped name, a TOML path or a `Profile`); every other
        argument given beats the profile's value (`edgevlm.profiles.resolve_settings`)."""
        cli_limits = BudgetLimits(max_image_tokens, min_image_tokens, image_budget, max_tiles)  # checked before loading
        self.bundle = bundle
        manifest = bundle.manifest
        self.manifest = manifest
        self.preprocessing = manifest.preprocessing
        overrides = Overrides(n_ctx, n_threads, n_gpu_layers, vision_dtype, tuple(providers) if providers else None, cli_limits)  # fmt: skip
        self.settings = resolve_settings(profile, bundle, overrides)
        self.profile = self.settings.profile
        vision_dtype = self.settings.vision_dtype
        planner = Planner.for_settings(manifest, self.settings, cli_limits)  # contradicting limits fail before loading
        if vision_dtype not in manifest.vision.variants:
            raise BundleError(f"bundle {bundle.path} has no {vision_dtype} vision graph; it has "
                              f"{', '.join(sorted(manifest.vision.variants))}. Load one of those, or export the bundle "
                              f"again with `--vision-dtype {vision_dtype}` (repeat the flag to keep the others).")  # fmt: skip
        self.vision_dtype = vision_dtype
        self.vision = VisionEncoder(
            bundle.file(manifest.vision.variants[vision_dtype].file),
            providers=list(self.settings.providers),
            intra_op_threads=self.settings.intra_op_threads,
            allow_spinning=self.settings.allow_spinning,
            merge_size=self.preprocessing.merge_size,
            patch_positions=manifest.vision.patch_positions,
        )
        self._check_vision_providers()
        self.llm = LlamaLM(bundle.file(manifest.llm.file), self.settings.llama)
        if (self.llm.n_embd, self.llm.n_embd_inp) != (manifest.llm.embedding_length, manifest.vision.embedding_dim):
            raise BundleError(f"{bundle.file(manifest.llm.file)} has embeddings of {self.llm.n_embd} values and input rows of "
                              f"{self.llm.n_embd_inp}, the manifest says {manifest.llm.embedding_length} and "
                              f"{manifest.vision.embedding_dim}: the files do not belong together. Re-export the bundle.")  # fmt: skip
        self.planner = planner.with_context(self.llm.n_ctx)
        token_embeddings = open_token_embeddings(self.llm.path, self.llm.n_embd_inp)
        self.prefill = Prefill(self.llm, self.vision, manifest.positions, token_embeddings, EMBEDDING_CACHE_BYTES,
                               manifest.llm.image_attention == "bidirectional")  # fmt: skip
        self.chat_template = self.llm.chat_template
        if not self.chat_template:
            raise BundleError(f"{bundle.file(manifest.llm.file)} carries no chat template; re-export the bundle.")
        specials = SpecialTokens(self.llm.special_tokens(), also=(manifest.tokens.image_pad,))
        tokens = manifest.tokens
        self.prompts = PromptRenderer(self.chat_template, specials, tokens.image_pad, manifest.llm.text_normalization,
                                      (tokens.image_prefix, tokens.image_suffix))  # fmt: skip
        self.turns = Turns()  # one generation at a time; the others wait, first come, first served
        # held while llama.cpp or onnxruntime runs for this model, so close() never frees what they use
        self._native = threading.RLock()
        self._closed = False

    def _check_vision_providers(self) -> None:
        """onnxruntime drops a provider it cannot start (no CUDA libraries, say) without failing: say so."""
        asked = [p if isinstance(p, str) else p[0] for p in self.settings.providers]
        dropped = [p for p in asked if p not in self.vision.providers]
        if dropped:
            message = (f"onnxruntime could not start {', '.join(dropped)} (is the CUDA/TensorRT runtime installed?): "
                       f"the vision graph runs on {', '.join(self.vision.providers)}")  # fmt: skip
            if self.profile.strict:
                raise ProfileError(f"{message} (profile {self.profile.name!r} is strict)")
            logger.warning("%s", message)

    # -- prompt ---------------------------------------------------------------------------------------------------
    def render_prompt(self, prompt: str, n_images: int) -> str:
        """The chat-formatted prompt text for one user turn with `n_images` images before the text."""
        return joined(self._prompt_segments(prompt, n_images))

    def _prompt_segments(self, prompt: str, n_images: int) -> list[Segment]:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        return self.prompts.segments([{"role": "user", "content": content}])

    def render_messages(self, messages: list[dict[str, Any]]) -> str:
        """The chat-formatted text of a conversation, ending where the assistant speaks next.

        `messages` are in the template's form: role and content, a string or parts {"type": "text", "text": …} and
        {"type": "image"} (`edgevlm.chat.parse_messages` makes them from OpenAI-style messages). Their texts are
        text: special tokens' texts in them are never parsed as special tokens (`edgevlm.runtimes.prompt`).
        """
        return joined(self.prompts.segments(messages))

    def resolve_limits(self, request: BudgetLimits | None = None) -> ResolvedLimits:
        """The token limits of the layers for a request: request > cli (this object's) > profile > bundle."""
        return self.planner.layered_limits(request)

    def plan(
        self,
        prompt: str,
        images: ImageSource | Sequence[ImageSource] = (),
        *,
        max_tokens: int | None = None,
        max_image_tokens: int | None = None,
        min_image_tokens: int | None = None,
        image_budget: int | None = None,
        crop: CropArg = None,
        tiles: int | None = None,
        image_limits: ImageLimits | None = None,
        max_new_tokens: int | None = None,
    ) -> BudgetPlan:
        """The image spans `generate` would encode with these arguments, from the images' sizes only (no decoding);
        images above the pixel caps are refused as `generate` refuses them."""
        max_tokens = _max_tokens(max_tokens, max_new_tokens, "plan")
        requests = image_requests(
            list(check_images(as_image_list(images), image_limits).sizes), crop, self._tiles(tiles)
        )
        request_limits = BudgetLimits(max_image_tokens, min_image_tokens, image_budget)
        return self._plan(lambda n: self._prompt_segments(prompt, n), requests, max_tokens, request_limits)[0]

    def _plan(self, render: Callable[[int], list[Segment]], requests: list[ImageRequest], max_tokens: int, request_limits: BudgetLimits) -> tuple[BudgetPlan, list[list[int]]]:  # fmt: skip
        """Plan the image spans; `render(n_spans)` gives the prompt with one image placeholder per span."""
        n_spans = self.planner.count_spans(requests)
        with self._using():
            pieces = self.prompts.pieces(render(n_spans), self.llm)
        if len(pieces) - 1 != n_spans:
            raise ValueError(f"the prompt has {len(pieces) - 1} image placeholders but {n_spans} image spans were planned "
                             f"(is {self.manifest.tokens.image_pad} in the prompt text?)")  # fmt: skip
        n_text = sum(map(len, pieces))
        reserve = self._answer_room(requests, request_limits, n_text, max_tokens)
        plan = self.planner.plan(requests, request_limits, n_prompt_tokens=n_text, max_new_tokens=reserve,
                                 count_text=self._count_layout_text)  # fmt: skip
        return plan, pieces

    def _tiles(self, tiles: int | None) -> int | None:
        """A request's `tiles`, capped by the `max_tiles` of the limits below it (cli, profile, bundle)."""
        cap = self.planner.limits().max_tiles
        return min(tiles, cap) if tiles and cap else tiles

    def _layout_tokens(self, text: str) -> list[int]:
        """Tokens of text a tiling model writes between an image's views (special tokens parsed)."""
        with self._using():
            return self.llm.tokenize(text, parse_special=True, add_special=False)

    def _count_layout_text(self, texts: Sequence[str]) -> int:
        return sum(len(self._layout_tokens(text)) for text in texts)

    def _answer_room(self, requests: list[ImageRequest], request_limits: BudgetLimits, n_text: int, max_tokens: int) -> int:  # fmt: skip
        """The tokens kept free for the answer while images are planned: `max_tokens`, or less when the context
        cannot hold it beside the prompt and every image at its fewest tokens. `max_tokens` caps the answer, as
        with text alone: a request asking for more than the context holds is answered until the context is full
        (finish_reason "length"), with images planned at their smallest, instead of refused."""
        if not requests:
            return max_tokens
        low = max(self.planner.limits(request_limits).min_image_tokens or 0, model_token_range(self.preprocessing)[0])
        room = self.llm.n_ctx - n_text - self.planner.count_spans(requests) * low
        if max_tokens > room >= 1:
            logger.info("max_tokens=%d does not fit beside the prompt and images in the context of %d: the answer "
                        "may take %d tokens", max_tokens, self.llm.n_ctx, room)  # fmt: skip
            return room
        return max_tokens

    def _prepare(self, render: Callable[[int], list[Segment]], images: CheckedImages, max_tokens: int,
                 request_limits: BudgetLimits, crop: CropArg, tiles: int | None) -> list[Span]:  # fmt: skip
        """Plan the image spans from the checked sizes, then cut them from the images exactly as planned."""
        requests = image_requests(list(images.sizes), crop, self._tiles(tiles))
        plan, pieces = self._plan(render, requests, max_tokens, request_limits)
        return prepare_spans(pieces, images, plan, self.preprocessing, self.vision_dtype, self._layout_tokens)

    # -- generation -----------------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        images: ImageSource | Sequence[ImageSource] = (),
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        max_image_tokens: int | None = None,
        min_image_tokens: int | None = None,
        image_budget: int | None = None,
        crop: CropArg = None,
        tiles: int | None = None,
        grammar: str | None = None,
        cancel: threading.Event | None = None,
        timeout: float | None = None,
        image_limits: ImageLimits | None = None,
        color_order: str = "rgb",
        max_new_tokens: int | None = None,
    ) -> Iterator[GenerationStep]:
        """Stream the answer to `prompt` about `images`: one image or a list of them, each a path, bytes, a PIL image
        or an HxWx3 uint8 array (its channels in `color_order`: "rgb", the default, or "bgr" for OpenCV frames).

        `max_tokens` caps the answer (`max_new_tokens` is its deprecated old name). Token limits given here override
        the loaded ones for this call. `crop` (one `Crop` for every image, or one per image) encodes only that
        region; `tiles` = K encodes each image as a low-resolution global view plus up to K tiles, each its own image
        span (global view first, then tiles row by row). Images leave room for the prompt and `max_tokens` in the
        context (or, when the context cannot hold that many, take their fewest tokens and the answer the rest);
        `plan` shows the spans without encoding anything.
        `grammar` (GBNF, rule `root`) restricts the answer; setting `cancel` (from any thread) ends the stream
        before the next token with finish_reason "cancelled"; `timeout` seconds after the first step was asked for
        (waiting for the model's turn included), it ends with finish_reason "timeout" (checked between prefill
        pieces and between tokens). Generations run one at a time (see `chat`).
        `image_limits` caps decoded pixels per image and per call (default `ImageLimits()`: 50 and 100 megapixels),
        checked from the headers before the model's turn; images are decoded in it.
        """
        max_tokens = _max_tokens(max_tokens, max_new_tokens, "generate")
        check_sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                       max_image_tokens=max_image_tokens, timeout=timeout)  # fmt: skip
        sources = [in_color_order(image, color_order) for image in as_image_list(images)]
        checked = check_images(sources, image_limits)
        sampling = SamplingParams(temperature, top_k, top_p, 0xFFFFFFFF if seed is None else seed, grammar)
        request_limits = BudgetLimits(max_image_tokens, min_image_tokens, image_budget)
        yield from self._stream(lambda n: self._prompt_segments(prompt, n), checked, max_tokens, sampling,
                                request_limits, crop, tiles, StopSignal(cancel, timeout))  # fmt: skip

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        stream: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        top_p: float = 0.95,
        top_k: int = 40,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        response_format: Mapping[str, Any] | None = None,
        max_image_tokens: int | None = None,
        min_image_tokens: int | None = None,
        image_budget: int | None = None,
        crop: CropArg = None,
        tiles: int | None = None,
        cancel: threading.Event | None = None,
        timeout: float | None = None,
        image_policy: ImagePolicy | None = None,
        color_order: str = "rgb",
    ) -> ChatResult | Iterator[ChatChunk]:
        """Answer an OpenAI-style conversation: the whole `ChatResult`, or with `stream=True` an iterator of
        `ChatChunk`s (text pieces; the last one has finish_reason and complete timings).

        `messages`: dicts with `role` (system, user, assistant) and `content`, a string or a list of parts:
        {"type": "text", "text": …}, {"type": "image_url", "image_url": {"url": …}} with a `data:` URL, a file path
        or a file:// URL, and {"type": "image", "image": …} with a path, bytes, a PIL image or an HxWx3 uint8 array
        (channels in the part's "color_order", else `color_order`: "rgb" or "bgr" for OpenCV frames).
        `image_policy` says where images may come from and how large they may be (default: any local regular file,
        no remote URL, `ImageLimits()`).
        `response_format`: {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": …}} or
        {"type": "gbnf", "grammar": …} constrains the answer through a llama.cpp grammar. `stop` strings end the
        answer (they are not part of it). `cancel`, set from any thread, ends it before the next token
        (finish_reason "cancelled"); `timeout` seconds after this call it ends with finish_reason "timeout".
        `max_tokens` and the image controls (`max_image_tokens`, `min_image_tokens`, `image_budget`, `crop`, `tiles`,
        over every image of the conversation in order) are `generate`'s.

        Requests on one model run one at a time, in any thread; a follow-up that repeats the conversation so far
        decodes only what is new (the KV cache is reused up to the longest common prefix) and does not re-encode
        an image seen recently (see `Timings`). The request is checked, remote images fetched and every image's header
        read against the pixel caps before it waits for the model, so a bad request fails at once
        (`edgevlm.EdgeVLMError`); images are decoded only in the model's turn, one at a time.
        """
        stop_signal = StopSignal(cancel, timeout)  # the deadline runs from the call (image fetches included)
        check_sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                       max_image_tokens=max_image_tokens, timeout=timeout)  # fmt: skip
        template_messages, sources = parse_messages(messages, color_order=color_order)
        grammar = grammar_for(response_format)
        if grammar is not None:
            with self._using():
                self.llm.check_grammar(grammar)
        stops = parse_stop(stop)
        policy = image_policy or ImagePolicy()  # images last: a remote one may take the fetch deadline
        images = check_images(resolve_images(sources, policy), policy.limits)  # headers only: decoding waits
        spans_per_image = [
            self.planner.count_spans([r]) for r in image_requests(list(images.sizes), crop, self._tiles(tiles))
        ]
        segments = self.prompts.segments(_one_part_per_span(template_messages, spans_per_image))
        sampling = SamplingParams(temperature, top_k, top_p, 0xFFFFFFFF if seed is None else seed, grammar)
        request_limits = BudgetLimits(max_image_tokens, min_image_tokens, image_budget)
        steps = self._stream(lambda n: segments, images, max_tokens, sampling, request_limits, crop, tiles, stop_signal)  # fmt: skip
        chunks = stop_at(steps, stops)
        return chunks if stream else collect(chunks)

    def _stream(self, render: Callable[[int], list[Segment]], images: CheckedImages, max_tokens: int, sampling: SamplingParams,
                request_limits: BudgetLimits, crop: CropArg, tiles: int | None,
                stop: StopSignal) -> Iterator[GenerationStep]:  # fmt: skip
        """Wait for the model, then prepare, encode, prefill and stream one request; a step that ends it early says
        "timeout" when `stop`'s deadline passed, else "cancelled".

        The turn is held from the model's turn until the stream ends or is closed (a consumer that stops early
        should close it; dropping the last reference does that in CPython).
        """
        for step in self._steps(render, images, max_tokens, sampling, request_limits, crop, tiles, stop):
            if step.finish_reason == "cancelled" and stop.timed_out:
                step.finish_reason = "timeout"
            yield step

    def _steps(self, render: Callable[[int], list[Segment]], images: CheckedImages, max_tokens: int, sampling: SamplingParams,
               request_limits: BudgetLimits, crop: CropArg, tiles: int | None,
               cancel: threading.Event) -> Iterator[GenerationStep]:  # fmt: skip
        t_queue = time.perf_counter()
        if not self.turns.take(cancel):
            self._check_open()
            yield GenerationStep("", None, "cancelled", Timings(queue_ms=(time.perf_counter() - t_queue) * 1000))
            return
        try:
            timings = Timings(queue_ms=(time.perf_counter() - t_queue) * 1000, profile=self.profile.name,
                              vision_dtype=self.vision_dtype)  # fmt: skip
            t_begin = time.perf_counter()
            with self._using():
                self._adapt_threads(timings)
                spans = self._prepare(render, images, max_tokens, request_limits, crop, tiles)
                timings.preprocess_ms = (time.perf_counter() - t_begin) * 1000
                position = self._prefill_request(spans, sampling, timings, cancel)
            if position is None:
                yield GenerationStep("", None, "cancelled", timings)
                return
            steps = decode(self.llm, self.prefill, position, max_tokens, timings, t_begin, cancel)
            while True:
                with self._native:  # one token's native work at a time; close() frees the model between tokens
                    step = GenerationStep("", None, "cancelled", timings) if self._closed else next(steps)
                yield step
                if step.finish_reason is not None:
                    return
        finally:
            self.turns.give_back()

    def _adapt_threads(self, timings: Timings) -> None:
        """With the profile's `adapt_threads`, leave the cores other processes are using right now to them."""
        if self.settings.llama.adapt_threads:
            taken = cores_taken_by_others()
            n_threads, n_threads_batch = self.llm.loaded_threads
            self.llm.use_threads(max(1, n_threads - taken), max(1, n_threads_batch - taken))
        timings.n_threads = self.llm.n_threads

    def _prefill_request(self, spans: list[Span], sampling: SamplingParams, timings: Timings,
                         cancel: threading.Event | None) -> int | None:  # fmt: skip
        """Check that the prompt fits, set the sampler and prefill: the next text position, or None when cancelled."""
        timings.n_text_tokens = sum(len(s.tokens) for s in spans if s.tokens is not None)
        timings.n_image_tokens = sum(s.image.n_tokens for s in spans if s.image is not None)
        timings.n_prompt_tokens = n_prompt = timings.n_text_tokens + timings.n_image_tokens
        if n_prompt + 1 > self.llm.n_ctx:  # text only: the planner reserved room whenever there are images
            raise ContextOverflowError(
                f"the prompt needs {n_prompt} tokens ({timings.n_text_tokens} text + {timings.n_image_tokens} "
                f"image) plus at least 1 to generate, but the context holds {self.llm.n_ctx}; shorten the prompt, "
                "use fewer or smaller images, or load with a larger n_ctx."
            )
        self.llm.set_sampling(sampling)
        return self.prefill.prefill(spans, timings, cancel)

    def clear_caches(self) -> None:
        """Forget the reusable KV prefix and the cached image embeddings: the next request starts cold."""
        with self._exclusive():
            self.prefill.clear_caches()

    def prompt_logits(self, prompt: str, images: Sequence[Any] = ()) -> np.ndarray:
        """Logits at every prompt position (text and image), shape (n_prompt, n_vocab): for parity checks."""
        with self._exclusive():
            spans = self._prepare(lambda n: self._prompt_segments(prompt, n), check_images(as_image_list(images)), 0, BudgetLimits(), None, None)  # fmt: skip
            return self.prefill.prompt_logits(spans)

    # -- lifetime -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """Hold the model's native parts for a piece of work; a closed model raises `ModelClosedError`."""
        with self._native:
            self._check_open()
            yield

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The model's turn and its native parts, for work outside generation (parity logits, clearing caches)."""
        if not self.turns.take():
            self._check_open()
        try:
            with self._using():
                yield
        finally:
            self.turns.give_back()

    def _check_open(self) -> None:
        if self._closed:
            raise ModelClosedError("this model was closed (EdgeVLM.close()); load the bundle again with edgevlm.load()")

    def close(self) -> None:
        """Free the model. A generation running in another thread ends before its next token (finish_reason
        "cancelled"), requests waiting for their turn and every later call raise `ModelClosedError`. Waits for
        llama.cpp or onnxruntime work in progress (at most one token's or one prefill's). Closing twice is fine."""
        self._closed = True  # before the lock: waiters and the running generation stop at their next step
        self.turns.close()
        with self._native:
            self.llm.close()
            self.vision.close()
            self.prefill.close()

    def __enter__(self) -> EdgeVLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _max_tokens(max_tokens: int | None, max_new_tokens: int | None, method: str) -> int:
    """`max_tokens` (None: `DEFAULT_MAX_TOKENS`), or the value of its deprecated old name `max_new_tokens` (with a
    DeprecationWarning)."""
    if max_new_tokens is None:
        return DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    warnings.warn(f"{method}(max_new_tokens=...) is deprecated: use max_tokens=..., the name chat, the server and "
                  "the CLI use", DeprecationWarning, stacklevel=3)  # fmt: skip
    if max_tokens is not None:
        raise TypeError(f"{method}() got max_tokens={max_tokens} and max_new_tokens={max_new_tokens}: give max_tokens only")  # fmt: skip
    return max_new_tokens


def _one_part_per_span(messages: list[dict[str, Any]], spans_per_image: list[int]) -> list[dict[str, Any]]:
    """Template messages with each image part repeated once per image span it becomes (a tiled image is a global
    view and its tiles, adjacent, as `generate` places them)."""
    counts = iter(spans_per_image)
    return [
        {
            **m,
            "content": [p for part in m["content"] for p in [part] * (next(counts) if part["type"] == "image" else 1)],
        }  # fmt: skip
        for m in messages
    ]
