"""OpenAI-compatible HTTP server for kiosk and robot apps: `edgevlm serve BUNDLE`.

Starlette on uvicorn. One loaded model answers every request, one at a time; the others wait in a bounded queue
(full: 503 with Retry-After). Generation runs in worker threads so the event loop keeps serving; a client that
disconnects cancels its request (within one token). Endpoints:

- `POST /v1/chat/completions`: `EdgeVLM.chat` over HTTP, streamed as server-sent events (`data: [DONE]` last) or
  whole, with `usage` and edgevlm's `timings`;
- `GET /v1/models`, `GET /v1/models/{id}`: the one model; `GET /health`: liveness and the queue.

Errors are OpenAI-style JSON, `{"error": {"message", "type", "code", "param"}}`, whatever fails (uvicorn's own
answers included). Against slow, many or hostile clients (`ServerSettings`, each with a flag): header, body and
keep-alive timeouts, a connection limit, a request deadline (the generation's `timeout`), and limits on the body's
size, its JSON nesting and its number of messages; `edgevlm.chat` bounds grammars and stop strings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import reprlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import anyio
import h11
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from .chat import MAX_JSON_DEPTH, ImagePolicy, check_json_depth
from .errors import (
    BudgetError,
    ContextOverflowError,
    EdgeVLMError,
    ImageError,
    ImageNotAllowedError,
    ModelClosedError,
    RequestError,
    ServerSettingsError,
)
from .results import ChatChunk, ChatResult, Timings

if TYPE_CHECKING:
    from .runtimes.pipeline import EdgeVLM

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
WORKER_STACK_BYTES = 8 * 2**20  # glibc's default on Linux
# request fields passed to EdgeVLM.chat as they are (chat checks their types and ranges)
_CHAT_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop", "response_format", "max_image_tokens")


@dataclass(frozen=True)
class ServerSettings:
    """What the server allows and how long it waits. Each limit has an `edgevlm serve` flag (named in comments)."""

    model_id: str  # the id /v1/models lists and every response names
    # False (the default, as llama-server and Ollama): any model name a client sends is answered by the served model
    # (apps often hard-code "gpt-4o"); True: other names get 404 model_not_found (--strict-model-name)
    strict_model_name: bool = False
    api_key: str | None = None  # required as `Authorization: Bearer KEY` on /v1 when set (--api-key)
    image_policy: ImagePolicy = field(default_factory=lambda: ImagePolicy(allow_local=False))
    max_body_bytes: int = 20 * 2**20  # --max-body-mb
    max_queue: int = 16  # requests waiting for the model besides the one it is answering (--queue)
    max_messages: int = 256  # messages in one request (--max-messages)
    # characters of text in one request: far more than any context holds, far less than tokenizing 20 MB costs
    # (19M characters: 3 s holding the model and +1.2 GB of memory, to learn that they do not fit)
    max_text_chars: int = 2**20  # --max-text-chars
    request_timeout_s: float = 300.0  # arrival to last token, then cancelled (--request-timeout)
    body_timeout_s: float = 30.0  # to receive a request's whole body (--body-timeout)
    header_timeout_s: float = 10.0  # to receive request headers after connecting or an answer (--header-timeout)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this (--keep-alive-timeout)
    max_connections: int = 64  # open connections; more are answered 503 and closed (--max-connections)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ServerSettingsError("the API key is empty: give a non-empty --api-key, or leave it out to serve "
                                      "without one (loopback only is the default)")  # fmt: skip
        positive = {"max_body_bytes (--max-body-mb)": self.max_body_bytes,
                    "max_messages (--max-messages)": self.max_messages,
                    "max_text_chars (--max-text-chars)": self.max_text_chars,
                    "request_timeout_s (--request-timeout)": self.request_timeout_s,
                    "body_timeout_s (--body-timeout)": self.body_timeout_s,
                    "header_timeout_s (--header-timeout)": self.header_timeout_s,
                    "keep_alive_s (--keep-alive-timeout)": self.keep_alive_s,
                    "max_connections (--max-connections)": self.max_connections}  # fmt: skip
        for name, value in positive.items():
            if not value > 0:
                raise ServerSettingsError(f"{name} must be > 0, got {value!r}")
        if self.max_queue < 0:
            raise ServerSettingsError(f"max_queue (--queue) must be >= 0, got {self.max_queue!r}")


@dataclass
class ServerStats:
    """Counters for /health and tests."""

    in_flight: int = 0  # answering or waiting
    completed: int = 0
    cancelled: int = 0  # the client went away before the answer ended
    rejected_busy: int = 0
    timed_out: int = 0  # ran past the request deadline and was cancelled
    created: float = field(default_factory=time.time)


class ApiError(Exception):
    """An error response: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error_for(err: EdgeVLMError) -> ApiError:
    """The HTTP answer to a request edgevlm refused."""
    if isinstance(err, ImageNotAllowedError):
        return ApiError(403, str(err), code="image_not_allowed")
    if isinstance(err, ImageError):
        return ApiError(422, str(err), code="invalid_image")
    if isinstance(err, ContextOverflowError):
        return ApiError(400, str(err), code="context_length_exceeded")
    if isinstance(err, BudgetError):
        return ApiError(400, str(err), code="image_budget")
    if isinstance(err, RequestError):
        return ApiError(400, str(err), code="invalid_request")
    if isinstance(err, ModelClosedError):  # the server is shutting down
        return ApiError(503, str(err), type_="server_error", code="model_closed")
    return ApiError(400, str(err))


