"""Cost of a 12-megapixel photo at several token budgets: vision-encode time, time to first token, peak RSS.

    python benchmarks/bench_budget.py /work/bench/qwen2-vl-2b-Q4_K_M --model-dir /work/bench/qwen2-vl-2b-random \
        --max-pixels 12845056 --out /work/bench/budget

One 4032x3024 image (`sample_image`, saved as JPEG) is answered with `max_image_tokens` = each budget (default
64, 256, 1024, 4096). Every budget runs in its own process, which loads the bundle, generates once to warm up, then
times `--runs` more generations of the same photo; its peak RSS is the process's own VmHWM (mmapped weights included; not
ru_maxrss, which Linux carries over from the parent across vfork + exec).
Before a run, the planner's activation estimate plus the weight files is compared with MemAvailable: a budget that
would not fit is reported with its estimates and not run, rather than pushing a shared machine out of memory.

`--max-pixels` and `--model-dir` act on a private overlay of the bundle (symlinks plus an edited manifest): the
first sets the preprocessor's max_pixels (the random 2B model was written with transformers' default, 1280 tokens;
Qwen2-VL-2B-Instruct ships 12845056, 16384 tokens), the second fills in vision-tower sizes that bundles exported
before edgevlm recorded them lack. Writes budget.json, budget.md and budget.png into --out; `--from-json` re-renders
an earlier budget.json with the current estimates without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgevlm.bench import host_record

PHOTO = (4032, 3024)  # width, height: a 12 MP phone/kiosk camera frame
DEFAULT_BUDGETS = (64, 256, 1024, 4096)
PROMPT = "What is written on the sign?"
WORKER = "--budget-worker"
GIB = 2**30
MEMORY_MARGIN = 1 * GIB  # Python, onnxruntime arenas, the decoded photo


def overlay_bundle(bundle: Path, work: Path, max_pixels: int | None, model_dir: Path | None) -> Path:
    """`bundle` itself, or a copy of its manifest with the requested edits next to symlinks of its files."""
    manifest = json.loads((bundle / "edgevlm.json").read_text())
    edits = []
    if max_pixels is not None and manifest["preprocessing"]["max_pixels"] != max_pixels:
        edits.append(f"max_pixels {manifest['preprocessing']['max_pixels']} -> {max_pixels}")
        manifest["preprocessing"]["max_pixels"] = max_pixels
    if model_dir is not None and manifest["vision"].get("embed_dim") is None:
        vision = json.loads((model_dir / "config.json").read_text())["vision_config"]
        for key in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
            manifest["vision"][key] = vision[key]
        edits.append(f"vision tower sizes from {model_dir / 'config.json'}")
    if not edits:
        return bundle
    overlay = work / "bundle"
    overlay.mkdir()
    for file in bundle.iterdir():
        if file.name != "edgevlm.json":
            (overlay / file.name).symlink_to(file.resolve())
    (overlay / "edgevlm.json").write_text(json.dumps(manifest, indent=2))
    print(f"bundle overlay {overlay}: {'; '.join(edits)}", file=sys.stderr)
    return overlay


def plan_for(bundle_path: Path, budget: int | None, vision_dtype: str) -> dict:
    """The planner's view of the photo at `budget` (None: the model's own resize), without loading anything."""
    from edgevlm.budget import BudgetLimits, ImageRequest, plan_images, vision_tower_size
    from edgevlm.bundle import Bundle

    manifest = Bundle.open(bundle_path).manifest
    spec = manifest.preprocessing
    limits = BudgetLimits(max_image_tokens=budget)  # request layer only: the bundle default must not cap the sweep
    plan = plan_images([ImageRequest(*PHOTO)], spec, limits, tower=vision_tower_size(manifest, vision_dtype))
    (span,) = plan.spans
    vision_file = manifest.vision.variants[vision_dtype].file
    weights = sum(f.stat().st_size for f in bundle_path.iterdir() if f.name.startswith((vision_file, manifest.llm.file)))  # fmt: skip
    return {
        "budget": budget, "n_tokens": span.n_tokens, "resized_wh": [span.resized_size[1], span.resized_size[0]],
        "n_patches": span.n_patches, "est_activation_bytes": span.activation_bytes, "est_flops": span.encode_flops,
        "weights_bytes": weights,
    }  # fmt: skip


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM): its own address space only."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_worker(bundle: Path, image: Path, budget: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, WORKER, str(bundle), str(image), str(budget), args.vision_dtype,
           str(args.max_new_tokens), str(args.runs), str(args.threads or 0)]  # fmt: skip
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status = os.waitpid(proc.pid, 0)
        wall_s = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "\n".join(stderr.splitlines()[-20:])
        raise RuntimeError(f"budget {budget}: worker exited with {code} after {wall_s:.0f} s:\n{tail}")
    return json.loads(stdout) | {"wall_s": wall_s}


def budget_worker(bundle: str, image: str, budget: str, vision_dtype: str, max_new_tokens: str, runs: str, threads: str) -> int:  # fmt: skip
    """Child process: load, then generate about the photo 1 + `runs` times (the first is the warm-up); print JSON.

    Only this photo size is ever encoded, as with a camera's frames: onnxruntime then plans memory for that shape
    from the 2nd run on, which doubles the attention buffers (the worst case `edgevlm.budget` estimates).
    """
    import edgevlm

    n_ctx = max(4096, int(budget) + 1024)  # room for the image, the prompt and the answer at any budget
    start = time.perf_counter()
    vlm = edgevlm.load(bundle, n_ctx=n_ctx, vision_dtype=vision_dtype, n_threads=int(threads) or None)
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_bytes()
    runs_out = []
    for _ in range(1 + int(runs)):
        vlm.clear_caches()  # every run cold: no KV prefix or embedding reused from the previous one
        *_, last = vlm.generate(PROMPT, [image], max_new_tokens=int(max_new_tokens), max_image_tokens=int(budget))
        t = last.timings
        runs_out.append({
            "n_image_tokens": t.n_image_tokens, "n_prompt_tokens": t.n_prompt_tokens, "preprocess_ms": t.preprocess_ms,
            "vision_ms": t.vision_ms, "prefill_ms": t.prefill_ms, "ttft_ms": t.time_to_first_token_ms,
            "decode_tokens_per_s": t.decode_tokens_per_s, "loadavg_1min": os.getloadavg()[0],
            "peak_rss_bytes": peak_rss_bytes(),
        })  # fmt: skip
    vlm.close()
    print(json.dumps({"load_s": load_s, "n_ctx": n_ctx, "rss_loaded_bytes": rss_loaded, "warmup": runs_out[0],
                      "runs": runs_out[1:]}))  # fmt: skip
    return 0


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['image']}, `{meta['vision_dtype']}` vision graph, {meta['cpu_count']} CPUs, "
        f"median of {meta['runs']} run(s) after a warm-up run; est. = `edgevlm.budget` estimates; "
        "RSS growth = peak RSS after each run (warm-up first) minus after loading; load = highest 1-min load average "
        f"seen after a timed run (above {os.cpu_count()}: other work shared the CPUs)",
        "",
        "| max_image_tokens | tokens | resized (w x h) | vision s | TTFT s | peak RSS GiB | RSS growth GiB per run | est. activations GiB | est. TFLOP | GFLOP/s | load |",  # fmt: skip
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        budget = "model's own" if row["budget"] is None else str(row["budget"])
        head = (f"| {budget} | {row['n_tokens']} | {row['resized_wh'][0]}x{row['resized_wh'][1]} |")
        est = f" {row['est_activation_bytes'] / GIB:.2f} | {row['est_flops'] / 1e12:.2f} |"
        if "skipped" in row:
            lines.append(f"{head} not run | not run | {row['skipped']} | - |{est} - | - |")
            continue
        growth = " / ".join(f"{g / GIB:.2f}" for g in row["rss_growth_bytes"])
        lines.append(
            f"{head} {row['vision_s']:.2f} | {row['ttft_s']:.2f} | {row['peak_rss_bytes'] / GIB:.2f} | "
            f"{growth} |{est} {row['gflops_per_s']:.0f} | {row['max_loadavg']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["n_tokens"])
    ran = [r for r in rows if "skipped" not in r]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    tokens = [r["n_tokens"] for r in rows]
    ax_time.plot([r["n_tokens"] for r in ran], [r["vision_s"] for r in ran], "o-", label="vision encode (measured)")
    ax_time.plot([r["n_tokens"] for r in ran], [r["ttft_s"] for r in ran], "s-", label="time to first token (measured)")
    if ran:
        rate = statistics.median(r["gflops_per_s"] for r in ran) * 1e9
        ax_time.plot(tokens, [r["est_flops"] / rate for r in rows], "k:", label=f"est. FLOPs at the measured {rate / 1e9:.0f} GFLOP/s")
    ax_mem.plot([r["n_tokens"] for r in ran], [r["peak_rss_bytes"] / GIB for r in ran], "o-", label="peak RSS (measured)")
    ax_mem.plot(tokens, [(r["est_activation_bytes"] + r["weights_bytes"]) / GIB for r in rows], "k:",
                label="est. activations + weight files")  # fmt: skip
    ax_mem.axhline(meta["mem_total_bytes"] / GIB, color="r", lw=0.8, ls="--", label="this machine's RAM")
    for ax, ylabel in ((ax_time, "seconds"), (ax_mem, "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("image tokens (4032x3024 photo)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_time.set_title("time")
    ax_mem.set_title("memory")
    fig.suptitle(f"{Path(meta['bundle']).name}: {meta['vision_dtype']} vision, {meta['cpu_count']} CPUs; dotted: estimates")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER]:
        return budget_worker(*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="directory for budget.json, budget.md, budget.png")
    parser.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="comma-separated max_image_tokens")  # fmt: skip
    parser.add_argument("--max-pixels", type=int, help="override the bundle's preprocessor max_pixels (overlay)")
    parser.add_argument("--model-dir", type=Path, help="model directory whose config.json gives vision tower sizes")
    parser.add_argument("--vision-dtype", default="fp32", choices=["fp32", "fp16", "int8"])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=1, help="timed generations per budget after the warm-up (default: 1)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--from-json", type=Path, help="keep the measurements of an earlier budget.json, recompute "
                        "the estimates and re-render (after changing the estimator; nothing is run)")  # fmt: skip
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    if not (args.bundle / "edgevlm.json").is_file():
        parser.error(f"{args.bundle} is not a bundle (no edgevlm.json)")
    args.out.mkdir(parents=True, exist_ok=True)

    from edgevlm.exporters.verify import sample_image

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = overlay_bundle(args.bundle, work, args.max_pixels, args.model_dir)
        image = work / "photo.jpg"
        sample_image(PHOTO[1], PHOTO[0]).save(image, quality=90)
        rows = [plan_for(bundle, None, args.vision_dtype) | {"skipped": "estimate only"}]
        earlier = {}
        if args.from_json:
            earlier = {row["budget"]: row for row in json.loads(args.from_json.read_text())["rows"]}
            budgets = [b for b in earlier if b is not None]
        for budget in budgets:
            row = plan_for(bundle, budget, args.vision_dtype)
            need = row["est_activation_bytes"] + row["weights_bytes"] + MEMORY_MARGIN
            if "vision_s" in earlier.get(budget, {}):  # measured before: keep it, with the current estimates
                rows.append(earlier[budget] | row | {"gflops_per_s": row["est_flops"] / earlier[budget]["vision_s"] / 1e9})  # fmt: skip
                continue
            if need > available_bytes() or args.from_json:
                row["skipped"] = (f"needs ~{need / GIB:.0f} GiB, {available_bytes() / GIB:.0f} GiB available"
                                  if need > available_bytes() else "not measured in --from-json")  # fmt: skip
                print(f"budget {budget}: {row['n_tokens']} tokens, {row['skipped']}: not run", file=sys.stderr)
                rows.append(row)
                continue
            print(f"budget {budget}: {row['n_tokens']} tokens, running (load {os.getloadavg()[0]:.1f}) …", file=sys.stderr, flush=True)  # fmt: skip
            result = run_worker(bundle, image, budget, args)
            runs = result["runs"]
            if any(r["n_image_tokens"] != row["n_tokens"] for r in runs):
                raise RuntimeError(f"budget {budget}: planned {row['n_tokens']} tokens, generate used {runs[0]['n_image_tokens']}")  # fmt: skip
            vision_s = statistics.median(r["vision_ms"] for r in runs) / 1000
            row.update(
                result=result, vision_s=vision_s, ttft_s=statistics.median(r["ttft_ms"] for r in runs) / 1000,
                peak_rss_bytes=runs[-1]["peak_rss_bytes"],
                rss_growth_bytes=[r["peak_rss_bytes"] - result["rss_loaded_bytes"] for r in [result["warmup"], *runs]],
                gflops_per_s=row["est_flops"] / vision_s / 1e9, max_loadavg=max(r["loadavg_1min"] for r in runs),
            )  # fmt: skip
            rows.append(row)

    meta = {
        "image": f"sample_image {PHOTO[0]}x{PHOTO[1]} (JPEG q90)", "vision_dtype": args.vision_dtype,
        "cpu_count": os.cpu_count(), "host": host_record(), "runs": args.runs, "max_new_tokens": args.max_new_tokens,
        "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "bundle": str(args.bundle),
        "max_pixels": args.max_pixels,
    }  # fmt: skip
    (args.out / "budget.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, meta)
    (args.out / "budget.md").write_text(table + "\n")
    plot(rows, args.out / "budget.png", meta)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
