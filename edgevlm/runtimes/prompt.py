"""Prompts: the model's chat template, rendered with a request's texts kept as text, and tokenized into the pieces
between image placeholders.

A request's texts (every message's text parts, `generate`'s prompt) are data. "<|im_end|>" typed by a user reaches
the model as the characters it spells, never as the control token, as OpenAI's API treats it; the template's own
markup stays special. Text that cannot form a special token's text, alone or with what surrounds it (nearly all
text), is rendered into the template as it is and tokenized with the template's text, so the tokens are exactly
transformers'. Any other text is cut out of the rendering by a marker and tokenized on its own as plain text.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from jinja2 import Template, TemplateError, nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import RequestError

# Private-use characters around a cut-out text's index in the rendered prompt; a text containing one is cut out too.
_MARK = "\ue000"


class _GenerationTags(Extension):
    """`{% generation %}…{% endgeneration %}` (transformers marks assistant text with it, e.g. LLaVA's template):
    rendered as its body, as transformers renders it."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def compile_chat_template(template: str) -> Template:
    """The model's chat template, compiled once in a sandbox (it comes from a file, not from us)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTags])

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


@dataclass(frozen=True)
class Literal:
    """A request's text that must be tokenized as plain text, apart from the template's text around it."""

    text: str


Segment = str | Literal  # template text (special tokens parsed, request text that cannot form one included) or a literal


class Tokenizer(Protocol):
    def tokenize(self, text: str, *, parse_special: bool = True, add_special: bool = False) -> list[int]: ...


class SpecialTokens:
    """The vocabulary's special tokens (control, user-defined, unknown: what llama.cpp matches by their text)."""

    def __init__(self, texts_by_id: Mapping[int, str], also: Sequence[str] = ()):
        """`also`: more texts a request's text must not form (the image placeholder, whatever its token type)."""
        self.texts_by_id = dict(texts_by_id)
        self._texts = tuple({text for text in (*self.texts_by_id.values(), *also) if text})

    def may_form(self, text: str) -> bool:
        """Whether `text` holds a special token's text, or could form one with the text before or after it: it
        contains one, lies inside one, or starts with the end of one or ends with the start of one."""
        if not text:
            return False
        if _MARK in text:
            return True
        for special in self._texts:
            if special in text or text in special:
                return True
            for k in range(1, min(len(special), len(text) + 1)):
                if text.endswith(special[:k]) or text.startswith(special[-k:]):
                    return True
        return False


class PromptRenderer:
    """Renders conversations with the model's chat template and tokenizes them (see the module docstring)."""

    def __init__(self, template: str, specials: SpecialTokens, image_pad: str, normalization: str | None):
        self._template = compile_chat_template(template)
        self.specials = specials
        self.image_pad = image_pad
        self.normalization = normalization  # Unicode form the tokenizer expects ("NFC" for Qwen2); llama.cpp applies none

    def segments(self, messages: Sequence[Mapping[str, Any]]) -> list[Segment]:
        """The prompt of `messages` (the template's form: role, content a string or text and image parts), ending
        where the assistant speaks next, as template text and the literals cut out of it."""
        literals: list[str] = []

        def cut(text: Any) -> Any:
            if not isinstance(text, str) or not self.specials.may_form(text):
                return text
            literals.append(text)
            return f"{_MARK}{len(literals) - 1}{_MARK}"

        guarded = [_with_texts(message, cut) for message in messages]
        try:
            rendered = self._template.render(messages=guarded, add_generation_prompt=True)
        except (TemplateError, ValueError) as err:
            raise RequestError(f"the model's chat template refused these messages: {err}") from err
        parts = rendered.split(_MARK)
        indices = parts[1::2]
        if indices != [str(i) for i in range(len(literals))]:
            raise RequestError("the model's chat template changed or repeated a message text that holds special-token "
                               "characters, so it cannot be kept as text; remove those characters")  # fmt: skip
        out: list[Segment] = []
        for i, part in enumerate(parts):
            out.append(Literal(literals[int(part)]) if i % 2 else part)
        return [segment for segment in out if segment != ""]

    def pieces(self, segments: Sequence[Segment], tokenizer: Tokenizer) -> list[list[int]]:
        """Tokens of the prompt between image placeholders: one more piece than there are images. The first piece
        starts with the tokenizer's BOS token when it adds one (Llama's `<s>`), as transformers'."""
        pieces: list[list[int]] = [[]]
        first = True
        for segment in segments:
            if isinstance(segment, Literal):
                if first:
                    pieces[-1] += tokenizer.tokenize("", add_special=True)
                pieces[-1] += self._plain_tokens(self._normalize(segment.text), tokenizer)
                first = False
                continue
            for j, text in enumerate(self._normalize(segment).split(self.image_pad)):
                if j:
                    pieces.append([])
                if text or first:
                    pieces[-1] += tokenizer.tokenize(text, add_special=first)
                    first = False
        if first:  # an empty prompt still starts with BOS
            pieces[-1] += tokenizer.tokenize("", add_special=True)
        return pieces

    def _normalize(self, text: str) -> str:
        return unicodedata.normalize(self.normalization, text) if self.normalization else text

    def _plain_tokens(self, text: str, tokenizer: Tokenizer) -> list[int]:
        """`text` as text: llama.cpp still matches user-defined tokens without special parsing, so any special
        token that comes out is spelled again character by character."""
        tokens = tokenizer.tokenize(text, parse_special=False)
        if not any(token in self.specials.texts_by_id for token in tokens):
            return tokens
        out: list[int] = []
        for token in tokens:
            if token in self.specials.texts_by_id:
                spelled = [t for char in self.specials.texts_by_id[token] for t in tokenizer.tokenize(char, parse_special=False)]  # fmt: skip
                out += [t for t in spelled if t not in self.specials.texts_by_id]
            else:
                out.append(token)
        return out


def _with_texts(message: Mapping[str, Any], cut) -> dict[str, Any]:
    """`message` with `cut` applied to its text (string content or the `text` of text parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": cut(content)}
    if isinstance(content, Sequence):
        parts = [{**part, "text": cut(part.get("text"))} if isinstance(part, Mapping) and part.get("type") == "text" else part for part in content]  # fmt: skip
        return {**message, "content": parts}
    return dict(message)


def joined(segments: Sequence[Segment]) -> str:
    """The prompt's text, literals in place."""
    return "".join(segment.text if isinstance(segment, Literal) else segment for segment in segments)
