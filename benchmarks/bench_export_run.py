"""Export a Qwen2-VL model directory with `edgevlm export`, then time generation from the bundle per vision dtype.

    python benchmarks/bench_export_run.py /work/bench/qwen2-vl-2b-random --bundle /work/bench/qwen2-vl-2b-Q4_K_M \
        --json /work/bench/results-2b.json

Every measured step runs in its own process, so each peak RSS is that process's own (`wait4`'s ru_maxrss; it
includes resident pages of mmapped weights). The export is `edgevlm -v export DIR -o BUNDLE --int4 --vision-dtype
fp32 --vision-dtype int8 --force`; its stage durations are read from the log. Each vision dtype then gets one
process that loads the bundle (timed once), generates once to warm up, and generates `--runs` more times from one
448x448 image; the table shows the medians of those runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgevlm.bench import host_record

VISION_DTYPES = ("fp32", "int8")
EXPORT_FLAGS = ["--int4", "--vision-dtype", "fp32", "--vision-dtype", "int8", "--force"]
IMAGE_SIZE = 448  # a 448x448 image is a 32x32 patch grid: 256 image tokens for Qwen2-VL
PROMPT = "Describe this picture in detail."
WORKER = "--generate-worker"  # first argument of the per-configuration child process
TIMING_FIELDS = ("preprocess_ms", "vision_ms", "prefill_ms", "image_prefill_ms", "time_to_first_token_ms", "decode_tokens_per_s")  # fmt: skip
STAGE_RE = re.compile(r"edgevlm\.progress: (.+): done in ([\d.]+) s")


@dataclass(frozen=True)
class ChildRun:
    wall_s: float
    peak_rss_bytes: int
    stdout: str
    stderr: str


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> ChildRun:
    """Run `cmd` (in `env`, default this process's environment) to the end; its wall time, its own peak RSS and its
    output. A failure raises with its stderr tail."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # unlike RUSAGE_CHILDREN, the rusage of this child alone
        wall_s = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # negative: killed by that signal (e.g. -11, -9)
        out.seek(0)
        err.seek(0)
        result = ChildRun(wall_s, usage.ru_maxrss * 1024, out.read(), err.read())  # ru_maxrss is in KiB
    if proc.returncode != 0:
        tail = "\n".join(result.stderr.splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode} after {wall_s:.0f} s; stderr ends:\n{tail}")
    return result


def edgevlm_revision() -> str:
    """The git commit of the edgevlm checkout being measured, "+dirty" when its package files differ from it."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:  # empty when this is not a git checkout: the revision is then "unknown"
        return subprocess.run(
            ["git", "-C", str(repo), *args], check=False, capture_output=True, text=True
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "edgevlm") else "")


def export_bundle(model_dir: Path, bundle: Path) -> dict:
    edgevlm = Path(sys.executable).with_name("edgevlm")
    run = run_child([str(edgevlm), "-v", "export", str(model_dir), "-o", str(bundle), *EXPORT_FLAGS])
    return {
        "command": f"edgevlm export {model_dir} -o {bundle} {' '.join(EXPORT_FLAGS)}",
        "wall_s": run.wall_s,
        "peak_rss_bytes": run.peak_rss_bytes,
        "stages_s": {m.group(1): float(m.group(2)) for m in STAGE_RE.finditer(run.stderr)},
    }


def bundle_files(bundle: Path) -> dict[str, int]:
    return {str(f.relative_to(bundle)): f.stat().st_size for f in sorted(bundle.rglob("*")) if f.is_file()}


def measure_generation(bundle: Path, vision_dtype: str, image: Path, max_new_tokens: int, runs: int) -> dict:
    cmd = [sys.executable, __file__, WORKER, str(bundle), vision_dtype, str(image), str(max_new_tokens), str(runs)]
    run = run_child(cmd)
    result = json.loads(run.stdout)
    result["medians"] = {k: statistics.median(r[k] for r in result["runs"]) for k in TIMING_FIELDS}
    result["peak_rss_bytes"] = run.peak_rss_bytes
    return result


class OtherProcessesCPU:
    """The share of all CPUs that other processes used since creation (Linux): llama.cpp's threads wait for each
    other at every op, so a busy neighbour on one core slows a 2-thread decode many times over, not by half."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:  # first line: cpu user nice system idle iowait irq softirq steal ...
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        own = os.times()
        busy_s = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        return time.perf_counter(), busy_s, own.user + own.system

    def share(self) -> float:
        (wall0, busy0, own0), (wall1, busy1, own1) = self.start, self._sample()
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * (os.cpu_count() or 1))


