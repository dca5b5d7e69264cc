"""Build a random-weight model directory with a published model's sizes (Qwen2-VL-2B, Qwen3-VL-2B, Qwen2.5-VL-7B).

    python benchmarks/make_2b.py /work/bench/qwen2-vl-2b-random
    python benchmarks/make_2b.py /work/bench/qwen3-vl-2b-random --model qwen3-vl-2b
    python benchmarks/make_2b.py /work/bench/qwen2.5-vl-7b-random --model qwen2.5-vl-7b

Weights are stored in bfloat16, as in the published checkpoint: the directory then has the real model's size on
disk (~4.4 GB) and an export reads, and upcasts, what it would read from the real one. The builder initialises in
float32 before casting, so building needs ~9 GB of RAM whichever dtype is stored; the 7B is never built with
weights: each tensor is drawn and written alone (~5 GB of RAM at most, for the token embeddings).
"""

from __future__ import annotations

import argparse
import importlib
import resource
import sys
import time
from pathlib import Path

# model -> (module, builder, shape, keyword arguments naming module constants or values) of the family's builder
MODELS = {
    "qwen2-vl-2b": ("edgevlm.exporters.qwen2_vl.synthetic", "build_qwen2_vl", "QWEN2_VL_2B", {}),
    "qwen3-vl-2b": ("edgevlm.exporters.qwen3_vl.synthetic", "build_qwen3_vl", "QWEN3_VL_2B", {}),
    # 16.6 GB in bf16: written tensor by tensor, never built with weights. Weights of std 0.02 (the tiny model's 0.05
    # grows activations through 32 tower blocks until fp32 rounding alone exceeds the graph's 1e-4 check: 1.05e-3)
    "qwen2.5-vl-7b": (
        "edgevlm.exporters.qwen2_5_vl.synthetic",
        "build_qwen2_5_vl",
        "QWEN2_5_VL_7B",
        {"windows": "QWEN2_5_VL_WINDOWS", "streamed": True, "init_std": 0.02},
    ),
}


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="model directory to create (must not exist or be empty)")
    parser.add_argument("--model", choices=MODELS, default="qwen2-vl-2b", help="whose sizes (default: qwen2-vl-2b)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = parser.parse_args(argv)
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        parser.error(f"{args.output} exists and is not an empty directory; remove it or choose another path")

    module, builder, shape, options = MODELS[args.model]
    synthetic = importlib.import_module(module)
    kwargs = {k: getattr(synthetic, v) if isinstance(v, str) else v for k, v in options.items()}
    start = time.perf_counter()
    getattr(synthetic, builder)(args.output, getattr(synthetic, shape), seed=args.seed, dtype="bfloat16", **kwargs)
    elapsed = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    print(
        f"wrote {args.output}: {directory_bytes(args.output) / 1e9:.2f} GB in {elapsed:.0f} s "
        f"(peak RSS {peak_gib:.1f} GiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
