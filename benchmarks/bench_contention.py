"""Answers while another process keeps cores busy: the `cpu` profile's threads against fixed thread counts.

    python benchmarks/bench_contention.py                                  # the demo bundle, camera-frame questions
    python benchmarks/bench_contention.py /work/bench/qwen2-vl-2b-Q4_K_M --image-side 448 --max-new-tokens 32

A robot runs other processes next to the VLM. llama.cpp's threads wait for each other at every step, so one that
shares its core with a busy process stalls all of them. For each situation (idle; `--busy` cores kept busy by
spin loops this script starts and stops) the same questions go to three loaded copies of the bundle in turn: the
`cpu` profile as shipped, and fixed llama.cpp/onnxruntime thread counts of 1 and of every physical core. Reported:
median latency per question, time to first token and decode speed, and the profile's ratio to the best fixed
setting of that situation.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import edgevlm
from edgevlm.bench import host_record
from edgevlm.demo.scenes import scene
from edgevlm.profiles import probe_host

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmark modules
from bench_export_run import edgevlm_revision


def _spin() -> None:
    while True:
        pass


def measure(vlm, questions: list, max_new_tokens: int) -> dict:
    latencies, ttft, decode, threads = [], [], [], []
    for question, image in questions:
        start = time.perf_counter()
        steps = list(vlm.generate(question, images=[image], max_new_tokens=max_new_tokens))
        latencies.append(time.perf_counter() - start)
        timings = steps[-1].timings
        ttft.append(timings.time_to_first_token_ms / 1000)
        decode.append(timings.decode_tokens_per_s)
        threads.append(timings.n_threads)
    return {"latency_s": latencies, "time_to_first_token_s": ttft, "decode_tokens_per_s": decode, "n_threads": threads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, nargs="?", help="bundle directory (default: the demo bundle)")
    parser.add_argument("--busy", type=int, default=1, help="cores kept busy in the contended situation (default 1)")
    parser.add_argument("--questions", type=int, default=12, help="questions per setting and situation")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of alternated settings per situation")
    parser.add_argument("--image-side", type=int, help="resize images to this side (default: the scenes' own)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.bundle is None:
        from edgevlm.demo import demo_bundle

        args.bundle = demo_bundle()[0]
    cores = probe_host().physical_cores
    settings = {"cpu profile": {}, "1 thread": {"n_threads": 1}, f"{cores} threads": {"n_threads": cores}}
    models = {name: edgevlm.load(args.bundle, profile="cpu", **kwargs) for name, kwargs in settings.items()}
    questions = []
    for i in range(args.questions):
        s = scene(i, "test")
        image = s.image if args.image_side is None else s.image.resize((args.image_side, args.image_side))
        questions.append((s.question, image))
    for vlm in models.values():  # warm-up
        measure(vlm, questions[:2], args.max_new_tokens)

    situations = {"idle": 0, f"{args.busy} core(s) busy": args.busy}
    results: dict = {}
    for situation, n_busy in situations.items():
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(n_busy)]
        for spinner in spinners:
            spinner.start()
        time.sleep(1.0 if spinners else 0.0)
        runs: dict[str, dict[str, list]] = {name: {} for name in models}
        try:
            for _ in range(args.rounds):
                for name, vlm in models.items():
                    for key, values in measure(vlm, questions, args.max_new_tokens).items():
                        runs[name].setdefault(key, []).extend(values)
        finally:
            for spinner in spinners:
                spinner.terminate()
                spinner.join()
        medians = {name: {key: statistics.median(values) for key, values in run.items()} for name, run in runs.items()}
        best = min((name for name in medians if name != "cpu profile"), key=lambda name: medians[name]["latency_s"])
        results[situation] = {
            "median": medians, "best_fixed": best,
            "profile_vs_best_latency": medians["cpu profile"]["latency_s"] / medians[best]["latency_s"],
        }  # fmt: skip
        print(f"{situation}: best fixed {best}; cpu profile at {results[situation]['profile_vs_best_latency']:.2f}x its latency")  # fmt: skip
        for name, row in medians.items():
            print(f"  {name:<12} latency {row['latency_s'] * 1000:8.1f} ms  first token {row['time_to_first_token_s'] * 1000:8.1f} ms"
                  f"  decode {row['decode_tokens_per_s']:6.1f} tok/s  llama.cpp threads {row['n_threads']:.0f}")  # fmt: skip
    report = {"bundle": str(args.bundle), "edgevlm_revision": edgevlm_revision(), "host": host_record(),
              "questions": args.questions, "rounds": args.rounds,
              "image_side": args.image_side, "max_new_tokens": args.max_new_tokens, "situations": results}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
