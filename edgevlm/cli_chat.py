"""`edgevlm chat BUNDLE`: a conversation in the terminal on `EdgeVLM.chat`. Part of the command line, so it prints.

Each line typed is a user message; the answer streams as it is decoded. The whole conversation goes to `chat` on
every turn: the KV cache and the embedding cache make a follow-up decode only what is new.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import EdgeVLMError

CHAT_COMMANDS = (
    "/image PATH   attach an image to your next message (repeat for several)",
    "/reset        forget the conversation and any attached image",
    "/quit         leave (so does Ctrl-D)",
)


@dataclass
class Conversation:
    """The messages so far, in `EdgeVLM.chat`'s form, and the images waiting for the next user message."""

    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    attached: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.attached = []

    def with_question(self, text: str) -> list[dict[str, Any]]:
        """The conversation with the user's next message (the attached images first, then `text`)."""
        parts = [{"type": "image", "image": path} for path in self.attached]
        return [*self.messages, {"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def run_chat(vlm, *, system: str | None, sampling: dict[str, Any], image_policy) -> int:
    """Read lines from stdin until /quit or end of input; answers go to stdout, everything else to stderr."""
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history for input(), where the platform has it
            import readline  # noqa: F401
    conversation = Conversation(system)
    say(f"chatting with {vlm.bundle.path.name} ({vlm.profile.name} profile); " + ", ".join(c.split()[0] for c in CHAT_COMMANDS))  # fmt: skip
    for line in _lines("> " if interactive else ""):
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if _command(line, conversation, image_policy) == "quit":
                break
            continue
        _answer(vlm, conversation, line, sampling, image_policy)
    return 0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _lines(prompt: str) -> Iterator[str]:
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return


def _command(line: str, conversation: Conversation, image_policy) -> str | None:
    from .images import check_images

    name, _, argument = line.partition(" ")
    if name in ("/quit", "/exit"):
        return "quit"
    if name == "/reset":
        conversation.reset()
        say("(conversation cleared)")
    elif name == "/image" and argument.strip():
        path = argument.strip()
        try:
            width, height = check_images([path], image_policy.limits).sizes[0]
        except EdgeVLMError as e:
            say(f"edgevlm chat: error: {e}")
            return None
        conversation.attached.append(path)
        say(f"(attached {path}, {width}x{height}: it goes with your next message)")
    else:
        say("commands:\n" + "\n".join(f"  {c}" for c in CHAT_COMMANDS))
    return None


def _answer(vlm, conversation: Conversation, question: str, sampling: dict[str, Any], image_policy) -> None:
    """Stream the answer to `question`; the turn joins the conversation only when it was answered in full."""
    messages = conversation.with_question(question)
    pieces: list[str] = []
    finish_reason = None
    chunks = iter(())
    try:
        chunks = vlm.chat(messages, stream=True, image_policy=image_policy, **sampling)  # checks the request first
        for chunk in chunks:
            print(chunk.text, end="", flush=True)
            pieces.append(chunk.text)
            finish_reason = chunk.finish_reason
    except EdgeVLMError as e:
        say(f"{chr(10) if pieces else ''}edgevlm chat: error: {e} (the message was not added to the conversation)")
        conversation.attached = []
        return
    except KeyboardInterrupt:
        chunks.close()  # ends the generation and gives the model back
        say("\n(interrupted: the message was not added to the conversation)")
        return
    print(flush=True)
    if finish_reason == "length":
        say(f"(the answer reached --max-tokens {sampling['max_tokens']})")
    conversation.messages = [*messages, {"role": "assistant", "content": "".join(pieces)}]
    conversation.attached = []
