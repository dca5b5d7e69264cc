"""edgevlm serve against hostile clients (issue 17, rows 1, 3, 10, 11 and 12): each case runs against a real
`edgevlm serve` process on a free loopback port (a crash in llama.cpp would take it down, not pytest), or a real
uvicorn server in this process where the test reads the server's state; and each checks the status, the message,
and that a normal request is served right after."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from conftest import edgevlm_serve, free_port
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_server import ENDLESS, running

from edgevlm.chat import MAX_GRAMMAR_BYTES, MAX_GRAMMAR_DEPTH, MAX_STOP_CHARS, MAX_STOPS, stop_at
from edgevlm.cli import _is_loopback
from edgevlm.errors import GrammarError, ServerSettingsError
from edgevlm.server import ServerSettings, create_app

SLOW_S = 2  # the test server's header, body and keep-alive timeouts
MAX_MESSAGES = 8
MAX_CONNECTIONS = 8
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def serve(tiny_bundles, image_dir):
    """(base URL, process) of `edgevlm serve` on the tiny bundle with short timeouts and small limits."""
    flags = ["--allow-local-images", str(image_dir), "--header-timeout", str(SLOW_S), "--body-timeout", str(SLOW_S),
             "--keep-alive-timeout", str(SLOW_S), "--max-messages", str(MAX_MESSAGES),
             "--max-connections", str(MAX_CONNECTIONS)]  # fmt: skip
    with edgevlm_serve(tiny_bundles["Q8_0"], *flags) as served:
        yield served


def post(base: str, body, timeout: float = 60) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{base}/v1/chat/completions", content=body, timeout=timeout)
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=timeout)


def refused(response: httpx.Response, status: int, *words: str) -> dict:
    """The OpenAI-style error of `response`, after checking its status and that its message has `words`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    for word in words:
        assert word in error["message"], error["message"]
    return error


