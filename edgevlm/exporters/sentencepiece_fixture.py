"""A deterministic SentencePiece model for tiny test tokenizers (LLaVA's Llama-style, Gemma's), trained here.

Seeded, single-threaded training on seeded sentences of fixed words plus a family's chat lines: the same text gives
the same model on every install. The training text is made here from fixed words, not read from files: a corpus that
followed edgevlm's own source changed the fixtures (and a random model's greedy near-ties) with every code edit.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

_WORDS = """the a an of to in on at by for with from and or not is are was be has have it this that these image images
picture photo robot kiosk laptop device model vision language token tokens patch patches pixel pixels tower layer
layers attention head heads embed embedding embeddings weight weights bundle bundles export exporter runtime graph
session prompt answer question chat user assistant system message content text describe write count counts apple
apples haiku shape shapes circle square triangle star red green blue yellow purple left right top bottom large small
color colors number numbers first second third quick brown fox jumps over lazy dog please detail describe show shows
what where which how many why when who one two three four five six seven eight nine ten hundred thousand
def return class import from self none true false if else elif for while try except raise with as lambda yield
print len range list dict tuple set str int float bytes path file files read write open close load save run serve
quantize quantization cache context position positions rope section sections rotary merge merged size sizes
""".split()  # noqa: SIM905 -- a word list reads better as text


def training_lines(chat_lines: Sequence[str]) -> list[str]:
    """Seeded sentences of `_WORDS` with digits and punctuation, then `chat_lines` (each 20 times)."""
    import numpy as np

    rng = np.random.default_rng(0)
    lines = []
    for _ in range(4000):
        words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(4, 16)))]
        if rng.random() < 0.3:
            words.append(str(int(rng.integers(0, 100_000))))
        lines.append(" ".join(words) + str(rng.choice([".", "?", "!", ",", ":"])))
    return lines + list(chat_lines) * 20


def train_sentencepiece(n_pieces: int, chat_lines: Sequence[str], **settings: Any) -> bytes:
    """A SentencePiece BPE model of `n_pieces` with byte fallback and digits split; `settings` are
    `SentencePieceTrainer.train` options (special ids, dummy prefix, user-defined symbols)."""
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError(
            "building a tiny SentencePiece tokenizer needs sentencepiece: pip install 'edgevlm[dev]'"
        ) from e
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines(chat_lines)), model_writer=model, model_type="bpe",
        vocab_size=n_pieces, byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        num_threads=1, shuffle_input_sentence=False, max_sentence_length=100_000, minloglevel=2, **settings,
    )  # fmt: skip
    return model.getvalue()