def timings_dict(timings: Timings) -> dict[str, float | str]:
    """edgevlm's timings and counters, as the `timings` field of responses."""
    out: dict[str, float | str] = dataclasses.asdict(timings)
    out["prefill_tokens_per_s"] = timings.prefill_tokens_per_s
    out["decode_tokens_per_s"] = timings.decode_tokens_per_s
    return out


class ChatServer:
    """The ASGI application's state and endpoints around one loaded model."""

    def __init__(self, vlm: EdgeVLM, settings: ServerSettings):
        self.vlm = vlm
        self.settings = settings
        self.stats = ServerStats()
        self.app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_error, Exception: self._server_error},
        )
        self.app.state.server = self

    # -- endpoints --------------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        s = self.stats
        return JSONResponse({"status": "ok", "model": self.settings.model_id, "in_flight": s.in_flight,
                             "max_queue": self.settings.max_queue, "completed": s.completed,
                             "cancelled": s.cancelled, "rejected_busy": s.rejected_busy, "timed_out": s.timed_out})  # fmt: skip

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as err:
            return err.response()
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            self._check_model(request.path_params["model_id"])
        except ApiError as err:
            return err.response()
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        _enough_threads(self.settings.max_queue)
        deadline = _Deadline(self.settings.request_timeout_s)
        try:
            self._authorize(request)
            payload = await self._read_json(request)
            stream, include_usage, options = self._chat_options(payload)
            if self.stats.in_flight > self.settings.max_queue:
                self.stats.rejected_busy += 1
                raise ApiError(503, f"the model is busy: {self.stats.in_flight} requests are in flight and the queue "
                                    f"holds {self.settings.max_queue}; retry shortly", type_="server_error",
                               code="queue_full", headers={"Retry-After": "1"})  # fmt: skip
        except ApiError as err:
            return err.response()
        self.stats.in_flight += 1
        watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(request, deadline.cancel))
        released = False
        try:
            try:
                answer = await anyio.to_thread.run_sync(partial(self.vlm.chat, payload["messages"], stream=stream,
                                                                cancel=deadline.cancel, timeout=deadline.remaining(),
                                                                **options))  # fmt: skip
                first = await anyio.to_thread.run_sync(_next_chunk, answer) if stream else None
            except EdgeVLMError as err:
                return api_error_for(err).response()
            finish = first.finish_reason if stream else answer.finish_reason
            if finish == "timeout":
                if stream:
                    await anyio.to_thread.run_sync(answer.close)
                self.stats.timed_out += 1
                return self._timeout_error().response()
            if not stream:
                return self._completion(answer)
            response = _DeadlineStream(self._events(answer, first, deadline, watcher, include_usage), deadline,
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})  # fmt: skip
            released = True  # the event stream releases the slot when it ends
            return response
        finally:
            if not released:
                watcher.cancel()
                self.stats.in_flight -= 1

    # -- request checks ---------------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.settings.api_key.encode()
        ):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>' with the key the "
                                "server was started with (--api-key)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    def _check_model(self, model: Any) -> None:
        if model is not None and not isinstance(model, str):
            raise ApiError(400, f"'model' must be a string, got {reprlib.repr(model)}", param="model")
        if self.settings.strict_model_name and model is not None and model != self.settings.model_id:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {self.settings.model_id!r} "
                                "(GET /v1/models; the server was started with --strict-model-name)",
                           code="model_not_found", param="model")  # fmt: skip

    async def _read_json(self, request: Request) -> dict[str, Any]:
        limit = self.settings.max_body_bytes
        too_large = ApiError(413, f"the request body is larger than {limit} bytes; send smaller images (the server's "
                                  "--max-body-mb sets the limit)", code="request_too_large")  # fmt: skip
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        try:
            with anyio.fail_after(self.settings.body_timeout_s):
                async for piece in request.stream():
                    body += piece
                    if len(body) > limit:
                        raise too_large
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.settings.body_timeout_s:g} s (the "
                                f"server's --body-timeout); send it at once", code="request_timeout",
                           headers={"Connection": "close"}) from None  # fmt: skip
        # a 20 MB body of "[{},{},...]" is millions of Python objects: counted first, parsed off the event loop
        n_containers = body.count(b"{") + body.count(b"[")
        if n_containers > MAX_JSON_CONTAINERS:
            raise ApiError(400, f"the request body has {n_containers} JSON objects and arrays; at most "
                                f"{MAX_JSON_CONTAINERS} are read", code="invalid_json")  # fmt: skip
        try:
            payload = await anyio.to_thread.run_sync(json.loads, bytes(body))
        except ValueError as err:  # not JSON, not UTF-8, or an integer of more digits than Python converts
            raise ApiError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from err
        except RecursionError:  # the C parser stops at Python's recursion limit (~1000 levels)
            raise ApiError(400, f"the request body nests JSON objects and arrays more than {MAX_JSON_DEPTH} deep",
                           code="invalid_json") from None  # fmt: skip
        try:
            check_json_depth(payload, MAX_JSON_DEPTH, "the request body")
        except RequestError as err:
            raise ApiError(400, str(err), code="invalid_json") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return payload

    def _chat_options(self, payload: dict[str, Any]) -> tuple[bool, bool, dict[str, Any]]:
        """(stream, include usage in the stream, keyword arguments for EdgeVLM.chat) of a request body."""
        self._check_model(payload.get("model"))
        if "messages" not in payload:
            raise ApiError(400, "'messages' is required", param="messages")
        messages = payload["messages"]
        if isinstance(messages, list) and len(messages) > self.settings.max_messages:
            raise ApiError(400, f"'messages' has {len(messages)} messages; this server takes at most "
                                f"{self.settings.max_messages} (--max-messages)", param="messages",
                           code="too_many_messages")  # fmt: skip
        n_chars = _text_chars(messages)
        if n_chars > self.settings.max_text_chars:
            raise ApiError(400, f"the messages hold {n_chars} characters of text; this server takes at most "
                                f"{self.settings.max_text_chars} (--max-text-chars), far more than the context window "
                                "holds", param="messages", code="text_too_long")  # fmt: skip
        stream = payload.get("stream") or False
        if not isinstance(stream, bool):
            raise ApiError(400, f"'stream' must be true or false, got {stream!r}", param="stream")
        _refuse_unsupported(payload)
        stream_options = payload.get("stream_options") or {}
        include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
        options = {name: payload[name] for name in _CHAT_FIELDS if payload.get(name) is not None}
        field_name = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = payload.get(field_name)
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):  # fmt: skip
            raise ApiError(400, f"'{field_name}' must be an integer >= 1, got {reprlib.repr(max_tokens)}",
                           param=field_name)  # fmt: skip
        options["max_tokens"] = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        options["image_policy"] = self.settings.image_policy
        return stream, include_usage, options

    # -- responses --------------------------------------------------------------------------------------------------
    def _model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_id, "object": "model", "created": int(self.stats.created),
                "owned_by": "edgevlm"}  # fmt: skip

    def _completion(self, result: ChatResult) -> Response:
        if result.finish_reason == "cancelled":
            self.stats.cancelled += 1
            return Response(status_code=499)  # nobody is listening
        self.stats.completed += 1
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.settings.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": result.usage, "timings": timings_dict(result.timings),
        })  # fmt: skip

    async def _events(self, chunks: Iterator[ChatChunk], chunk: ChatChunk, deadline: _Deadline,
                      watcher: asyncio.Task, include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
        """Server-sent events of one streamed answer; however it ends, the generation stops and its slot frees.
        An error after the headers went out (a refused request, the deadline, a failure) is the last event."""
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.settings.model_id}  # fmt: skip

        def event(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return f"data: {json.dumps({**base, 'choices': [choice], **extra})}\n\n"

        finished = False
        try:
            yield event({"role": "assistant", "content": ""})
            while True:
                if chunk.finish_reason == "timeout":
                    self.stats.timed_out += 1
                    yield f"data: {json.dumps(self._timeout_error().body())}\n\n"
                    return
                if chunk.finish_reason == "cancelled":
                    return
                if chunk.text:
                    yield event({"content": chunk.text})
                if chunk.finish_reason is not None:
                    yield event({}, chunk.finish_reason, timings=timings_dict(chunk.timings))
                    if include_usage:
                        result = ChatResult("", chunk.finish_reason, chunk.timings)
                        yield f"data: {json.dumps({**base, 'choices': [], 'usage': result.usage})}\n\n"
                    yield "data: [DONE]\n\n"
                    finished = True
                    return
                chunk = await anyio.to_thread.run_sync(_next_chunk, chunks)
        except EdgeVLMError as err:
            yield f"data: {json.dumps(api_error_for(err).body())}\n\n"
        except Exception:
            logger.exception("streamed chat completion failed")
            yield f"data: {json.dumps(_SERVER_ERROR.body())}\n\n"
        finally:
            deadline.cancel.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(chunks.close)
            watcher.cancel()
            self.stats.in_flight -= 1
            if finished:
                self.stats.completed += 1
            else:
                self.stats.cancelled += 1

    def _timeout_error(self) -> ApiError:
        return ApiError(504, f"the answer took longer than the server's request deadline of "
                             f"{self.settings.request_timeout_s:g} s (--request-timeout) and was stopped; ask for "
                             "fewer tokens or retry later", type_="server_error", code="request_timeout")  # fmt: skip

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

    async def _server_error(self, request: Request, exc: Exception) -> Response:
        """Any exception no endpoint handled (starlette logs it and re-raises it to uvicorn after this answer)."""
        return _SERVER_ERROR.response()


_SERVER_ERROR = ApiError(500, "the server failed while answering; see its log", "server_error")
MAX_JSON_CONTAINERS = 100_000  # objects and arrays in a request body, counted by their opening bytes
STREAM_GRACE_S = 5.0  # a stream still sending this long after its request's deadline is cut (its client stopped reading)


class _Deadline:
    """A request's deadline, from its arrival, and its `cancel` event (set when the client goes away or the stream
    ends). The generation gets the time left as `EdgeVLM.chat`'s `timeout`: a request still waiting for the model
    gives up its place when it passes, a running one stops before its next token (finish_reason "timeout")."""

    def __init__(self, seconds: float):
        self.cancel = threading.Event()
        self._ends = asyncio.get_running_loop().time() + seconds

    def remaining(self) -> float:
        """Seconds left (at least a millisecond: a timeout of 0 is refused, and this one has just run out)."""
        return max(0.001, self._ends - asyncio.get_running_loop().time())


class _DeadlineStream(StreamingResponse):
    """An event stream that ends at the request's deadline even when the client stops reading: uvicorn's send then
    waits for the socket, out of the generation's reach, and would hold the model's turn for good."""

    def __init__(self, events: AsyncIterator[str], deadline: _Deadline, **options: Any):
        super().__init__(events, **options)
        self.deadline = deadline

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            # a reading client gets the deadline's error event first: the generation stops within one token
            with anyio.move_on_after(self.deadline.remaining() + STREAM_GRACE_S):
                await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # the events' `finally`: the generation stops and its slot frees


def _enough_threads(max_queue: int) -> None:
    """Every request waiting for the model waits in a worker thread: keep threads for the running one's chunks."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = max(limiter.total_tokens, max_queue + 8)


# Request fields edgevlm does not implement whose values would change what the answer means: refused, never ignored.
# field -> (is the value one this server honours, why it is refused)
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (lambda v: not v, ("tool calling is not supported: the model answers in text only; describe the tools "
                                "in the system message and parse the answer, or leave 'tools' out")),
    "tool_choice": (lambda v: v in (None, "none"), "tool calling is not supported; leave 'tool_choice' out"),
    "functions": (lambda v: not v, "function calling is not supported: the model answers in text only"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported; leave 'function_call' out"),
    "n": (lambda v: v in (None, 1), "only n = 1 is supported: send one request per answer"),
    "logprobs": (lambda v: v in (None, False), "logprobs are not supported; leave 'logprobs' out or false"),
    "top_logprobs": (lambda v: v in (None, 0), "top_logprobs are not supported; leave 'top_logprobs' out"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported; leave it out or empty"),
    "modalities": (lambda v: v is None or v == ["text"], "only text answers are supported (modalities ['text'])"),
    "audio": (lambda v: v is None, "audio output is not supported"),
}  # fmt: skip


def _refuse_unsupported(payload: dict[str, Any]) -> None:
    """400 `unsupported_parameter` for a field whose value asks for what edgevlm does not do (OpenAI's own answer
    to a parameter a model does not support), so a client learns it instead of getting a different answer."""
    for name, (honoured, reason) in _UNSUPPORTED.items():
        if name in payload and not honoured(payload[name]):
            raise ApiError(400, f"'{name}' = {reprlib.repr(payload[name])}: {reason}", code="unsupported_parameter",
                           param=name)  # fmt: skip


def _text_chars(messages: Any) -> int:
    """Characters of text in request messages of any shape (their shape is checked later)."""
    if not isinstance(messages, list):
        return 0
    contents = [m.get("content") for m in messages if isinstance(m, dict)]
    parts = [p for c in contents if isinstance(c, list) for p in c if isinstance(p, dict)]
    texts = [c for c in contents if isinstance(c, str)] + [p["text"] for p in parts if isinstance(p.get("text"), str)]
    return sum(map(len, texts))


def _next_chunk(chunks: Iterator[ChatChunk]) -> ChatChunk:
    chunk = next(chunks, None)
    if chunk is None:
        raise RuntimeError("the answer stream ended without a finish reason")
    return chunk


async def _cancel_on_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` when the client goes away (polled: the request body has been read by then)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    cancel.set()


def create_app(vlm: EdgeVLM, settings: ServerSettings) -> Starlette:
    """The ASGI app serving `vlm` (its `state.server` is the `ChatServer`)."""
    return ChatServer(vlm, settings).app


def uvicorn_config(app: Starlette, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8080,
                   **overrides: Any) -> uvicorn.Config:  # fmt: skip
    """uvicorn's configuration for `app`: HTTP/1.1 through `GuardedH11Protocol` (the header timeout, the connection
    limit, JSON for errors before the app), the keep-alive timeout, and one worker (the model lives in this process)."""
    protocol = partial(GuardedH11Protocol, header_timeout_s=settings.header_timeout_s,
                       max_connections=settings.max_connections)  # fmt: skip
    options: dict[str, Any] = {"host": host, "port": port, "log_level": "info", "timeout_graceful_shutdown": 5,
                               "timeout_keep_alive": settings.keep_alive_s, "http": protocol, **overrides}  # fmt: skip
    return uvicorn.Config(app, **options)


def serve(vlm: EdgeVLM, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until interrupted."""
    # llama.cpp parses and matches grammars recursively in the worker threads; the grammar limits in edgevlm.chat
    # keep that within 2 MiB of stack, which not every libc gives a thread by default (musl: 128 KiB)
    threading.stack_size(max(threading.stack_size(), WORKER_STACK_BYTES))
    uvicorn.Server(uvicorn_config(create_app(vlm, settings), settings, host, port)).run()


