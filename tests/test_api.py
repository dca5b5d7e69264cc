"""The Python API a new user meets (issue 23): one vocabulary (`max_tokens`), `chat` with every budget control of
`generate`, one image where a list is expected, adjusted settings reported, one definition of prompt tokens,
`color_order` for camera frames, `timeout=`, and `AsyncEdgeVLM`; on the tiny random Qwen2-VL bundle (real
onnxruntime and llama.cpp)."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import warnings
from functools import partial

import numpy as np
import pytest
from conftest import random_frame
from PIL import Image

import edgevlm
from edgevlm.budget import Crop
from edgevlm.errors import ImageError, RequestError
from edgevlm.images import in_color_order, load_image
from edgevlm.profiles.host import probe_host

frame = partial(random_frame, size=(96, 128))
ENDLESS = {"type": "gbnf", "grammar": 'root ::= "a"+'}  # never ends by itself
ENDLESS_GBNF = ENDLESS["grammar"]


def ask(image, text: str = "What is this?", **part) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image, **part}, {"type": "text", "text": text}]}]


def tokens(steps) -> list[int | None]:
    return [s.token for s in steps]


def model_is_free(vlm) -> bool:
    """The model's turn can be taken at once (no generation holds it, none waits)."""
    given_up = threading.Event()
    given_up.set()  # take() gives up at once instead of waiting
    if not vlm.turns.take(given_up):
        return False
    vlm.turns.give_back()
    return True


# -- one vocabulary ------------------------------------------------------------------------------------------------


