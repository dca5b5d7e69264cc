"""edgevlm serve: a real uvicorn server on a free loopback port, real clients (the official `openai` package and
httpx), the tiny random Qwen2-VL bundle behind it."""

from __future__ import annotations

import base64
import gc
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from conftest import edgevlm_serve, png_data_url, random_frame
from PIL import Image

from edgevlm.chat import ImagePolicy
from edgevlm.server import ServerSettings, create_app, uvicorn_config

API_KEY = "test-key"
MODEL = "tiny-qwen2-vl"
ENDLESS = {"type": "gbnf", "grammar": 'root ::= "a"+'}  # never ends by itself: only max_tokens or a cancel stop it


@contextmanager
def running(app):
    """Serve `app` with uvicorn, configured as `edgevlm serve` does from the app's settings, in a thread on a free
    loopback port; yields the base URL."""
    config = uvicorn_config(app, app.state.server.settings, port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("allowed-images")
    Image.fromarray(frame(0)).save(root / "frame.png")
    return root


@pytest.fixture(scope="module")
def served(vlm, image_dir):
    """(base URL, ChatServer) of a server with an API key, a 1 MB body limit and one allowed image directory."""
    settings = ServerSettings(model_id=MODEL, api_key=API_KEY, max_body_bytes=2**20,
                              image_policy=ImagePolicy(allow_local=True, local_root=image_dir))  # fmt: skip
    app = create_app(vlm, settings)
    with running(app) as url:
        yield url, app.state.server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


frame = partial(random_frame, size=(56, 84))


def ask(url: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]  # fmt: skip


def post(base: str, body, *, key: str | None = API_KEY, timeout: float = 60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(f"{base}/v1/chat/completions", content=body, headers=headers, timeout=timeout)
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def test_openai_client_streamed_and_not(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = ask(png_data_url(frame(1)))
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 6  # 6 image tokens + the text
    assert whole.model_extra["timings"]["n_image_tokens"] == 6

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content and finishes == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_stream_ends_with_done(served):
    base, _ = served
    body = {"model": MODEL, "messages": ask(png_data_url(frame(2))), "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_eight_concurrent_clients_get_complete_answers(client):
    requests = [ask(png_data_url(frame(10 + i)), f"Question {i}: what is it?") for i in range(8)]

    def call(messages):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, requests))
    sequential = [call(messages) for messages in requests]
    for concurrent, alone in zip(answers, sequential, strict=True):
        assert concurrent.choices[0].finish_reason in ("stop", "length")
        assert concurrent.usage.completion_tokens >= 1
        assert concurrent.choices[0].message.content == alone.choices[0].message.content


def test_follow_up_reuses_the_image_embedding_and_the_kv_prefix(served):
    base, _ = served
    messages = [{"role": "system", "content": "You watch a kiosk camera."}, *ask(png_data_url(frame(20)))]
    first = post(base, {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0}).json()
    t1 = first["timings"]
    assert t1["n_encoded_image_tokens"] == t1["n_image_tokens"] == 6
    follow_up = [*messages, first["choices"][0]["message"], {"role": "user", "content": "Is anyone there?"}]
    second = post(base, {"model": MODEL, "messages": follow_up, "max_tokens": 6, "temperature": 0}).json()
    t2 = second["timings"]
    assert t2["n_encoded_image_tokens"] == 0  # no vision encoder run
    assert t2["n_reused_tokens"] >= t1["n_prompt_tokens"]  # the first prompt's cells
    assert t2["n_prefill_tokens"] < t2["n_prompt_tokens"] - t1["n_text_tokens"]
    # a new session with the same frame: the prefix differs before the image, its embeddings are cached
    other = [{"role": "system", "content": "You guard a warehouse."}, *ask(png_data_url(frame(20)))]
    third = post(base, {"model": MODEL, "messages": other, "max_tokens": 2}).json()["timings"]
    assert third["n_cached_image_tokens"] == 6 and third["n_encoded_image_tokens"] == 0


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "type" in error and "code" in error
    return error


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(served, image_dir):
    base, _ = served
    good = {"model": MODEL, "messages": ask(png_data_url(frame(3))), "max_tokens": 2}
    not_an_image = "data:image/png;base64," + base64.b64encode(b"GIF89a but not really an image").decode()
    oversized = {"model": MODEL, "messages": ask("data:image/png;base64," + "A" * (2**20 + 100))}
    cases = [
        (post(base, b'{"model": "tiny", "messages": [}'), 400, "invalid_json"),
        (post(base, {"model": MODEL, "messages": ask("data:image/png;base64,**not base64**")}), 400, "invalid_request"),
        (post(base, {"model": MODEL, "messages": ask(not_an_image)}), 422, "invalid_image"),
        (post(base, oversized), 413, "request_too_large"),
        (post(base, good, key="wrong-key"), 401, "invalid_api_key"),
        (post(base, good, key=None), 401, "invalid_api_key"),
        (post(base, {"model": MODEL, "messages": ask("/etc/hostname")}), 403, "image_not_allowed"),
        (post(base, {"model": MODEL, "messages": ask("../" + image_dir.name + "/../x.png")}), 403, "image_not_allowed"),
        (post(base, {"model": MODEL, "messages": ask("https://example.com/cat.jpg")}), 403, "image_not_allowed"),
        (post(base, {"model": MODEL, "messages": "hello"}), 400, "invalid_request"),
        (post(base, {"model": MODEL, "messages": ask(png_data_url(frame(3))), "temperature": "hot"}), 400, "invalid_request"),
        (httpx.get(f"{base}/v1/nothing-here"), 404, "not_found"),
    ]  # fmt: skip
    for response, status, code in cases:
        assert _error(response, status)["code"] == code
        assert post(base, good).status_code == 200  # still serving
    assert post(base, {"model": MODEL, "messages": ask("frame.png"), "max_tokens": 1}).status_code == 200
    assert post(base, {"model": MODEL, "messages": ask((image_dir / "frame.png").as_uri()), "max_tokens": 1}).status_code == 200  # fmt: skip
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def _wait_idle(server, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while server.stats.in_flight:
        assert time.monotonic() < deadline, f"{server.stats.in_flight} requests still in flight"
        time.sleep(0.05)


def test_full_queue_is_503_and_disconnects_cancel_generation(vlm):
    app = create_app(vlm, ServerSettings(model_id=MODEL, max_queue=0))
    server = app.state.server
    with running(app) as base:
        endless = {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 1500,
                   "response_format": ENDLESS, "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=endless, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # generating now
            busy = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "b"}]})
            assert _error(busy, 503)["code"] == "queue_full" and busy.headers["Retry-After"] == "1"
        # the client went away mid-stream: its generation stops and frees the model
        _wait_idle(server)
        assert server.stats.cancelled == 1

        # a non-streamed request whose client gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json={**endless, "stream": False}, timeout=1.0)
        _wait_idle(server)
        assert server.stats.cancelled == 2
        done = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "c"}], "max_tokens": 2})  # fmt: skip
        assert done.status_code == 200


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_soak_300_image_requests_do_not_grow_memory(served):
    base, _ = served
    rng = np.random.default_rng(99)
    rss = {}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        for i in range(1, 301):
            image = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
            body = {"model": MODEL, "messages": ask(png_data_url(image), "What?"), "max_tokens": 1}
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            if i in (20, 300):
                gc.collect()
                rss[i] = _rss_bytes()
    print(f"RSS after request 20: {rss[20] / 2**20:.1f} MiB, after 300: {rss[300] / 2**20:.1f} MiB")
    assert rss[300] <= rss[20] * 1.05


