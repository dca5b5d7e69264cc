"""What a generation yields, in one module: `generate` streams `GenerationStep`s, `chat` streams `ChatChunk`s or
returns a `ChatResult`; the last of each carries complete `Timings`. Apart from the pipeline, so that chat and the
server use them without importing the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Timings:
    """Where the time of one generation went, and how much work earlier requests saved it."""

    queue_ms: float = 0.0  # waiting for the model while other requests ran
    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0  # decoding prompt tokens and image embeddings into the KV cache
    image_prefill_ms: float = 0.0  # the part of prefill_ms spent on batches with image embeddings (and their text)
    time_to_first_token_ms: float = 0.0  # from the model's turn to the first sampled token (queue excluded)
    decode_ms: float = 0.0
    # The prompt's tokens, text and image together: what `usage.prompt_tokens` reports and the context must hold
    n_prompt_tokens: int = 0
    n_text_tokens: int = 0  # the prompt's text tokens (template and image markers included)
    n_image_tokens: int = 0  # the prompt's image tokens (n_prompt_tokens = n_text_tokens + n_image_tokens)
    n_encoded_image_tokens: int = 0  # image tokens run through the vision encoder for this request
    n_cached_image_tokens: int = 0  # image tokens whose embeddings came from the embedding cache
    n_reused_tokens: int = 0  # prompt cells (text and image) already in the KV cache from the previous request
    n_prefill_tokens: int = 0  # prompt cells decoded for this request
    n_text_with_images: int = 0  # prompt text tokens decoded in the same batch as an image's embeddings
    n_generated: int = 0
    n_threads: int = 0  # llama.cpp threads this request decoded with (fewer than the profile's when cores were busy)
    profile: str = ""  # the hardware profile the model was loaded with
    vision_dtype: str = ""  # the vision graph's precision that encoded the images (fp32, fp16, int8)

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.n_generated - 1) / (self.decode_ms / 1000) if self.n_generated > 1 and self.decode_ms else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.n_prefill_tokens / (self.prefill_ms / 1000) if self.prefill_ms else 0.0

    @property
    def text_prefill_tokens_per_s(self) -> float:
        text_ms = self.prefill_ms - self.image_prefill_ms
        # every image decoded here got its embeddings from the encoder or the cache
        n_text = self.n_prefill_tokens - self.n_encoded_image_tokens - self.n_cached_image_tokens - self.n_text_with_images  # fmt: skip
        return n_text / (text_ms / 1000) if text_ms > 0 else 0.0


@dataclass
class GenerationStep:
    """One streamed piece: the new text (may be empty while a UTF-8 character is incomplete) and its token.

    The last step has `finish_reason` set ("stop": end of generation token, "length": max_tokens or the context is
    full, "cancelled": the `cancel` event was set, "timeout": the call's `timeout` passed; for these two `token` is
    None) and complete `timings`.
    """

    text: str
    token: int | None
    finish_reason: str | None = None
    timings: Timings = field(default_factory=Timings)


@dataclass
class ChatChunk:
    """A piece of a streamed answer; the last one has `finish_reason` ("stop", "length", "cancelled" or "timeout")."""

    text: str
    finish_reason: str | None
    timings: Timings


@dataclass
class ChatResult:
    """A whole answer: its text, why it ended, and where the time went (`Timings`: vision ms, image tokens,
    prefill and decode tokens per second, and what earlier requests saved)."""

    text: str
    finish_reason: str
    timings: Timings

    @property
    def usage(self) -> dict[str, int]:
        """OpenAI-style token counts: prompt (`Timings.n_prompt_tokens`: text and image tokens), completion, total."""
        prompt = self.timings.n_prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": self.timings.n_generated,
                "total_tokens": prompt + self.timings.n_generated}  # fmt: skip
