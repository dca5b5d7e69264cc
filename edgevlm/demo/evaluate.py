"""Accuracy of the demo model on held-out scenes: the PyTorch reference and bundles, answer by answer.

`bundle_answers` needs only the runtime; `reference_answers` needs torch and transformers (`edgevlm[export]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .scenes import QUESTION_TYPES, Scene, scene


@dataclass(frozen=True)
class Score:
    accuracy: float  # fraction of answers equal to the expected one
    by_type: dict[str, float]  # the same per question type
    agreement: float | None  # fraction of answers equal to the reference's (None for the reference itself)


def held_out_scenes(n: int, split: str = "test") -> list[Scene]:
    """The first `n` scenes of `split`, question types in turn (an equal share of each)."""
    return [scene(i, split, QUESTION_TYPES[i % len(QUESTION_TYPES)]) for i in range(n)]


def bundle_answers(bundle: str | Path, scenes: Sequence[Scene], vision_dtype: str | None = None) -> list[str]:
    """The bundle's greedy answer to each scene's question."""
    import edgevlm

    from . import ask

    vlm = edgevlm.load(bundle, n_ctx=512, vision_dtype=vision_dtype)
    try:
        return [ask(vlm, s)[0] for s in scenes]
    finally:
        vlm.close()


def reference_answers(model_dir: str | Path, scenes: Sequence[Scene], max_new_tokens: int = 8) -> list[str]:
    """transformers' greedy answers, through the exporter family's own reference inputs (template, processor)."""
    import torch

    from ..exporters.qwen2_vl import FAMILY

    loaded = FAMILY.load(Path(model_dir))
    stop = [loaded.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    answers = []
    with torch.no_grad():
        for s in scenes:
            inputs = FAMILY.reference_inputs(loaded, s.question, [s.image])
            out = loaded.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=stop[1]
            )
            new = out[0, inputs["input_ids"].shape[1] :]
            answers.append(loaded.tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers


def score(answers: Sequence[str], scenes: Sequence[Scene], reference: Sequence[str] | None = None) -> Score:
    if len(answers) != len(scenes):
        raise ValueError(f"{len(answers)} answers for {len(scenes)} scenes")
    hits = [a == s.answer for a, s in zip(answers, scenes, strict=True)]
    agreement = None
    if reference is not None:
        agreement = sum(a == r for a, r in zip(answers, reference, strict=True)) / len(answers)
    return Score(sum(hits) / len(hits), accuracy_by_type(hits, scenes), agreement)


def accuracy_by_type(hits: Sequence[bool], scenes: Sequence[Scene]) -> dict[str, float]:
    """The fraction of hits per question type, for the types among `scenes`."""
    by_type = {}
    for question_type in QUESTION_TYPES:
        typed = [h for h, s in zip(hits, scenes, strict=True) if s.question_type == question_type]
        if typed:
            by_type[question_type] = sum(typed) / len(typed)
    return by_type