def still_serving(base: str, proc: subprocess.Popen | None = None) -> None:
    if proc is not None:
        assert proc.poll() is None, f"edgevlm serve died (exit {proc.returncode})"
    reply = post(base, {"messages": HELLO, "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


# -- row 1: grammars -------------------------------------------------------------------------------------------------


def nested_grammar(depth: int) -> dict:
    return {"type": "gbnf", "grammar": "root ::= " + "(" * depth + '"a"' + ")" * depth}


def test_deep_or_huge_grammars_are_refused_and_the_server_lives(serve):
    base, proc = serve
    issue = post(base, {"messages": HELLO, "max_tokens": 2, "response_format": nested_grammar(50_000)})  # 100 KB
    assert refused(issue, 400, f"at most {MAX_GRAMMAR_BYTES}")["code"] == "invalid_request"
    still_serving(base, proc)
    # 40 KB, nested past llama.cpp's crash at ~18,600 groups on an 8 MiB stack: that killed the process
    crash = post(base, {"messages": HELLO, "max_tokens": 2, "response_format": nested_grammar(20_000)})
    assert refused(crash, 400, f"at most {MAX_GRAMMAR_DEPTH}", "20000 deep")["code"] == "invalid_request"
    still_serving(base, proc)
    # at the limit, grammars still work
    at_limit = post(base, {"messages": HELLO, "max_tokens": 2, "response_format": nested_grammar(MAX_GRAMMAR_DEPTH)})
    assert at_limit.status_code == 200 and set(at_limit.json()["choices"][0]["message"]["content"]) <= {"a"}
    refused(post(base, {"messages": HELLO, "max_tokens": 2, "response_format": nested_grammar(MAX_GRAMMAR_DEPTH + 1)}),
            400, f"{MAX_GRAMMAR_DEPTH + 1} deep")  # fmt: skip
    # parentheses inside literals, character classes and comments do not nest
    quoted = 'root ::= "((((" [()] # ' + "(" * 5000 + '\n'
    assert post(base, {"messages": HELLO, "max_tokens": 2, "response_format": {"type": "gbnf", "grammar": quoted}}).status_code == 200  # fmt: skip
    huge = {"type": "gbnf", "grammar": 'root ::= "a"' + ' | "a"' * (MAX_GRAMMAR_BYTES // 6)}
    refused(post(base, {"messages": HELLO, "max_tokens": 2, "response_format": huge}), 400, f"at most {MAX_GRAMMAR_BYTES}")
    still_serving(base, proc)


def test_deep_or_huge_json_schemas_are_refused(serve):
    base, proc = serve
    deep: dict = {"type": "string"}
    for _ in range(60):
        deep = {"type": "object", "properties": {"a": deep}}
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": deep}}
    refused(post(base, {"messages": HELLO, "max_tokens": 2, "response_format": schema}), 400, "more than 64 deep")
    wide = {"type": "object", "properties": {f"field{i}": {"enum": ["x" * 40] * 4} for i in range(500)}}
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": wide}}
    refused(post(base, {"messages": HELLO, "max_tokens": 2, "response_format": schema}), 400, "json_schema is", "at most")
    # tiny schemas the converter would write out as gigabytes of grammar, before any size check
    for small in ({"type": "string", "maxLength": 10**8}, {"type": "array", "items": {"type": "string"}, "minItems": 10**6},
                  {"type": "string", "pattern": "^((a{1,999}){999}){999}$"}):  # fmt: skip
        schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": small}}
        refused(post(base, {"messages": HELLO, "max_tokens": 2, "response_format": schema}, timeout=30), 400, "at most", "1000")  # fmt: skip
    still_serving(base, proc)


def test_grammars_given_to_the_python_api_are_bounded_too(vlm):
    deep = "root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000  # killed the process when llama.cpp parsed it
    with pytest.raises(GrammarError, match="20000 deep"):
        list(vlm.generate("Hi", max_tokens=2, grammar=deep))


# -- row 3: stop strings ---------------------------------------------------------------------------------------------


def test_stop_strings_are_bounded(serve):
    base, proc = serve
    refused(post(base, {"messages": HELLO, "max_tokens": 2, "stop": "x" * 600_000}), 400, f"at most {MAX_STOP_CHARS}")
    refused(post(base, {"messages": HELLO, "max_tokens": 2, "stop": ["x"] * (MAX_STOPS + 1)}), 400, f"at most {MAX_STOPS}")
    most = [chr(ord("A") + i) * MAX_STOP_CHARS for i in range(MAX_STOPS)]
    assert post(base, {"messages": HELLO, "max_tokens": 4, "stop": most}).status_code == 200
    still_serving(base, proc)


def _steps(pieces: list[str]):
    for i, text in enumerate(pieces):
        yield SimpleNamespace(text=text, finish_reason="length" if i == len(pieces) - 1 else None, timings=None)


def test_stop_matching_is_linear_in_the_stop_length():
    """A 300,000-character stop string over 50 generated pieces: the old matcher compared every prefix of it after
    each piece (minutes); the automaton touches each character once."""
    stop = "ab" * 150_000
    pieces = ["ab"] * 49 + ["c"]
    out: list = []
    worker = threading.Thread(target=lambda: out.extend(stop_at(_steps(pieces), (stop,))), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "stop matching did not finish in 30 s"
    assert "".join(c.text for c in out) == "ab" * 49 + "c" and out[-1].finish_reason == "length"


def _reference_stop(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, str]:
    """What the answer is: the text up to the earliest stop string seen once the piece that completes it arrived."""
    text = ""
    for i, piece in enumerate(pieces):
        text += piece
        hits = [j for j in (text.find(s) for s in stops) if j >= 0]
        if hits:
            return text[: min(hits)], "stop"
        if i == len(pieces) - 1:
            return text, "length"
    raise AssertionError("no pieces")


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.text("abc", max_size=4), min_size=1, max_size=8),
       stops=st.lists(st.text("abc", min_size=1, max_size=5), max_size=3))  # fmt: skip
def test_stop_matcher_agrees_with_searching_the_whole_text(pieces, stops):
    chunks = list(stop_at(_steps(pieces), tuple(stops)))
    assert ("".join(c.text for c in chunks), chunks[-1].finish_reason) == _reference_stop(pieces, tuple(stops))
    assert all(c.finish_reason is None for c in chunks[:-1])


# -- row 10: malformed requests --------------------------------------------------------------------------------------


def test_malformed_bodies_get_json_4xx(serve, image_dir):
    base, proc = serve
    cases = [
        (post(base, b"[" * 100_001 + b"]" * 100_001), 400, "at most 100000"),  # never parsed: too many arrays
        (post(base, b"[" * 90_000 + b"]" * 90_000), 400, "deep"),
        (post(base, b'{"messages": ' + b"[" * 90_000), 400, "deep"),
        (post(base, {"messages": HELLO, "max_tokens": 2, "metadata": json.loads("[" * 65 + "]" * 65)}), 400, "64 deep"),
        (post(base, {"messages": HELLO * (MAX_MESSAGES + 1), "max_tokens": 2}), 400, f"at most {MAX_MESSAGES}"),
        (post(base, {"messages": [{"role": "user", "content": [{"type": "text", "text": "word " * 300_000}]}]}), 400, f"at most {2**20}"),
        (post(base, b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'), 400, "not valid Unicode"),
        (post(base, b"\xff\xfe not utf-8"), 400, "not valid JSON"),
        (post(base, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a\x00b.png"}}]}]}), 422, "NUL"),
        (post(base, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "d/" * 3000 + "x.png"}}]}]}), 422, "longer than"),
        (post(base, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x" * 300 + ".png"}}]}]}), 422, "longer than"),
        (post(base, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///a%00b.png"}}]}]}), 422, "NUL"),
        (httpx.get(f"{base}/v1/nothing"), 404, "Not Found"),
        (httpx.get(f"{base}/v1/chat/completions"), 405, "Method Not Allowed"),
    ]
    for response, status, words in cases:
        refused(response, status, words)
        still_serving(base, proc)


def raw_exchange(base: str, data: bytes, *, timeout: float = 20) -> tuple[bytes, float]:
    """Send `data` on a new connection and read until the server closes it: (everything read, seconds from the
    last byte sent to the close)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        sent = time.monotonic()
        received = b""
        while piece := sock.recv(65536):
            received += piece
        return received, time.monotonic() - sent


def json_of(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw
    return int(head.split()[1]), json.loads(body)


def test_odd_numbers_and_urls_get_json_4xx(serve, image_dir):
    base, proc = serve
    huge = "9" * 400  # above a float's range: a range check through float() overflows
    for raw in (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": ' + huge.encode() + b"}",
                b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 5000 + b"}",  # past int()'s digit limit
                b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}'):  # fmt: skip
        response = post(base, raw)
        assert 400 <= response.status_code < 500 and response.json()["error"]["message"], response.text
    for url in ("http://[::1/a.png", "\ud800.png", "file:///\ud800"):
        body = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
        response = post(base, body.encode())
        assert 400 <= response.status_code < 500 and response.json()["error"]["message"], response.text
    still_serving(base, proc)


def test_malformed_http_gets_json_400(serve):
    base, proc = serve
    status, body = json_of(raw_exchange(base, b"NOT HTTP AT ALL\r\n\r\n")[0])
    assert status == 400 and "invalid HTTP request" in body["error"]["message"]
    still_serving(base, proc)


# -- row 11: slow and many connections -------------------------------------------------------------------------------


def test_slow_headers_and_slow_bodies_time_out(serve):
    """Three slow-body and two slow-header connections (the issue's attack, with the test server's 2 s timeouts):
    each gets a JSON 408 and is closed within seconds, and the server answers others meanwhile."""
    base, proc = serve
    slow_header = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"  # no blank line: the head never ends
    slow_body = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"  # fmt: skip
    results: dict[int, tuple[bytes, float]] = {}

    def attack(i: int, data: bytes) -> None:
        results[i] = raw_exchange(base, data)

    attackers = [threading.Thread(target=attack, args=(i, slow_body if i < 3 else slow_header)) for i in range(5)]
    for thread in attackers:
        thread.start()
    still_serving(base, proc)
    for thread in attackers:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a slow connection was never closed"
    for i, (raw, seconds) in results.items():
        status, body = json_of(raw)
        assert status == 408 and body["error"]["code"] == "request_timeout", body
        assert ("body" if i < 3 else "headers") in body["error"]["message"]
        assert seconds < SLOW_S + 10
    # a connection that sends nothing, and a keep-alive connection left idle after an answer, are closed too
    assert raw_exchange(base, b"")[0] == b""
    raw, _ = raw_exchange(base, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200") and raw.count(b"HTTP/1.1") == 1
    still_serving(base, proc)


def test_connections_beyond_the_limit_get_json_503(serve):
    base, proc = serve
    host, port = base.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port)), timeout=20) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # the server has accepted them
        status, body = json_of(raw_exchange(base, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0])
        assert status == 503 and body["error"]["code"] == "too_many_connections"
        assert f"{MAX_CONNECTIONS} connections" in body["error"]["message"]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    still_serving(base, proc)


# -- row 11: the request deadline ------------------------------------------------------------------------------------


def test_request_deadline_cancels_generation_and_frees_the_slot(vlm):
    app = create_app(vlm, ServerSettings(model_id="m", request_timeout_s=3.0))
    endless = {"messages": HELLO, "max_tokens": 1500, "response_format": ENDLESS}
    with running(app) as base:
        t0 = time.monotonic()
        whole = post(base, endless)
        assert time.monotonic() - t0 < 30
        assert refused(whole, 504, "request deadline of 3 s")["code"] == "request_timeout"
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**endless, "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
        assert json.loads(events[-1])["error"]["code"] == "request_timeout"
        assert "[DONE]" not in events
        health = httpx.get(f"{base}/health").json()
        assert health["timed_out"] == 2 and health["in_flight"] == 0
        still_serving(base)


def test_a_client_that_stops_reading_a_stream_is_cut_at_the_deadline(vlm):
    """A client whose socket never drains: the server's send waits, out of the generation's reach. The stream must
    still end at the request deadline and give the model back (the ASGI app called directly, its `send` blocking)."""
    app = create_app(vlm, ServerSettings(model_id="m", request_timeout_s=3.0))
    body = json.dumps({"messages": HELLO, "max_tokens": 100_000, "response_format": ENDLESS, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 80)}  # fmt: skip
    sent: list[dict] = []

    async def scenario() -> None:
        requests = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if requests:
                return requests.pop()
            await asyncio.Event().wait()  # the client never hangs up
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            sent.append(message)
            if len(sent) >= 4:  # the headers and a few events went out; then the socket is full for good
                await asyncio.Event().wait()

        await asyncio.wait_for(app(scope, receive, send), timeout=60)

    asyncio.run(scenario())
    stats = app.state.server.stats
    assert sent[0]["status"] == 200 and stats.in_flight == 0 and stats.cancelled == 1
    assert vlm.chat(HELLO, max_tokens=2).finish_reason in ("stop", "length")  # the model is free


# -- row 12: the API key ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "   "])
def test_empty_api_key_is_refused_at_start(tiny_bundles, key):
    with pytest.raises(ServerSettingsError, match="API key is empty"):
        ServerSettings(model_id="m", api_key=key)
    run = subprocess.run([sys.executable, "-m", "edgevlm.cli", "serve", str(tiny_bundles["Q8_0"]), "--api-key", key,
                          "--port", str(free_port())], capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 2 and "API key is empty" in run.stderr


def test_loopback_hosts_are_told_from_others():
    assert all(_is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(_is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "kiosk.local"))


# -- a fuzzer for request bodies -------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_content = st.text(max_size=40) | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "image", "audio"])},
                          optional={"text": _json | st.text(max_size=40), "image_url": _json, "image": _json}),
    max_size=3,
) | _json  # fmt: skip
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]) | _json},
                                 optional={"content": _content})  # fmt: skip
_user_text = st.fixed_dictionaries({"role": st.just("user"), "content": st.text(min_size=1, max_size=40)})
_response_format = st.one_of(
    _json,
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "gbnf", "xml"])},
                          optional={"grammar": st.text(max_size=60) | _json, "json_schema": _json | st.fixed_dictionaries({"schema": _json})}),
)  # fmt: skip
_body = st.fixed_dictionaries(
    {"max_tokens": st.integers(1, 3) | _json},  # valid values stay small: each valid request generates
    optional={"messages": st.lists(_user_text, min_size=1, max_size=3) | st.lists(_message, max_size=MAX_MESSAGES + 2) | _json,
              "stream": st.booleans() | _json,
              "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=4) | _json,
              "response_format": _response_format, "temperature": st.floats(0, 2) | _json,
              "top_p": st.floats(0, 1) | _json, "top_k": st.integers(-5, 100) | _json,
              "seed": st.integers(-(2**65), 2**65) | _json, "n": st.integers(0, 2) | _json, "model": st.none() | _json,
              "stream_options": _json, "max_image_tokens": _json},
)  # fmt: skip

_valid_body = st.fixed_dictionaries(
    {"messages": st.lists(_user_text, min_size=1, max_size=3), "max_tokens": st.integers(1, 3)},
    optional={"stream": st.booleans(), "stop": st.lists(st.text(min_size=1, max_size=5), max_size=4),
              "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "gbnf", "grammar": 'root ::= [a-z]+'},
                                                  {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]),
              "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "top_k": st.integers(0, 100),
              "seed": st.integers(0, 2**32), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})},
)  # fmt: skip


def _check_reply(response: httpx.Response, stream: bool) -> None:
    if response.status_code == 200 and stream:
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
        assert events[-1] == "[DONE]" or "error" in json.loads(events[-1]), events
        for event in events[:-1]:
            json.loads(event)
        return
    body = response.json()  # JSON, whatever the status
    if response.status_code == 200:
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert 400 <= response.status_code < 500, (response.status_code, body)
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=_valid_body | _body)
def test_fuzzed_request_bodies_get_json_answers_never_500(serve, body):
    base, proc = serve
    response = post(base, body, timeout=60)
    event(f"HTTP {response.status_code}")  # pytest --hypothesis-show-statistics shows the mix
    _check_reply(response, body.get("stream") is True)
    assert proc.poll() is None


def test_server_serves_after_the_fuzzer(serve):
    still_serving(*serve)
