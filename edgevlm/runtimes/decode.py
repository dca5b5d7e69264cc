"""The decode loop: sample, stream the text as it completes UTF-8 characters, and record each token for reuse."""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Iterator

from ..results import GenerationStep, Timings
from .llm import LlamaLM
from .prefill import Prefill


def decode(llm: LlamaLM, prefill: Prefill, position: int, max_new_tokens: int, timings: Timings, t_begin: float,
           cancel: threading.Event | None) -> Iterator[GenerationStep]:  # fmt: skip
    """Steps of up to `max_new_tokens` tokens after a prompt prefilled up to text `position`; the last one has a
    finish_reason ("stop", "length" or "cancelled"). `timings` is filled in as it goes, from `t_begin`."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    t_first = None
    token = None
    for i in range(max_new_tokens):
        if cancel is not None and cancel.is_set():
            yield GenerationStep(utf8.decode(b"", final=True), None, "cancelled", timings)
            return
        if token is not None:  # the previous token goes into the cache only when another one is wanted
            prefill.append_generated(token, position)
            position += 1
        token = llm.sample()
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            timings.time_to_first_token_ms = (now - t_begin) * 1000
        timings.n_generated = i + 1
        timings.decode_ms = (now - t_first) * 1000
        if llm.is_end_of_generation(token):
            yield GenerationStep(utf8.decode(b"", final=True), token, "stop", timings)
            return
        text = utf8.decode(llm.token_bytes(token))
        if i == max_new_tokens - 1 or llm.n_past >= llm.n_ctx:
            yield GenerationStep(text + utf8.decode(b"", final=True), token, "length", timings)
            return
        yield GenerationStep(text, token, None, timings)
