"""`edgevlm chat`: the terminal chat driven as a user would, through a pipe, against the answers of `EdgeVLM.chat`."""

from __future__ import annotations

import subprocess
import sys

import pytest

import edgevlm

MAX_TOKENS = 6
FLAGS = ("--max-tokens", str(MAX_TOKENS), "--threads", "1", "--n-ctx", "1024")


def chat(bundle, lines: list[str], *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "edgevlm.cli", "chat", str(bundle), *FLAGS, *flags]
    return subprocess.run(command, input="".join(f"{line}\n" for line in lines), capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from conftest import random_image

    path = tmp_path_factory.mktemp("chat") / "photo.png"
    random_image(120, 160).save(path)
    return path


@pytest.fixture(scope="module")
def reference(tiny_bundles):
    """The answers `EdgeVLM.chat` gives to a conversation, with the same settings as the terminal chat."""
    with edgevlm.load(tiny_bundles["F32"], n_ctx=1024, n_threads=1) as vlm:
        yield lambda messages: vlm.chat(messages, max_tokens=MAX_TOKENS).text


def user(text: str, *images) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": str(i)} for i in images), {"type": "text", "text": text}]}  # fmt: skip


def test_chat_keeps_the_conversation_attaches_images_and_resets(tiny_bundles, photo, reference):
    lines = ["/image " + str(photo), "What is this?", "And its colour?", "/reset", "What is this?", "/quit", "ignored"]
    result = chat(tiny_bundles["F32"], lines)
    assert result.returncode == 0, result.stderr
    first = reference([user("What is this?", photo)])
    second = reference([user("What is this?", photo), {"role": "assistant", "content": first}, user("And its colour?")])  # fmt: skip
    after_reset = reference([user("What is this?")])
    # each answer streamed on its own line, each turn with the conversation so far (the image on the first one only)
    assert result.stdout == f"{first}\n{second}\n{after_reset}\n"
    assert f"(attached {photo}, 160x120" in result.stderr and "(conversation cleared)" in result.stderr
    # the answers tell the cases apart: the image, the history and the reset each change what the model says
    history = [user("What is this?", photo), {"role": "assistant", "content": first}, user("And its colour?"),
               {"role": "assistant", "content": second}]  # fmt: skip
    assert first != after_reset and second != reference([user("And its colour?")])
    assert after_reset != reference([*history, user("What is this?")])


def test_chat_system_message_and_end_of_input(tiny_bundles, reference):
    system = "You are a careful assistant. Answer every question in French, in one short sentence."
    result = chat(tiny_bundles["F32"], ["Hello"], "--system", system)  # no /quit: end of input ends the chat
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference([{"role": "system", "content": system}, user("Hello")]) + "\n"


def test_chat_errors_leave_the_conversation_usable(tiny_bundles, tmp_path, reference):
    lines = ["/image " + str(tmp_path / "missing.png"), "/help", "/frobnicate", "Hello"]
    result = chat(tiny_bundles["F32"], lines)
    assert result.returncode == 0, result.stderr
    assert "edgevlm chat: error:" in result.stderr and "missing.png" in result.stderr
    assert "/image PATH" in result.stderr and "/reset" in result.stderr  # the command list, for /help and unknowns
    assert result.stdout == reference([user("Hello")]) + "\n"  # the missing image was not attached
