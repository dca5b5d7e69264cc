"""EdgeVLM.chat: OpenAI-style messages, reuse of the KV prefix and of image embeddings, grammars, stop strings,
cancellation and threads, on the tiny random Qwen2-VL (real onnxruntime and llama.cpp)."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import io
import json
import threading
import time
from functools import partial

import jsonschema
import numpy as np
import pytest
from conftest import png_data_url, random_frame
from PIL import Image

import edgevlm
from edgevlm.chat import ImagePolicy, resolve_image
from edgevlm.errors import GrammarError, ImageError, ImageNotAllowedError, RequestError

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"enum": [0, 1, 2, 3]},
        "label": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "moving": {"type": "boolean"},
    },
    "required": ["color", "count", "moving", "label"],
    "additionalProperties": False,
}


frame = partial(random_frame, size=(96, 128))


def ask(image, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


def test_chat_result_is_typed_and_streaming_gives_the_same_text(vlm):
    messages = [{"role": "system", "content": "Be brief."}, ask(frame(0), "What is this?")]
    result = vlm.chat(messages, max_tokens=6)
    assert isinstance(result, edgevlm.ChatResult)
    assert result.finish_reason in ("stop", "length")
    t = result.timings
    assert t.n_image_tokens == 15  # 96x128 -> 84x140 pixels -> grid 6x10 patches -> 3x5 tokens
    assert t.vision_ms >= 0 and t.n_generated >= 1 and t.prefill_tokens_per_s > 0
    assert result.usage["prompt_tokens"] == t.n_prompt_tokens == t.n_text_tokens + t.n_image_tokens

    chunks = list(vlm.chat(messages, max_tokens=6, stream=True))
    assert all(isinstance(c, edgevlm.ChatChunk) for c in chunks)
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == result.finish_reason
    assert "".join(c.text for c in chunks) == result.text


def test_image_sources_all_give_the_same_answer(vlm, tmp_path):
    array = frame(1)
    path = tmp_path / "frame.png"
    Image.fromarray(array).save(path)
    sources = [
        {"type": "image", "image": array},
        {"type": "image", "image": Image.fromarray(array)},
        {"type": "image", "image": path.read_bytes()},
        {"type": "image", "image": path},
        {"type": "image_url", "image_url": {"url": png_data_url(array)}},
        {"type": "image_url", "image_url": {"url": path.as_uri()}},
    ]
    answers = set()
    for part in sources:
        result = vlm.chat([{"role": "user", "content": [part, {"type": "text", "text": "Describe."}]}], max_tokens=4)
        answers.add((result.text, result.timings.n_image_tokens))
    assert len(answers) == 1


def test_follow_up_reuses_the_kv_prefix_and_matches_a_cold_run(vlm):
    vlm.clear_caches()
    first = [ask(frame(2), "What is on the table?")]
    answer = vlm.chat(first, max_tokens=8)
    t1 = answer.timings
    assert t1.n_reused_tokens == 0 and t1.n_encoded_image_tokens == t1.n_image_tokens > 0

    follow_up = [*first, {"role": "assistant", "content": answer.text}, {"role": "user", "content": "And its color?"}]
    warm = vlm.chat(follow_up, max_tokens=8)
    t2 = warm.timings
    assert t2.n_encoded_image_tokens == 0 and t2.n_cached_image_tokens == 0  # the image's cells were reused
    first_prompt = t1.n_prompt_tokens
    assert t2.n_reused_tokens >= first_prompt  # the whole first prompt (and the answer when it re-tokenizes alike)
    assert t2.n_reused_tokens + t2.n_prefill_tokens == t2.n_prompt_tokens

    vlm.clear_caches()
    cold = vlm.chat(follow_up, max_tokens=8)
    assert cold.timings.n_reused_tokens == 0 and cold.timings.n_encoded_image_tokens == t2.n_image_tokens
    assert cold.text == warm.text  # reuse changes the work, not the answer


def test_prefixes_cut_anywhere_give_the_cold_answers(vlm):
    image, other_image = frame(30), frame(31)
    requests = [
        [ask(image, "What is on the table?")],
        [ask(image, "What is under the table?")],  # cut inside the text after the image
        [ask(image, "Why?")],  # cut right after the image
        [ask(other_image, "What is on the table?")],  # cut right before the image
        [{"role": "system", "content": "Short answers."}, ask(image, "What is on the table?")],  # cut early
        [ask(image, "What is on the table?"), {"role": "assistant", "content": "A cup."}, ask(other_image, "Now?")],
    ]
    warm = [vlm.chat(messages, max_tokens=6) for messages in requests]
    assert all(r.timings.n_reused_tokens > 0 for r in warm[1:])
    for messages, reused in zip(requests, warm, strict=True):
        vlm.clear_caches()
        assert vlm.chat(messages, max_tokens=6).text == reused.text


def test_repeated_request_redecodes_one_token(vlm):
    messages = [ask(frame(3), "Hi")]
    a = vlm.chat(messages, max_tokens=1)
    b = vlm.chat(messages, max_tokens=1)
    n_prompt = b.timings.n_prompt_tokens
    assert b.timings.n_prefill_tokens == 1 and b.timings.n_reused_tokens == n_prompt - 1
    assert a.text == b.text


def test_embedding_cache_skips_the_vision_encoder_for_a_seen_image(vlm):
    vlm.clear_caches()
    image = frame(4)
    vlm.chat([ask(image, "What is it?")], max_tokens=2)
    # another system prompt: the KV prefix ends before the image, but its embeddings are cached
    other = vlm.chat([{"role": "system", "content": "You are a robot."}, ask(image, "What is it?")], max_tokens=2)
    assert other.timings.n_cached_image_tokens == other.timings.n_image_tokens > 0
    assert other.timings.n_encoded_image_tokens == 0
    changed = frame(5)
    third = vlm.chat([{"role": "system", "content": "You are a robot."}, ask(changed, "What is it?")], max_tokens=2)
    assert third.timings.n_encoded_image_tokens == third.timings.n_image_tokens
    assert third.timings.n_reused_tokens < third.timings.n_prompt_tokens  # diverges at the new image


def test_embedding_cache_is_bounded_in_bytes(vlm):
    from edgevlm.runtimes.reuse import EmbeddingCache

    cache = EmbeddingCache(max_bytes=3 * 400)
    for i in range(5):
        cache.put(f"k{i}", np.zeros((10, 10), np.float32))  # 400 bytes each
    assert len(cache) == 3 and cache.n_bytes == 1200 and cache.get("k0") is None and cache.get("k4") is not None
    cache.get("k2")
    cache.put("k5", np.zeros((10, 10), np.float32))
    assert cache.get("k2") is not None and cache.get("k3") is None  # least recently used goes first


def test_json_schema_output_parses_and_validates(vlm):
    response_format = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA}}
    for seed in range(3):
        result = vlm.chat([ask(frame(6), "Describe the scene as JSON.")], max_tokens=60, temperature=1.0, seed=seed,
                          response_format=response_format)  # fmt: skip
        assert result.finish_reason == "stop", result.text  # the grammar ends, then only end-of-turn is allowed
        jsonschema.validate(json.loads(result.text), SCHEMA)


def test_json_object_and_raw_gbnf(vlm):
    gbnf = 'root ::= ("yes" | "no") " " [0-9]'
    result = vlm.chat([ask(frame(7), "Is it red?")], max_tokens=10, response_format={"type": "gbnf", "grammar": gbnf})
    assert result.finish_reason == "stop"
    word, digit = result.text.split(" ")
    assert word in ("yes", "no") and digit.isdigit()
    result = vlm.chat([ask(frame(7), "JSON please")], max_tokens=12, response_format={"type": "json_object"})
    assert result.text.startswith("{")
    if result.finish_reason == "stop":
        assert isinstance(json.loads(result.text), dict)
    else:
        assert result.finish_reason == "length"  # cut by max_tokens: like OpenAI, then the JSON may be incomplete


def test_bad_grammars_and_formats_are_refused_before_generation(vlm):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(GrammarError, match="does not parse"):
        vlm.chat(messages, response_format={"type": "gbnf", "grammar": "root ::= ("})
    with pytest.raises(RequestError, match="not supported"):
        vlm.chat(messages, response_format={"type": "xml"})
    with pytest.raises(RequestError, match="json_schema"):
        vlm.chat(messages, response_format={"type": "json_schema", "json_schema": {}})
    bounded = {"type": "object", "properties": {"minimum": {"type": "integer", "minimum": 0}}}
    with pytest.raises(GrammarError, match=r"'minimum' at schema.properties.minimum cannot be enforced"):
        vlm.chat(messages, response_format={"type": "json_schema", "json_schema": {"schema": bounded}})


def test_stop_strings_end_the_answer_before_them(vlm):
    grammar = {"type": "gbnf", "grammar": 'root ::= "alpha beta gamma"'}
    messages = [{"role": "user", "content": "Say it."}]
    assert vlm.chat(messages, max_tokens=20, response_format=grammar).text == "alpha beta gamma"
    result = vlm.chat(messages, max_tokens=20, response_format=grammar, stop=["xyz", "beta"])
    assert (result.text, result.finish_reason) == ("alpha ", "stop")
    chunks = list(vlm.chat(messages, max_tokens=20, response_format=grammar, stop="a g", stream=True))
    assert "".join(c.text for c in chunks) == "alpha bet" and chunks[-1].finish_reason == "stop"
    assert not any("a g" in c.text for c in chunks)


def test_bad_requests_raise_clear_errors(vlm):
    with pytest.raises(RequestError, match="non-empty list"):
        vlm.chat([])
    with pytest.raises(RequestError, match=r"messages\[0\].role"):
        vlm.chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(RequestError, match="unknown|expected 'text'"):
        vlm.chat([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(RequestError, match="images go in user messages"):
        vlm.chat([{"role": "assistant", "content": [{"type": "image", "image": frame(0)}]}])
    with pytest.raises(RequestError, match="temperature"):
        vlm.chat([{"role": "user", "content": "hi"}], temperature=-1)
    with pytest.raises(RequestError, match="max_tokens"):
        vlm.chat([{"role": "user", "content": "hi"}], max_tokens=0)
    with pytest.raises(RequestError, match="base64"):
        vlm.chat(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]
        )
    with pytest.raises(ImageError, match="not an image|cannot identify|Cannot"):
        url = "data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode()
        vlm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])


def test_image_policy_keeps_paths_inside_the_allowed_directory(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(b"x")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")
    (allowed / "link.png").symlink_to(secret)
    policy = ImagePolicy(allow_local=True, local_root=allowed)
    assert resolve_image("a.png", policy) == (allowed / "a.png").resolve()
    assert resolve_image(str(allowed / "a.png"), policy) == (allowed / "a.png").resolve()
    for escape in ["../secret.png", str(secret), "link.png", secret.as_uri(), "sub/../../secret.png"]:
        with pytest.raises(ImageNotAllowedError, match="outside"):
            resolve_image(escape, policy)
    with pytest.raises(ImageNotAllowedError, match="not allowed"):
        resolve_image("a.png", ImagePolicy(allow_local=False))
    with pytest.raises(ImageNotAllowedError, match="remote"):
        resolve_image("https://example.com/cat.jpg", ImagePolicy())


def test_remote_images_are_fetched_only_when_allowed_and_within_the_size_limit(vlm):
    png = io.BytesIO()
    Image.fromarray(frame(8)).save(png, format="PNG")
    body = png.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/frame.png"
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        with pytest.raises(ImageNotAllowedError, match="remote"):
            vlm.chat(messages, max_tokens=1)
        with pytest.raises(ImageNotAllowedError, match="127.0.0.1. is not at a public address"):  # this server is local
            vlm.chat(messages, max_tokens=1, image_policy=ImagePolicy(allow_remote=True))
        loopback = ImagePolicy(allow_remote=True, allow_private_hosts=True)
        result = vlm.chat(messages, max_tokens=1, image_policy=loopback)
        assert result.timings.n_image_tokens == 15
        with pytest.raises(ImageError, match=f"no image of at most {len(body) - 1} bytes"):
            vlm.chat(messages, max_tokens=1, image_policy=dataclasses.replace(loopback, max_bytes=len(body) - 1))
    finally:
        server.shutdown()
        server.server_close()


def test_cancel_from_another_thread_stops_within_one_token(vlm):
    cancel = threading.Event()
    never_ends = 'root ::= "a"+'
    steps = vlm.generate("Count to one hundred.", max_tokens=200, cancel=cancel, grammar=never_ends)
    seen = [next(steps) for _ in range(3)]
    setter = threading.Thread(target=cancel.set)
    setter.start()
    setter.join()
    last = next(steps)
    assert last.finish_reason == "cancelled" and last.token is None
    assert last.timings.n_generated == len(seen)  # not one token more
    with pytest.raises(StopIteration):
        next(steps)
    # the model is free and the cache consistent: the next request runs and reuses the prefix
    again = vlm.chat([{"role": "user", "content": "Count to one hundred."}], max_tokens=2)
    assert again.finish_reason in ("stop", "length")


def test_threads_share_one_model_and_get_the_sequential_answers(vlm):
    questions = [[ask(frame(10 + i % 2), f"Question {i}?")] for i in range(4)]
    expected = [vlm.chat(q, max_tokens=5).text for q in questions]
    results: list[str | None] = [None] * len(questions)

    def worker(i: int) -> None:
        results[i] = vlm.chat(questions[i], max_tokens=5).text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == expected


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_waiting_requests_run_first_come_first_served_and_can_give_up(vlm):
    holder = vlm.chat([{"role": "user", "content": "hold"}], max_tokens=50, stream=True,
                      response_format={"type": "gbnf", "grammar": 'root ::= "h"+'})  # fmt: skip
    next(holder)  # this stream has the model until it is closed
    order: list[int] = []
    gave_up = threading.Event()
    cancelled: list[str] = []

    def request(i: int, cancel: threading.Event | None = None) -> None:
        result = vlm.chat([{"role": "user", "content": f"q{i}"}], max_tokens=1, cancel=cancel)
        (cancelled if result.finish_reason == "cancelled" else order).append(i if cancel is None else "quitter")

    threads = []
    for i in range(4):
        threads.append(threading.Thread(target=request, args=(i,)))
        threads[-1].start()
        _wait_for(lambda n=i + 1: vlm.turns.n_waiting == n)  # in line before the next one comes
        if i == 1:
            threads.append(threading.Thread(target=request, args=(99, gave_up)))
            threads[-1].start()
            _wait_for(lambda: vlm.turns.n_waiting == 3)
            gave_up.set()  # leaves the line without running
            _wait_for(lambda: vlm.turns.n_waiting == 2)
    holder.close()
    for t in threads:
        t.join(timeout=60)
    assert order == [0, 1, 2, 3] and cancelled == ["quitter"]


def test_closing_a_stream_early_frees_the_model(vlm):
    stream = vlm.chat([ask(frame(12), "Talk.")], max_tokens=50, stream=True, response_format={"type": "gbnf", "grammar": 'root ::= "b"+'})  # fmt: skip
    next(stream)
    stream.close()
    done = threading.Event()
    threading.Thread(target=lambda: (vlm.chat([{"role": "user", "content": "hi"}], max_tokens=1), done.set())).start()
    assert done.wait(timeout=30), "the model stayed locked after the stream was closed"
