"""Prefill: make llama.cpp's KV cache hold a prompt of text and image spans, with the model's own positions.

`Prefill` owns what the cache holds (`KVRecord`) and the vision embeddings of recent images (`EmbeddingCache`):
a request decodes only what the previous one did not leave in the cache, and an image seen recently is not encoded
again. Generation and `prompt_logits` both come through here; the tokens generated are recorded here too.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..contract.kinds.positions import Positions, text_positions
from ..results import Timings
from .llm import LlamaLM
from .reuse import EmbeddingCache, KVRecord
from .spans import Span
from .token_embeddings import TokenEmbeddings
from .vision import VisionEncoder

# The most float32 text rows one embeddings batch takes; longer text goes in token batches. A row is the model's input
# width: 64 KiB a token for Qwen3-VL-8B's DeepStack rows, so a long prompt's rows would cost more memory (held about
# three times while the batch is built) than streaming the weights once saves.
ONE_BATCH_TEXT_BYTES = 32 * 2**20

class Prefill:
    """Decodes prompts into one llama.cpp context, reusing what it already holds. Not thread-safe: the caller
    serialises requests (`EdgeVLM` holds its turn and native lock)."""

    def __init__(self, llm: LlamaLM, vision: VisionEncoder, positions: Positions,
                 token_embeddings: TokenEmbeddings | None, embedding_cache_bytes: int,
                 bidirectional_images: bool = False):  # fmt: skip
        """`token_embeddings` None: text and images go in separate batches. `bidirectional_images`: an image's
        embeddings attend to each other (the manifest's `llm.image_attention`), so each image is its own batch,
        decoded with causal attention off; text is never decoded as embeddings then. (The one family with such
        images, Gemma 3, needs that too: llama.cpp scales the embeddings of token batches only, by sqrt(n_embd). A
        family that scales but attends causally would need its own flag.)"""
        self.llm, self.vision, self.positions = llm, vision, positions
        self.bidirectional_images = bidirectional_images
        self.token_embeddings = None if bidirectional_images else token_embeddings
        self.kv = KVRecord()  # what the KV cache holds, for reuse by the next request
        self.embedding_cache = EmbeddingCache(embedding_cache_bytes)

    def prefill(self, spans: list[Span], timings: Timings, cancel: threading.Event | None) -> int | None:
        """Make the KV cache hold the prompt, decoding only what the previous request did not leave there.

        Returns the next text position, or None when cancelled (the cache then holds a prefix the record knows).
        At least the last unit is decoded, so the last logits are this prompt's.
        """
        units = [unit for span in spans for unit in span.units]
        n_reused = min(self.kv.common_prefix(units), len(units) - 1)
        position, timings.n_reused_tokens = self.kv.truncate(n_reused)
        pending: list[tuple[Span, int]] = []  # spans (or their tails) to decode, with the units to skip
        index = 0
        for span in spans:
            if index + len(span.units) > n_reused:
                pending.append((span, max(0, n_reused - index)))
            index += len(span.units)
        try:
            self.llm.truncate(position, timings.n_reused_tokens)
            t0 = time.perf_counter()
            embeddings = {span.key: self._embed(span, timings) for span, _ in pending if span.image is not None}
            timings.vision_ms = (time.perf_counter() - t0) * 1000
            t_prefill = time.perf_counter()
            if cancel is not None and cancel.is_set():
                return None
            if embeddings and self.token_embeddings is not None and self._text_rows_fit(pending):
                position = self._prefill_as_one_batch(pending, embeddings, position, timings)
            else:
                for i, (span, skip) in enumerate(pending):
                    if i and cancel is not None and cancel.is_set():
                        return None
                    logits = "last" if i == len(pending) - 1 else "none"
                    if span.tokens is not None:
                        position = self._decode_text(span.tokens[skip:], position, logits, timings)
                    else:
                        t_image = time.perf_counter()
                        position = self._decode_image(span, embeddings[span.key], position, logits, timings)
                        timings.image_prefill_ms += (time.perf_counter() - t_image) * 1000
            timings.prefill_ms = (time.perf_counter() - t_prefill) * 1000
            return position
        except BaseException:
            self.forget()  # a failed or interrupted decode may leave cells the record does not know
            raise

    def prompt_logits(self, spans: list[Span]) -> np.ndarray:
        """Logits at every prompt position (text and image), shape (n_prompt, n_vocab), decoded from scratch."""
        self.forget()  # every position's logits: decode from scratch; nothing is recorded for reuse
        position = 0
        rows = []
        for span in spans:
            if span.tokens is not None:
                rows.append(self.llm.decode_tokens(span.tokens, text_positions(position, len(span.tokens)), logits="all"))  # fmt: skip
                position += len(span.tokens)
            else:
                embeds = self.vision.encode(span.image.pixel_patches, span.image.grid, span.image.graph_inputs)
                positions, position = self.positions.image_positions(position, span.image.position_grid)
                rows.append(self.llm.decode_embeddings(embeds, positions, logits="all", bidirectional=self.bidirectional_images))  # fmt: skip
        return np.concatenate(rows)

    def append_generated(self, token: int, position: int) -> None:
        """Decode a sampled token at `position` (text) and record it, so a follow-up that repeats it reuses it."""
        try:
            self.llm.decode_tokens([token], text_positions(position, 1))
        except BaseException:
            self.forget()
            raise
        self.kv.append(token, position, 1, position + 1)

    def forget(self) -> None:
        """Empty the KV cache and its record."""
        self.llm.reset()
        self.kv.clear()

    def clear_caches(self) -> None:
        """Forget the KV prefix and the cached image embeddings: the next request starts cold."""
        self.forget()
        self.embedding_cache.clear()

    def close(self) -> None:
        """Unmap the GGUF's token embedding rows (the model and vision session are closed by their owner)."""
        self.token_embeddings = None

    def _text_rows_fit(self, pending: list[tuple[Span, int]]) -> bool:
        """Whether the pending text's embedding rows stay within `ONE_BATCH_TEXT_BYTES`."""
        n_text = sum(len(span.tokens) - skip for span, skip in pending if span.tokens is not None)
        return n_text * self.token_embeddings.row_width * 4 <= ONE_BATCH_TEXT_BYTES

    def _prefill_as_one_batch(self, pending: list[tuple[Span, int]], embeddings: dict[str, np.ndarray], position: int,
                              timings: Timings) -> int:  # fmt: skip
        """Decode the pending text and images as ONE embeddings batch (the text's rows looked up in the GGUF): a
        CPU streams the weights once instead of once per piece (`token_embeddings`)."""
        rows, positions = [], []
        for span, skip in pending:
            if span.tokens is not None:
                tokens = span.tokens[skip:]
                rows.append(self.token_embeddings(tokens))
                positions.append(self.positions.text_embedding_positions(position, len(tokens)))
                position = self._record_text(tokens, position)
                timings.n_text_with_images += len(tokens)
            else:
                embeds = embeddings[span.key]
                image_pos, position = self._record_image(span, len(embeds), position)
                rows.append(embeds)
                positions.append(image_pos)
        t_batch = time.perf_counter()
        self.llm.decode_embeddings(np.concatenate(rows), np.concatenate(positions, axis=1), logits="last")
        timings.image_prefill_ms += (time.perf_counter() - t_batch) * 1000
        timings.n_prefill_tokens += sum(len(r) for r in rows)
        return position

    def _decode_text(self, tokens: list[int], position: int, logits: str, timings: Timings) -> int:
        self.llm.decode_tokens(tokens, text_positions(position, len(tokens)), logits=logits)
        timings.n_prefill_tokens += len(tokens)
        return self._record_text(tokens, position)

    def _record_text(self, tokens: list[int], position: int) -> int:
        """Note text tokens in the KV record from `position` on; returns the position after them."""
        for token in tokens:
            self.kv.append(token, position, 1, position + 1)
            position += 1
        return position

    def _decode_image(self, span: Span, embeds: np.ndarray, position: int, logits: str, timings: Timings) -> int:
        positions, next_position = self._record_image(span, len(embeds), position)
        self.llm.decode_embeddings(embeds, positions, logits=logits, bidirectional=self.bidirectional_images)
        timings.n_prefill_tokens += len(embeds)
        return next_position

    def _record_image(self, span: Span, n_embeds: int, position: int) -> tuple[np.ndarray, int]:
        """Note an image in the KV record from `position` on; returns its embeddings' positions and the position
        after it (a failed decode makes `prefill` forget the whole record)."""
        positions, next_position = self.positions.image_positions(position, span.image.position_grid)
        self.kv.append(span.key, position, n_embeds, next_position)
        return positions, next_position

    def _embed(self, span: Span, timings: Timings) -> np.ndarray:
        """Vision embeddings of one image span, from the cache when this image was encoded recently."""
        embeds = self.embedding_cache.get(span.key)
        if embeds is not None:
            timings.n_cached_image_tokens += len(embeds)
            return embeds
        embeds = self.vision.encode(span.image.pixel_patches, span.image.grid, span.image.graph_inputs)
        if len(embeds) != span.image.n_tokens:
            raise RuntimeError(f"the vision graph returned {len(embeds)} embeddings for an image the "
                               f"preprocessor planned as {span.image.n_tokens} tokens")  # fmt: skip
        timings.n_encoded_image_tokens += len(embeds)
        self.embedding_cache.put(span.key, embeds)
        return embeds
