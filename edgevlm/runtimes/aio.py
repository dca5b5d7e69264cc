"""asyncio face of a loaded model: `AsyncEdgeVLM` streams `generate` and `chat` without blocking the event loop.

Each blocking step (request checks, the model's turn, prefill, one token) runs in a worker thread; requests from
tasks and threads share the model's one turn queue, first come, first served. Stopping early is cancelling: a task
cancelled while it waits, an iterator closed (`aclose`, `async with`) or dropped, each sets the generation's cancel
event, so it stops before its next token (or its next prefill piece) and gives the model back.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..results import ChatChunk, ChatResult, GenerationStep

if TYPE_CHECKING:
    from .pipeline import EdgeVLM

Step = TypeVar("Step", GenerationStep, ChatChunk)
_END = object()  # what `next` gives back when a stream ends without a finish reason


class AsyncEdgeVLM:
    """An `EdgeVLM` for asyncio apps (FastAPI, ROS 2 executors, kiosks):

        avlm = edgevlm.AsyncEdgeVLM(edgevlm.load("bundle/"))
        async for step in avlm.generate("What is on the table?", frame, color_order="bgr"):
            print(step.text, end="")
        answer = await avlm.chat(messages, max_tokens=64, timeout=5)
        async for chunk in await avlm.chat(messages, stream=True):
            ...

    The arguments are `EdgeVLM.generate`'s and `EdgeVLM.chat`'s, but `cancel`: cancelling the task, or closing the
    iterator, stops the generation (within one token) and frees the model for the next request. The wrapped model
    is `vlm`; it may be used from threads at the same time (the same turn queue).
    """

    def __init__(self, vlm: EdgeVLM):
        self.vlm = vlm

    def generate(self, prompt: str, images: Any = (), **options: Any) -> AsyncSteps[GenerationStep]:
        """`EdgeVLM.generate`'s steps as an async iterator (also an async context manager that closes it)."""
        return AsyncSteps(lambda cancel: self.vlm.generate(prompt, images, cancel=cancel, **options))

    async def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False,
                   **options: Any) -> ChatResult | AsyncSteps[ChatChunk]:  # fmt: skip
        """`EdgeVLM.chat`: the whole `ChatResult`, or with `stream=True` an async iterator of `ChatChunk`s. A bad
        request raises here, before it waits for the model (as `EdgeVLM.chat` does)."""
        steps = AsyncSteps(lambda cancel: self.vlm.chat(messages, stream=True, cancel=cancel, **options))
        await steps.start()
        if stream:
            return steps
        async with steps:
            text = [chunk.text async for chunk in steps]
        last = steps.last
        if last is None or last.finish_reason is None:
            raise RuntimeError("the generation ended without a finish reason")
        return ChatResult("".join(text), last.finish_reason, last.timings)

    async def close(self) -> None:
        """`EdgeVLM.close` in a worker thread (it waits for the token in progress)."""
        await asyncio.to_thread(self.vlm.close)

    async def __aenter__(self) -> AsyncEdgeVLM:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncSteps(Generic[Step]):
    """A generation's steps, each computed in a worker thread. Ends after the step with a finish reason. Closing it
    (`aclose`, leaving `async with`, dropping it) or cancelling the task that awaits a step cancels the generation."""

    def __init__(self, open_steps: Callable[[threading.Event], Iterator[Step]]):
        self._open = open_steps
        self._cancel = threading.Event()
        self._steps: Iterator[Step] | None = None
        self._in_flight: asyncio.Future | None = None
        self._done = False
        self.last: Step | None = None  # the last step given out

    async def start(self) -> None:
        """Check the request and queue it (in a worker thread); the first `__anext__` does it otherwise."""
        if self._steps is None:
            self._steps = await self._run(self._open, self._cancel)

    def __aiter__(self) -> AsyncSteps[Step]:
        return self

    async def __anext__(self) -> Step:
        if self._done:
            raise StopAsyncIteration
        await self.start()
        step = await self._run(_next_step, self._steps)
        if step is _END or step.finish_reason is not None:
            self._done = True
            self._steps = None  # closed by _next_step: the model's turn is given back
        if step is _END:
            raise StopAsyncIteration
        self.last = step
        return step

    async def aclose(self) -> None:
        """Cancel the generation if it is still running, and give the model back."""
        self._cancel.set()
        self._done = True
        if self._in_flight is not None:
            await _wait_shielded(self._in_flight)
        if self._steps is not None:
            steps, self._steps = self._steps, None
            await asyncio.to_thread(steps.close)  # type: ignore[attr-defined]

    async def __aenter__(self) -> AsyncSteps[Step]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # dropped while running: the generation stops before its next token; the stream closes when collected
        self._cancel.set()

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` in a worker thread; if this task is cancelled meanwhile, the generation is cancelled,
        the call finishes (within a token), the stream is closed and the cancellation goes on."""
        self._in_flight = asyncio.ensure_future(asyncio.to_thread(function, *args))
        try:
            return await asyncio.shield(self._in_flight)
        except asyncio.CancelledError:
            await self.aclose()
            raise
        finally:
            if self._in_flight is not None and self._in_flight.done():
                self._in_flight = None


def _next_step(steps: Iterator[Step]) -> Step | object:
    """The next step, or `_END`; the last one (with a finish reason) closes the stream, giving the model back at
    once (the generator would otherwise hold it until it is resumed or collected)."""
    step = next(steps, _END)
    if step is _END or step.finish_reason is not None:
        steps.close()  # type: ignore[attr-defined]
    return step


async def _wait_shielded(future: asyncio.Future) -> None:
    """Wait for a worker thread's call to end (its error stays with its awaiter); a cancellation of this task
    meanwhile is raised once the call has ended."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait({future})
        except asyncio.CancelledError:
            cancelled = True
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" warning
    if cancelled:
        raise asyncio.CancelledError