def generate_worker(bundle: str, vision_dtype: str, image: str, max_new_tokens: str, runs: str) -> int:
    """Child process: load once, warm up once, then print the timings of `runs` generations as JSON."""
    import edgevlm

    start = time.perf_counter()
    vlm = edgevlm.load(bundle, vision_dtype=vision_dtype)
    load_s = time.perf_counter() - start
    measured = []
    for _ in range(1 + int(runs)):  # the first generation is the warm-up
        others = OtherProcessesCPU()
        vlm.clear_caches()  # every run cold: no KV prefix or embedding reused from the previous one
        *_, last = vlm.generate(PROMPT, images=[image], max_new_tokens=int(max_new_tokens))
        timings = last.timings
        measured.append(
            {k: getattr(timings, k) for k in TIMING_FIELDS}
            | {"n_prompt_tokens": timings.n_prompt_tokens, "n_image_tokens": timings.n_image_tokens,
               "n_generated": timings.n_generated, "finish_reason": last.finish_reason,
               "others_cpu_share": others.share()}
        )  # fmt: skip
    vlm.close()
    print(json.dumps({"vision_dtype": vision_dtype, "load_s": load_s, "warmup": measured[0], "runs": measured[1:]}))
    return 0


def markdown(results: dict) -> str:
    gib = 2**30
    export = results.get("export")
    lines = [f"edgevlm {results['edgevlm_revision']}, {results['cpu_count']} CPUs", ""]
    if export:
        lines += [
            f"export: {export['wall_s']:.0f} s wall, peak RSS {export['peak_rss_bytes'] / gib:.2f} GiB",
            *(f"- {stage}: {seconds:.1f} s" for stage, seconds in export["stages_s"].items()),
            "",
        ]
    lines += ["| file | MB |", "|---|---:|"]
    lines += [f"| {name} | {size / 1e6:.1f} |" for name, size in results["bundle_files"].items()]
    lines += [
        "",
        f"{results['image']}, {results['max_new_tokens']} new tokens, median of {results['runs']} runs after 1 warm-up:",
        "",
        "| vision | load s | vision ms | prefill ms | TTFT ms | decode tok/s | tokens | peak RSS GiB | others' CPU % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in results["generation"]:
        m = config["medians"]
        generated = sorted({r["n_generated"] for r in config["runs"]})
        lines.append(
            f"| {config['vision_dtype']} | {config['load_s']:.2f} | {m['vision_ms']:.0f} | {m['prefill_ms']:.0f} | "
            f"{m['time_to_first_token_ms']:.0f} | {m['decode_tokens_per_s']:.2f} | "
            f"{'/'.join(map(str, generated))} | {config['peak_rss_bytes'] / gib:.2f} | "
            f"{100 * max(r['others_cpu_share'] for r in config['runs']):.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER]:
        return generate_worker(*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="Qwen2-VL model directory to export")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory to write (replaced)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--skip-export", action="store_true", help="measure the existing --bundle, do not export")
    parser.add_argument("--runs", type=int, default=3, help="measured generations per vision dtype (default: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} has no config.json; pass a Hugging Face model directory")
    if args.skip_export and not (args.bundle / "edgevlm.json").is_file():
        parser.error(f"--skip-export: {args.bundle} is not a bundle (no edgevlm.json)")
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")

    results: dict = {
        "model": str(args.model), "bundle": str(args.bundle), "edgevlm_revision": edgevlm_revision(),
        "cpu_count": os.cpu_count(), "host": host_record(),
    }  # fmt: skip
    if not args.skip_export:
        print(f"exporting {args.model} …", file=sys.stderr, flush=True)
        results["export"] = export_bundle(args.model, args.bundle)
    results["bundle_files"] = bundle_files(args.bundle)
    results.update(image=f"sample_image({IMAGE_SIZE}, {IMAGE_SIZE})", prompt=PROMPT, runs=args.runs,
                   max_new_tokens=args.max_new_tokens)  # fmt: skip

    from edgevlm.exporters.verify import sample_image

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "sample-448.png"
        sample_image(IMAGE_SIZE, IMAGE_SIZE).save(image)
        results["generation"] = []
        for vision_dtype in VISION_DTYPES:
            print(f"generating with the {vision_dtype} vision encoder …", file=sys.stderr, flush=True)
            results["generation"].append(measure_generation(args.bundle, vision_dtype, image, args.max_new_tokens, args.runs))  # fmt: skip

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
