"""Accuracy of the demo model (`edgevlm demo`) on held-out scenes: PyTorch reference vs its bundles.

    python benchmarks/bench_demo_accuracy.py --scenes 300

Exports the packaged demo model as F16, Q8_0 and Q4_K_M bundles (Q8_0 and Q4_K_M with fp32 and int8 vision), asks
each the questions of `--scenes` scenes of the "test" split (never seen in training), and prints a markdown table:
accuracy overall and per question type, and agreement with the reference's answers, answer by answer.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from edgevlm.demo.evaluate import Score, bundle_answers, held_out_scenes, reference_answers, score
from edgevlm.demo.scenes import QUESTION_TYPES
from edgevlm.exporters import export
from edgevlm.exporters.bundle_export import resolve_model

# (label, LLM quantization, vision dtype)
VARIANTS = [
    ("F16 + fp32 vision", "F16", "fp32"),
    ("Q8_0 + fp32 vision", "Q8_0", "fp32"),
    ("Q8_0 + int8 vision", "Q8_0", "int8"),
    ("Q4_K_M + fp32 vision", "Q4_K_M", "fp32"),
    ("Q4_K_M + int8 vision", "Q4_K_M", "int8"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--model", default="demo", help="model to evaluate (default: the packaged demo model)")
    args = parser.parse_args()

    scenes = held_out_scenes(args.scenes)
    rows: list[tuple[str, Score, float]] = []
    start = time.perf_counter()
    reference = reference_answers(resolve_model(args.model)[0], scenes)
    rows.append(("PyTorch reference (fp32)", score(reference, scenes), (time.perf_counter() - start) / len(scenes)))
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {}
        for quantization in ("F16", "Q8_0", "Q4_K_M"):
            dtypes = ("fp32",) if quantization == "F16" else ("fp32", "int8")
            bundles[quantization] = export(args.model, Path(tmp) / quantization, quantization=quantization, vision_dtypes=dtypes)  # fmt: skip
        for label, quantization, vision_dtype in VARIANTS:
            start = time.perf_counter()
            answers = bundle_answers(bundles[quantization], scenes, vision_dtype)
            rows.append((label, score(answers, scenes, reference), (time.perf_counter() - start) / len(scenes)))

    print(f"{len(scenes)} held-out scenes ({len(scenes) // len(QUESTION_TYPES)} per question type)\n")
    print("| model | accuracy | " + " | ".join(QUESTION_TYPES) + " | agreement with reference | s / answer |")
    print("|---|---|" + "---|" * len(QUESTION_TYPES) + "---|---|")
    for label, s, seconds in rows:
        agreement = "—" if s.agreement is None else f"{s.agreement:.1%}"
        per_type = " | ".join(f"{s.by_type[t]:.1%}" for t in QUESTION_TYPES)
        print(f"| {label} | **{s.accuracy:.1%}** | {per_type} | {agreement} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
