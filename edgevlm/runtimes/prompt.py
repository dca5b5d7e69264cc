"""Prompts: the model's chat template, rendered with a request's texts kept as text, and tokenized into the pieces
between image placeholders.

A request's texts (every message's text parts, `generate`'s prompt) are data. "<|im_end|>" typed by a user reaches
the model as the characters it spells, never as the control token, as OpenAI's API treats it; the template's own
markup stays special. The prompt is rendered once with every text between markers, to find the special tokens'
texts that a request's text is part of. When there are none (nearly always), the prompt is rendered as it is and
tokenized whole, so the tokens are exactly transformers'. Otherwise each text that is part of one is cut out of the
rendering by a marker and tokenized on its own as plain text.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from jinja2 import Template, TemplateError, nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import RequestError

# Private-use characters: a text rendered between markers is OPEN index SEP text CLOSE, a cut-out text is CUT index
# CUT. A text that contains one of them is always cut out.
_OPEN, _SEP, _CLOSE, _CUT = "\ue000", "\ue001", "\ue002", "\ue003"
_MARKED = re.compile(f"{_OPEN}(\\d+){_SEP}|{_CLOSE}")


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


Segment = str | Literal  # template text (special tokens parsed; request text that is not part of one) or a literal


class Tokenizer(Protocol):
    def tokenize(self, text: str, *, parse_special: bool = True, add_special: bool = False) -> list[int]: ...


class SpecialTokens:
    """The vocabulary's special tokens (control, user-defined, unknown: what llama.cpp matches by their text)."""

    def __init__(self, texts_by_id: Mapping[int, str], also: Sequence[str] = ()):
        """`also`: more texts a request's text must not form (the image placeholder, whatever its token type)."""
        self.texts_by_id = dict(texts_by_id)
        self._texts = tuple({text for text in (*self.texts_by_id.values(), *also) if text})

    def occurrences(self, text: str) -> Iterator[tuple[int, int]]:
        """(start, end) of every occurrence of a special token's text in `text`, overlapping ones included."""
        for special in self._texts:
            start = text.find(special)
            while start >= 0:
                yield start, start + len(special)
                start = text.find(special, start + 1)

    def may_form(self, text: str) -> bool:
        """Whether `text` holds a special token's text, or could form one with the text before or after it: it
        contains one, lies inside one, or starts with the end of one or ends with the start of one (what decides
        when a template changed the marked texts, so their places in the prompt are unknown)."""
        if not text:
            return False
        for special in self._texts:
            if special in text or text in special:
                return True
            for k in range(1, min(len(special), len(text) + 1)):
                if text.endswith(special[:k]) or text.startswith(special[-k:]):
                    return True
        return False


class PromptRenderer:
    """Renders conversations with the model's chat template and tokenizes them (see the module docstring)."""

    def __init__(self, template: str, specials: SpecialTokens, image_pad: str, normalization: str | None,
                 image_text: tuple[str, str] = ("", "")):  # fmt: skip
        """`image_text`: the text written before and after each image's embeddings in its placeholder's place."""
        self._template = compile_chat_template(template)
        self.specials = specials
        self.image_pad = image_pad
        self.image_prefix, self.image_suffix = image_text
        self.normalization = normalization  # Unicode form the tokenizer expects ("NFC" for Qwen2); llama.cpp applies none

    def segments(self, messages: Sequence[Mapping[str, Any]]) -> list[Segment]:
        """The prompt of `messages` (the template's form: role, content a string or text and image parts), ending
        where the assistant speaks next, as template text and the literals cut out of it."""
        texts = _all_texts(messages)
        forced = {i for i, text in enumerate(texts) if any(mark in text for mark in (_OPEN, _SEP, _CLOSE, _CUT))}
        cut = forced | self._texts_in_specials(messages, texts, forced)
        if not cut:
            return [self._render(messages, lambda i, text: text)]
        rendered = self._render(messages, lambda i, text: f"{_CUT}{i}{_CUT}" if i in cut else text)
        parts = rendered.split(_CUT)
        if any(int(index) not in cut for index in parts[1::2]) or len(parts) % 2 == 0:
            raise RequestError("the model's chat template changed a message text that holds special-token characters, "
                               "so it cannot be kept as text; remove those characters")  # fmt: skip
        out: list[Segment] = [Literal(texts[int(part)]) if i % 2 else part for i, part in enumerate(parts)]
        return [segment for segment in out if segment != ""]

    def _render(self, messages: Sequence[Mapping[str, Any]], text_as: Callable[[int, str], str]) -> str:
        """The template's output with each text (numbered in message order) replaced by `text_as(index, text)`."""
        counter = itertools.count()
        guarded = _with_texts(messages, lambda text: text_as(next(counter), text))
        try:
            return self._template.render(messages=guarded, add_generation_prompt=True)
        except (TemplateError, ValueError) as err:
            raise RequestError(f"the model's chat template refused these messages: {err}") from err

    def _texts_in_specials(self, messages: Sequence[Mapping[str, Any]], texts: list[str], forced: set[int]) -> set[int]:  # fmt: skip
        """The indices of `texts` (the messages' texts in order) that take part in a special token's text in the
        rendered prompt (`forced` ones are cut out)."""
        marked = self._render(messages, lambda i, text: _CUT if i in forced else f"{_OPEN}{i}{_SEP}{text}{_CLOSE}")
        clean, spans, opened, at = [], [], None, 0  # the prompt without markers, and (start, end, index) of texts
        length = 0  # of the prompt without markers so far
        for match in _MARKED.finditer(marked):
            clean.append(marked[at : match.start()])
            length += match.start() - at
            at = match.end()
            if match.group(1) is not None and opened is None:
                opened = (length, int(match.group(1)))
            elif match.group(1) is None and opened is not None:
                spans.append((opened[0], length, opened[1]))
                opened = None
            else:  # the template cut or repeated a marked text: judge each text by itself
                return {i for i, text in enumerate(texts) if self.specials.may_form(text)}
        clean.append(marked[at:])
        prompt = "".join(clean)
        occurrences = list(self.specials.occurrences(prompt))
        return {index for lo, hi, index in spans if any(start < hi and lo < end for start, end in occurrences)}

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
            parts = self._normalize(segment).split(self.image_pad)
            for j, text in enumerate(parts):
                if j:
                    pieces.append([])
                text = (self.image_suffix if j else "") + text + (self.image_prefix if j < len(parts) - 1 else "")
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


def _with_texts(messages: Sequence[Mapping[str, Any]], replace: Callable[[str], str]) -> list[dict[str, Any]]:
    """`messages` with `replace` applied to each text (string content or the `text` of text parts), in order."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            content = replace(content)
        elif isinstance(content, Sequence):
            content = [{**part, "text": replace(part["text"])} if _is_text_part(part) else part for part in content]
        out.append({**message, "content": content})
    return out


def _is_text_part(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _all_texts(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    texts: list[str] = []
    _with_texts(messages, lambda text: texts.append(text) or text)
    return texts


def joined(segments: Sequence[Segment]) -> str:
    """The prompt's text, literals in place."""
    return "".join(segment.text if isinstance(segment, Literal) else segment for segment in segments)
