"""Time to first token of a follow-up question about the same image, against the first question's.

    python benchmarks/bench_followup.py /work/bench/qwen2-vl-2b-Q4_K_M --json benchmarks/results/followup-qwen2-vl-2b.json

One process, one run of each (the ratio is of numbers measured side by side): load the bundle; warm onnxruntime and
llama.cpp up on another image; ask the first question about a 448x448 image (256 image tokens); ask a follow-up with
the conversation so far (system, image + question, the answer, a new question), which reuses the KV cache and the
image embedding; then, as a control, the same follow-up after `clear_caches()` (everything decoded again). Time to
first token is wall time from the `chat` call to its first streamed chunk (image decoding, preprocessing and
template included), next to the pipeline's own `time_to_first_token_ms`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import edgevlm

IMAGE_SIZE = 448
SYSTEM = "You are the camera assistant of a delivery robot."
FIRST = "Describe this picture in detail."
FOLLOW_UP = "Is there anything blocking the path?"


def ask(vlm: edgevlm.EdgeVLM, messages: list[dict], max_tokens: int) -> dict:
    start = time.perf_counter()
    chunks = vlm.chat(messages, stream=True, max_tokens=max_tokens, temperature=0)
    first = next(chunks)
    first_chunk_ms = (time.perf_counter() - start) * 1000
    text = [first.text]
    last = first
    for chunk in chunks:
        text.append(chunk.text)
        last = chunk
    t = last.timings
    return {"wall_ttft_ms": first_chunk_ms, "text": "".join(text), "finish_reason": last.finish_reason,
            "timings": {**dataclasses.asdict(t), "prefill_tokens_per_s": t.prefill_tokens_per_s,
                        "decode_tokens_per_s": t.decode_tokens_per_s}}  # fmt: skip


def revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", nargs="?", default="/work/bench/qwen2-vl-2b-Q4_K_M")
    parser.add_argument("--vision-dtype", default="int8", help="vision graph precision (default: int8)")
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--max-tokens", type=int, default=16, help="length of the first answer (default: 16)")
    parser.add_argument("--json", default="benchmarks/results/followup-qwen2-vl-2b.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    warmup_image = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)

    t0 = time.perf_counter()
    vlm = edgevlm.load(args.bundle, n_threads=args.threads, vision_dtype=args.vision_dtype)
    load_s = time.perf_counter() - t0

    def user(img: np.ndarray, text: str) -> dict:
        return {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}

    ask(vlm, [{"role": "system", "content": "Warm-up."}, user(warmup_image, FIRST)], 2)
    conversation = [{"role": "system", "content": SYSTEM}, user(image, FIRST)]
    first = ask(vlm, conversation, args.max_tokens)
    conversation += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": FOLLOW_UP}]
    follow_up = ask(vlm, conversation, args.max_tokens)
    vlm.clear_caches()
    cold = ask(vlm, conversation, args.max_tokens)

    ratio = follow_up["wall_ttft_ms"] / first["wall_ttft_ms"]
    result = {
        "bundle": str(args.bundle), "vision_dtype": args.vision_dtype, "image": f"{IMAGE_SIZE}x{IMAGE_SIZE}",
        "threads": args.threads or os.cpu_count(), "load_s": load_s, "load_average": os.getloadavg(),
        "revision": revision(), "ratio_followup_to_first_ttft": ratio,
        "first": first, "follow_up": follow_up, "follow_up_without_reuse": cold,
    }  # fmt: skip
    print(f"load {load_s:.1f} s, vision {args.vision_dtype}, load average {os.getloadavg()[0]:.2f}")
    for name, run in (("first question", first), ("follow-up", follow_up), ("follow-up, caches cleared", cold)):
        t = run["timings"]
        print(f"{name:<27} time to first token {run['wall_ttft_ms']:7.0f} ms (pipeline {t['time_to_first_token_ms']:6.0f} ms)"
              f" | vision {t['vision_ms']:5.0f} ms | image tokens {t['n_image_tokens']} encoded {t['n_encoded_image_tokens']}"
              f" | reused {t['n_reused_tokens']} decoded {t['n_prefill_tokens']}")  # fmt: skip
    print(f"follow-up / first time to first token: {ratio:.3f} (target <= 0.20)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    vlm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