def test_edgevlm_serve_command(tiny_bundles, tmp_path):
    bad = subprocess.run([sys.executable, "-m", "edgevlm.cli", "serve", str(tiny_bundles["Q8_0"]),
                          "--allow-local-images", str(tmp_path / "missing")], capture_output=True, text=True, check=False)  # fmt: skip
    assert bad.returncode == 2 and "not a directory" in bad.stderr
    with edgevlm_serve(tiny_bundles["Q8_0"], "--api-key", "k") as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
        model = client.models.list().data[0].id
        assert model == Path(tiny_bundles["Q8_0"]).name
        reply = client.chat.completions.create(model=model, messages=ask(png_data_url(frame(5))), max_tokens=3)
        assert reply.choices[0].finish_reason in ("stop", "length")


# -- issue 23: model names, unsupported fields, max_tokens ---------------------------------------------------------


def test_any_model_name_is_answered_and_the_served_id_reported(client, vlm):
    messages = ask(png_data_url(frame(30)))
    for name in ("gpt-4o", "bundle", MODEL):  # hard-coded in apps, the README's, the served one
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=2, temperature=0)
        assert reply.model == MODEL and reply.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve("gpt-4o").id == MODEL
    # --strict-model-name: other names are 404 model_not_found, as before
    strict = create_app(vlm, ServerSettings(model_id=MODEL, strict_model_name=True))
    with running(strict) as base:
        refused = _error(post(base, {"model": "gpt-4o", "messages": messages}), 404)
        assert refused["code"] == "model_not_found" and refused["param"] == "model" and MODEL in refused["message"]
        assert _error(httpx.get(f"{base}/v1/models/gpt-4o"), 404)["code"] == "model_not_found"
        assert post(base, {"model": MODEL, "messages": messages, "max_tokens": 1}).status_code == 200
        assert _error(post(base, {"model": 4, "messages": messages}), 400)["param"] == "model"


