"""Resident memory of a GGUF loaded with and without llama.cpp's weight repacking, mapped or read.

    python benchmarks/bench_repack_rss.py BUNDLE/llm-Q4_K_M.gguf --json benchmarks/results/repack-rss-qwen2-vl-2b.json

Where the CPU has no AMX, llama.cpp repacks Q4_K weights into its CPU_REPACK buffer for its SIMD kernels. With the
file mapped, the pages those weights were read from stay resident next to the repacked copy; reading the file does
not keep them, which is why the runtime reads the GGUF where it repacks (`LlamaSettings.mmap` unset). Each setting
loads the GGUF in a fresh process (plain llama-cpp-python `Llama`, text only), decodes a short prompt and reports its
peak and final RSS, its load time and its decode speed; settings alternate over `--rounds` rounds.

On AMX hosts llama.cpp's extra buffers include its AMX kernels, which crash in this build (README, Known limits), so
only the no-repack row is measured there, unless llama.cpp's CPU backend is one built for AVX2 only: build
`ggml-cpu` from the llama.cpp in llama-cpp-python's sdist with `-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF ...`, copy the wheel's `llama_cpp/lib` to a
folder with that `libggml-cpu.so*` in place of its own, and run with `LLAMA_CPP_LIB_PATH=FOLDER`
(`benchmarks/results/repack-rss-qwen2-vl-2b-avx2-llama.json` was measured so).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgevlm.bench import host_record, peak_rss_bytes

# (repack, mmap): what the runtime loads where it repacks, the alternative, and no repacking (what AMX hosts load)
SETTINGS = {"repack, mapped (today)": (True, True), "repack, read": (True, False), "no repack, mapped": (False, True)}
PROMPT = "Describe a robot that sorts apples in a warehouse, in detail."


def child(gguf: str, repack: bool, mmap: bool, threads: int) -> dict:
    from edgevlm.runtimes.llm import plain_llama

    t0 = time.perf_counter()
    llm = plain_llama(gguf, repack_weights=repack, use_mmap=mmap, n_ctx=512, n_threads=threads, verbose=False)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = llm(PROMPT, max_tokens=32, temperature=0.0)
    gen_s = time.perf_counter() - t1
    rss = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
    peak = peak_rss_bytes()
    return {"load_s": load_s, "tokens_per_s": out["usage"]["completion_tokens"] / gen_s, "rss_bytes": rss, "peak_rss_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        repack, mmap = (value == "1" for value in args.child)
        print(json.dumps(child(str(args.gguf), repack, mmap, args.threads)))
        return 0
    from edgevlm.llama_backend import cpu_has_amx

    settings = {name: value for name, value in SETTINGS.items() if not (value[0] and cpu_has_amx())}
    if len(settings) < len(SETTINGS):
        print("this CPU has AMX: llama.cpp's extra buffers crash here, so the repacking rows are not measured", file=sys.stderr)  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, (repack, mmap) in settings.items():
            cmd = [sys.executable, __file__, str(args.gguf), "--threads", str(args.threads), "--child", str(int(repack)), str(int(mmap))]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1], file=sys.stderr)
    gib = 2**30
    summary = {
        name: {key: statistics.median(run[key] for run in measured) for key in measured[0]}
        for name, measured in runs.items()
    }
    report = {"gguf": str(args.gguf), "gguf_bytes": args.gguf.stat().st_size, "host": host_record(),
              "threads": args.threads, "rounds": args.rounds, "median": summary, "runs": runs}  # fmt: skip
    print(f"{args.gguf.name}: {args.gguf.stat().st_size / gib:.2f} GiB; medians of {args.rounds} alternated rounds")
    for name, row in summary.items():
        print(f"  {name:<22} peak RSS {row['peak_rss_bytes'] / gib:.2f} GiB, after decode {row['rss_bytes'] / gib:.2f} GiB, "
              f"load {row['load_s']:.1f} s, decode {row['tokens_per_s']:.1f} tok/s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