def test_max_tokens_everywhere_and_max_new_tokens_deprecated(vlm):
    image = frame(0)
    new = list(vlm.generate("Describe it.", [image], max_tokens=3, temperature=0))
    assert len(new) <= 3 and new[-1].finish_reason in ("stop", "length")
    with pytest.warns(DeprecationWarning, match=r"max_new_tokens=\.\.\.\) is deprecated: use max_tokens"):
        old = list(vlm.generate("Describe it.", [image], max_new_tokens=3, temperature=0))
    assert tokens(old) == tokens(new)
    with pytest.warns(DeprecationWarning):
        assert vlm.plan("Describe it.", [image], max_new_tokens=3) == vlm.plan("Describe it.", [image], max_tokens=3)
    with pytest.raises(TypeError, match="give max_tokens only"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        list(vlm.generate("Hi", max_tokens=3, max_new_tokens=3))
    with pytest.raises(RequestError, match="max_tokens must be >= 1, got 0"):
        list(vlm.generate("Hi", max_tokens=0))


def test_chat_takes_every_budget_control_generate_takes(vlm):
    image = frame(1)
    controls = [{"tiles": 2, "image_budget": 40}, {"crop": Crop(0, 0, 0.5, 1, relative=True)},
                {"min_image_tokens": 20, "max_image_tokens": 30}]  # fmt: skip
    for options in controls:
        planned = vlm.plan("What is this?", [image], max_tokens=3, **options)
        steps = list(vlm.generate("What is this?", [image], max_tokens=3, temperature=0, **options))
        answer = vlm.chat(ask(image), max_tokens=3, **options)
        assert steps[-1].timings.n_image_tokens == answer.timings.n_image_tokens == planned.n_image_tokens, options
    assert vlm.chat(ask(image), max_tokens=1).timings.n_image_tokens != planned.n_image_tokens  # the controls acted


def test_one_image_works_where_a_list_is_expected(vlm, tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(frame(2)).save(path)
    expected = tokens(vlm.generate("What is this?", [str(path)], max_tokens=3))
    for single in (str(path), path, path.read_bytes(), Image.open(path), frame(2)):
        assert tokens(vlm.generate("What is this?", images=single, max_tokens=3)) == expected, type(single)
    assert vlm.plan("What is this?", str(path)).n_image_tokens == vlm.plan("What is this?", [str(path)]).n_image_tokens
    with pytest.raises(ImageError, match="not found: .*missing.jpg"):  # the path, not its first character
        list(vlm.generate("Hi", images=str(tmp_path / "missing.jpg")))


def test_adjusted_settings_are_reported_and_logged(tiny_bundles, caplog):
    n_threads = probe_host().logical_cpus + 1
    with caplog.at_level(logging.WARNING, logger="edgevlm"):
        vlm = edgevlm.load(tiny_bundles["F32"], "cpu", n_ctx=10**6, n_threads=n_threads)
    try:
        n_ctx_train = vlm.manifest.llm.n_ctx_train
        assert vlm.llm.n_ctx == n_ctx_train
        notes = "\n".join(vlm.settings.notes)
        assert f"n_ctx=1000000 is more than this model was trained for: using its n_ctx_train, {n_ctx_train}" in notes
        assert f"n_threads={n_threads} is more than the {n_threads - 1} CPUs" in notes and "used as asked" in notes
        assert all(note in caplog.text for note in vlm.settings.notes)
    finally:
        vlm.close()
    with edgevlm.load(tiny_bundles["F32"], "cpu", n_ctx=256, n_threads=1) as quiet:
        assert not any("n_ctx" in n or "n_threads" in n for n in quiet.settings.notes)


def test_prompt_tokens_have_one_definition_text_and_image(vlm):
    answer = vlm.chat(ask(frame(3)), max_tokens=2)
    t = answer.timings
    assert t.n_image_tokens == 15 and t.n_text_tokens > 0
    assert answer.usage["prompt_tokens"] == t.n_prompt_tokens == t.n_text_tokens + t.n_image_tokens
    last = list(vlm.generate("What is this?", frame(3), max_tokens=2))[-1].timings
    assert last.n_prompt_tokens == last.n_text_tokens + last.n_image_tokens
    assert t.n_reused_tokens + t.n_prefill_tokens == t.n_prompt_tokens  # every prompt cell, cached or decoded


# -- color order ---------------------------------------------------------------------------------------------------


def test_bgr_frames_with_color_order_bgr_give_the_rgb_answer(vlm):
    rgb = frame(4)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # what cv2.imread / VideoCapture.read give
    assert np.array_equal(np.asarray(load_image(in_color_order(bgr, "bgr"))), rgb)
    expected = tokens(vlm.generate("What is this?", [rgb], max_tokens=4))
    assert tokens(vlm.generate("What is this?", [bgr], max_tokens=4, color_order="bgr")) == expected
    assert tokens(vlm.generate("What is this?", bgr, max_tokens=4, color_order="bgr")) == expected
    rgb_answer = vlm.chat(ask(rgb), max_tokens=4).text
    assert vlm.chat(ask(bgr), max_tokens=4, color_order="bgr").text == rgb_answer
    assert vlm.chat(ask(bgr, color_order="bgr"), max_tokens=4).text == rgb_answer  # per part
    assert vlm.chat(ask(rgb, color_order="rgb"), max_tokens=4, color_order="bgr").text == rgb_answer  # part wins
    # the order matters: the same pixels read as RGB are another image to the model
    assert not np.allclose(vlm.prompt_logits("What is this?", [bgr]), vlm.prompt_logits("What is this?", [rgb]))
    with pytest.raises(ImageError, match="color_order must be 'rgb' or 'bgr', got 'BGRA'"):
        list(vlm.generate("Hi", [bgr], color_order="BGRA"))
    with pytest.raises(ImageError, match="color_order must be 'rgb' or 'bgr'"):
        vlm.chat(ask(bgr, color_order="hsv"))


# -- timeout -------------------------------------------------------------------------------------------------------


def test_timeout_ends_generate_and_chat_with_finish_reason_timeout(vlm):
    steps = list(vlm.generate("Go on.", max_tokens=1500, grammar=ENDLESS_GBNF, timeout=0.5))
    assert steps[-1].finish_reason == "timeout" and steps[-1].token is None
    assert 0 < steps[-1].timings.n_generated < 1500
    answer = vlm.chat([{"role": "user", "content": "Go on."}], max_tokens=1500, response_format=ENDLESS, timeout=0.5)
    assert answer.finish_reason == "timeout" and answer.text.startswith("a")
    assert model_is_free(vlm)
    assert vlm.chat(ask(frame(5)), max_tokens=2, timeout=60).finish_reason in ("stop", "length")  # usable at once
    with pytest.raises(RequestError, match="timeout must be > 0"):
        vlm.chat(ask(frame(5)), timeout=0)


def test_timeout_counts_the_wait_for_the_model(vlm):
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        for step in vlm.generate("Go on.", max_tokens=1500, grammar=ENDLESS_GBNF, cancel=release):
            holding.set()
            if step.finish_reason:
                return

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(60)
        waited = vlm.chat([{"role": "user", "content": "Hi"}], max_tokens=2, timeout=0.3)
        assert waited.finish_reason == "timeout" and waited.timings.n_generated == 0 and waited.timings.queue_ms >= 250
    finally:
        release.set()
        holder.join(60)
    assert model_is_free(vlm)


# -- asyncio -------------------------------------------------------------------------------------------------------


def test_async_chat_and_generate_give_the_sync_answers(vlm):
    messages = ask(frame(6))
    expected = vlm.chat(messages, max_tokens=5)
    expected_steps = tokens(vlm.generate("What is this?", frame(6), max_tokens=5))

    async def main():
        avlm = edgevlm.AsyncEdgeVLM(vlm)
        whole = await avlm.chat(messages, max_tokens=5)
        stream = await avlm.chat(messages, max_tokens=5, stream=True)
        chunks = [chunk async for chunk in stream]
        steps = [step async for step in avlm.generate("What is this?", frame(6), max_tokens=5)]
        both = await asyncio.gather(avlm.chat(messages, max_tokens=5), avlm.chat(messages, max_tokens=5))
        return whole, chunks, steps, both

    whole, chunks, steps, both = asyncio.run(main())
    assert (whole.text, whole.finish_reason) == (expected.text, expected.finish_reason)
    assert "".join(c.text for c in chunks) == expected.text and chunks[-1].finish_reason == expected.finish_reason
    assert tokens(steps) == expected_steps
    assert [b.text for b in both] == [expected.text] * 2
    with pytest.raises(RequestError):  # a bad request raises at the await, before it waits for the model
        asyncio.run(edgevlm.AsyncEdgeVLM(vlm).chat([{"role": "robot", "content": "hi"}]))


def test_async_consumer_that_stops_or_is_cancelled_stops_the_generation(vlm):
    endless = [{"role": "user", "content": "Go on."}]
    options = {"max_tokens": 1500, "response_format": ENDLESS}

    async def main() -> list[str]:
        avlm = edgevlm.AsyncEdgeVLM(vlm)
        finished = []
        # 1. the consumer leaves an `async with` after three chunks
        async with await avlm.chat(endless, stream=True, **options) as stream:
            async for i, _ in _enumerate(stream):
                if i == 2:
                    break
        finished.append(model_is_free(vlm))
        # 2. the task waiting for the answer is cancelled
        task = asyncio.ensure_future(avlm.chat(endless, **options))
        while model_is_free(vlm):  # until its generation holds the model
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        finished.append(model_is_free(vlm))
        # 3. the consumer drops the stream without closing it
        steps = avlm.generate("Go on.", max_tokens=1500, grammar=ENDLESS_GBNF)
        await steps.__anext__()
        del steps
        gc.collect()
        for _ in range(500):  # the step in flight ends (one token), then the stream closes
            if model_is_free(vlm):
                break
            await asyncio.sleep(0.01)
        finished.append(model_is_free(vlm))
        # usable right after, from asyncio and from threads
        answer = await avlm.chat(ask(frame(7)), max_tokens=2)
        finished.append(answer.finish_reason)
        return finished

    assert asyncio.run(main())[:3] == [True, True, True]
    assert vlm.chat(ask(frame(7)), max_tokens=2).finish_reason in ("stop", "length")


async def _enumerate(iterator):
    i = 0
    async for item in iterator:
        yield i, item
        i += 1