def test_fields_that_change_the_answer_and_are_not_supported_get_400(served, client):
    base, _ = served
    good = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    refused = {"tools": [tool], "tool_choice": "auto", "functions": [tool["function"]], "function_call": "auto",
               "n": 2, "logprobs": True, "top_logprobs": 2, "logit_bias": {"15": 100}, "modalities": ["text", "audio"],
               "audio": {"voice": "alloy", "format": "wav"}}  # fmt: skip
    for name, value in refused.items():
        error = _error(post(base, {**good, name: value}), 400)
        assert error == {**error, "type": "invalid_request_error", "code": "unsupported_parameter", "param": name}
        assert name in error["message"]
    bad_format = _error(post(base, {**good, "response_format": {"type": "xml"}}), 400)
    assert "'text', 'json_object', 'json_schema' or 'gbnf'" in bad_format["message"]
    # what clients send by default, meaning "none of that", is fine
    defaults = {"tools": [], "tool_choice": "none", "n": 1, "logprobs": False, "top_logprobs": 0, "logit_bias": {},
                "modalities": ["text"], "response_format": {"type": "text"}, "parallel_tool_calls": True}  # fmt: skip
    assert post(base, {**good, **defaults}).status_code == 200
    with pytest.raises(openai.BadRequestError, match="tool calling is not supported"):
        client.chat.completions.create(model=MODEL, messages=good["messages"], tools=[tool])


def test_max_tokens_beyond_the_context_is_handled_alike_with_and_without_images(served):
    """Accepted both ways (the answer ends when the context is full); errors name the API's own fields."""
    base, _ = served
    one_token = {"type": "gbnf", "grammar": 'root ::= "a"'}  # ends the answer at once: no 2000-token decode here
    text = [{"role": "user", "content": "Hi"}]
    for messages in (text, ask(png_data_url(frame(31)))):
        reply = post(base, {"model": MODEL, "messages": messages, "max_tokens": 100_000, "response_format": one_token})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "a"
    timings = reply.json()["timings"]
    assert timings["n_image_tokens"] == 4  # the image at its fewest tokens: the rest of the context is the answer's
    for field in ("max_tokens", "max_completion_tokens"):
        error = _error(post(base, {"model": MODEL, "messages": text, field: 0}), 400)
        assert error["param"] == field and f"'{field}' must be an integer >= 1" in error["message"]
    too_long = _error(post(base, {"model": MODEL, "messages": ask(png_data_url(frame(31)), "Describe it. " * 700)}), 400)
    assert too_long["code"] == "context_length_exceeded" and "max_new_tokens" not in too_long["message"]