# -- connections ---------------------------------------------------------------------------------------------------


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with what it lacks against slow or many clients: a connection that has not sent a
    request's headers `header_timeout_s` after connecting (or after its previous answer) is closed (with a 408 if it
    sent part of them); connections beyond `max_connections` get 503 and are closed at once; and these answers, like
    uvicorn's own 400 for a malformed request, are OpenAI-style JSON."""

    def __init__(self, *args: Any, header_timeout_s: float, max_connections: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_after: object = None  # the request cycle the timer waits to see followed by a new one
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse(ApiError(503, f"the server has {self.max_connections} connections open, its limit "
                                       "(--max-connections); retry shortly", type_="server_error",
                                  code="too_many_connections", headers={"Retry-After": "1"}))  # fmt: skip
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped while the refusal goes out
        super().data_received(data)
        if self.cycle is not self._waiting_after:  # a new request's headers are in
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is answered:  # no pipelined request started
            self._arm_header_timer()

    def send_400_response(self, msg: str) -> None:
        self._refuse(ApiError(400, f"invalid HTTP request: {msg}", code="invalid_http"))

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._waiting_after = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a request's head came
            self._refuse(ApiError(408, f"the request headers did not arrive within {self.header_timeout_s:g} s "
                                       "(the server's --header-timeout)", code="request_timeout"))  # fmt: skip
        else:  # idle, or still sending the body of a request already answered
            self.transport.close()

    def _refuse(self, error: ApiError) -> None:
        """Answer `error` outside any request (h11's state machine has no place for it) and close the connection:
        first our side only, reading what the client still sends for a moment (closing with unread data would reset
        the connection, and the client could lose the answer)."""
        self._disarm_header_timer()
        self._unset_keepalive_if_required()
        self._refused = True
        body = json.dumps(error.body()).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close"),
                   *(error.headers or {}).items()]  # fmt: skip
        head = f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers)
        self.transport.write(head.encode("latin-1") + b"\r\n" + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


LINGER_S = 1.0
