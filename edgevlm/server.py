"""OpenAI-compatible HTTP server for kiosk and robot apps: `edgevlm serve BUNDLE`.

Starlette on uvicorn. One loaded model answers every request, one at a time; the others wait in a bounded queue
(full: 503 with Retry-After). Generation runs in worker threads so the event loop keeps serving; a client that
disconnects cancels its request (within one token). Endpoints:

- `POST /v1/chat/completions`: `EdgeVLM.chat` over HTTP, streamed as server-sent events (`data: [DONE]` last) or
  whole, with `usage` and edgevlm's `timings`;
- `GET /v1/models`, `GET /v1/models/{id}`: the one model; `GET /health`: liveness and the queue.

Errors are OpenAI-style JSON, `{"error": {"message", "type", "code", "param"}}`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .chat import ChatChunk, ChatResult, ImagePolicy
from .errors import (
    BudgetError,
    ContextOverflowError,
    EdgeVLMError,
    ImageError,
    ImageNotAllowedError,
    RequestError,
)

if TYPE_CHECKING:
    from .runtimes.pipeline import EdgeVLM, Timings

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
# request fields passed to EdgeVLM.chat as they are (chat checks their types and ranges)
_CHAT_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop", "response_format", "max_image_tokens")


@dataclass(frozen=True)
class ServerSettings:
    model_id: str
    api_key: str | None = None  # required as `Authorization: Bearer KEY` on /v1 when set
    image_policy: ImagePolicy = field(default_factory=lambda: ImagePolicy(allow_local=False))
    max_body_bytes: int = 20 * 2**20
    max_queue: int = 16  # requests waiting for the model besides the one it is answering


@dataclass
class ServerStats:
    """Counters for /health and tests."""

    in_flight: int = 0  # answering or waiting
    completed: int = 0
    cancelled: int = 0  # the client went away before the answer ended
    rejected_busy: int = 0
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
    return ApiError(400, str(err))


def timings_dict(timings: Timings) -> dict[str, float]:
    """edgevlm's timings and counters, as the `timings` field of responses."""
    out: dict[str, float] = dataclasses.asdict(timings)
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
            exception_handlers={HTTPException: self._http_error},
        )
        self.app.state.server = self

    # -- endpoints --------------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        s = self.stats
        return JSONResponse({"status": "ok", "model": self.settings.model_id, "in_flight": s.in_flight,
                             "max_queue": self.settings.max_queue, "completed": s.completed,
                             "cancelled": s.cancelled, "rejected_busy": s.rejected_busy})  # fmt: skip

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
        cancel = threading.Event()
        watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(request, cancel))
        released = False
        try:
            try:
                answer = await anyio.to_thread.run_sync(partial(self.vlm.chat, payload["messages"], stream=stream,
                                                                cancel=cancel, **options))  # fmt: skip
                first = await anyio.to_thread.run_sync(_next_chunk, answer) if stream else None
            except EdgeVLMError as err:
                return api_error_for(err).response()
            except Exception:
                logger.exception("chat completion failed")
                return ApiError(500, "the server failed while answering; see its log", "server_error").response()
            if not stream:
                return self._completion(answer)
            response = StreamingResponse(self._events(answer, first, cancel, watcher, include_usage),
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
        if model is not None and model != self.settings.model_id:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {self.settings.model_id!r} "
                                "(GET /v1/models)", code="model_not_found", param="model")  # fmt: skip

    async def _read_json(self, request: Request) -> dict[str, Any]:
        limit = self.settings.max_body_bytes
        too_large = ApiError(413, f"the request body is larger than {limit} bytes; send smaller images (the server's "
                                  "--max-body-mb sets the limit)", code="request_too_large")  # fmt: skip
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_large
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from err
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return payload

    def _chat_options(self, payload: dict[str, Any]) -> tuple[bool, bool, dict[str, Any]]:
        """(stream, include usage in the stream, keyword arguments for EdgeVLM.chat) of a request body."""
        self._check_model(payload.get("model"))
        if "messages" not in payload:
            raise ApiError(400, "'messages' is required", param="messages")
        stream = payload.get("stream") or False
        if not isinstance(stream, bool):
            raise ApiError(400, f"'stream' must be true or false, got {stream!r}", param="stream")
        if payload.get("n", 1) not in (1, None):
            raise ApiError(400, "only n = 1 is supported", param="n")
        stream_options = payload.get("stream_options") or {}
        include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
        options = {name: payload[name] for name in _CHAT_FIELDS if payload.get(name) is not None}
        max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
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

    async def _events(self, chunks: Iterator[ChatChunk], chunk: ChatChunk, cancel: threading.Event,
                      watcher: asyncio.Task, include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
        """Server-sent events of one streamed answer; however it ends, the generation stops and its slot frees."""
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.settings.model_id}  # fmt: skip

        def event(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return f"data: {json.dumps({**base, 'choices': [choice], **extra})}\n\n"

        finished = False
        try:
            yield event({"role": "assistant", "content": ""})
            while True:
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
        except EdgeVLMError as err:  # after the headers went out: the error is the last event
            yield f"data: {json.dumps(api_error_for(err).body())}\n\n"
        finally:
            cancel.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(chunks.close)
            watcher.cancel()
            self.stats.in_flight -= 1
            if finished:
                self.stats.completed += 1
            else:
                self.stats.cancelled += 1

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()


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


def serve(vlm: EdgeVLM, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until interrupted (uvicorn, one worker: the model lives in this process)."""
    import uvicorn

    uvicorn.run(create_app(vlm, settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
