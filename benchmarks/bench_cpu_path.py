"""The CPU path against transformers, on the same model, image and prompt: the ratios issue #8 sets as targets.

    python benchmarks/bench_cpu_path.py /work/bench/qwen2-vl-2b-random /work/bench/qwen2-vl-2b-Q4_K_M \
        --json benchmarks/results/cpu-path-qwen2-vl-2b.json

Each side runs in its own process, one after the other, with the same thread count (so neither competes with the
other and each peak RSS is its own):
1. transformers, fp32 (the whole model upcast): the vision tower's time on a 448x448 image, and the time to first
   token of `generate` (processor included) for one short prompt about it; the tower's embeddings are kept.
2. edgevlm, the bundle loaded with `--profile` (default `cpu`): the same image and prompt, the vision time, the time
   to first token, the embeddings' cosine to transformers' fp32 ones, and a 4032x3024 JPEG photo at the profile's
   default budget.
3. `edgevlm run` as a user runs it, for its peak RSS, against GGUF + loaded vision file + 600 MB.
4. `edgevlm bench --image-tokens 256` for the decode speed against plain llama-cpp-python on the same GGUF.
Medians of `--runs` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export_run import edgevlm_revision, run_child

PROMPT = "Describe this picture in detail."
IMAGE_SIZE = 448  # 256 image tokens for Qwen2-VL
PHOTO_SIZE = (4032, 3024)  # a 12-megapixel phone photo
WORKER = "--worker"


def photo(width: int, height: int):
    """A photo-like 12 MP image (smooth gradients, shapes and sensor noise) that compresses like a real JPEG."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 80 * yy / height, 140 + 60 * yy / height, 220 - 40 * xx / width], axis=-1)
    image = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(50, 600)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    image = image.filter(ImageFilter.GaussianBlur(3))
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def timed(fn, runs: int) -> tuple[list[float], object]:
    """Seconds of `runs` calls of `fn` after one warm-up call, and the last result."""
    result = fn()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return seconds, result


def transformers_worker(model_dir: str, image: str, threads: str, runs: str, embeds_out: str) -> dict:
    import torch

    from edgevlm.exporters.qwen2_vl import FAMILY, find_visual

    torch.set_num_threads(int(threads))
    loaded = FAMILY.load(Path(model_dir))
    model = loaded.model.to(torch.float32)
    visual = find_visual(model)
    inputs = FAMILY.reference_inputs(loaded, PROMPT, [image])
    with torch.no_grad():
        vision_s, embeds = timed(lambda: visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output, int(runs))  # fmt: skip

        def first_token():
            fresh = FAMILY.reference_inputs(loaded, PROMPT, [image])  # the processor is part of the wait
            return model.generate(**fresh, max_new_tokens=1, do_sample=False)

        ttft_s, _ = timed(first_token, int(runs))
    np.save(embeds_out, embeds.float().numpy())
    return {"vision_s": vision_s, "ttft_s": ttft_s, "n_image_tokens": int(embeds.shape[0])}


def edgevlm_worker(bundle: str, image: str, photo_path: str, profile: str, runs: str, torch_embeds: str) -> dict:
    import edgevlm
    from edgevlm.images import load_image, preprocess

    vlm = edgevlm.load(bundle, profile=profile)
    result: dict = {"vision_dtype": vlm.vision_dtype, "vision_providers": vlm.vision.providers}
    for name, path in (("image", image), ("photo", photo_path)):
        timings = []
        for _ in range(1 + int(runs)):
            vlm.clear_caches()  # every run cold: no KV prefix or embedding reused from the previous one
            *_, last = vlm.generate(PROMPT, [path], max_new_tokens=1)
            timings.append(last.timings)
        result[name] = {
            "vision_s": [t.vision_ms / 1000 for t in timings[1:]],
            "ttft_s": [t.time_to_first_token_ms / 1000 for t in timings[1:]],
            "preprocess_s": [t.preprocess_ms / 1000 for t in timings[1:]],
            "n_image_tokens": timings[-1].n_image_tokens,
        }
    prepared = preprocess(load_image(image), vlm.preprocessing)  # 448x448 is within every budget: not resized
    ours = vlm.vision.encode(prepared.pixel_patches, prepared.grid)
    theirs = np.load(torch_embeds)
    cosine = np.sum(ours * theirs, -1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    result["embedding_cosine_to_transformers_fp32"] = {"mean": float(cosine.mean()), "min": float(cosine.min())}
    result["loaded_vision_file"] = vlm.manifest.vision.variants[vlm.vision_dtype].file
    result["gguf_file"] = vlm.manifest.llm.file
    vlm.close()
    return result


def worker(kind: str, *args: str) -> int:
    result = transformers_worker(*args) if kind == "transformers" else edgevlm_worker(*args)
    print(json.dumps(result))
    return 0


def child_json(args: list[str]) -> tuple[dict, int]:
    run = run_child([sys.executable, __file__, WORKER, *args])
    return json.loads(run.stdout.strip().splitlines()[-1]), run.peak_rss_bytes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER]:
        return worker(*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the Hugging Face model directory the bundle was exported from")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    median = statistics.median
    results: dict = {"model": str(args.model), "bundle": str(args.bundle), "profile": args.profile,
                     "edgevlm_revision": edgevlm_revision(), "cpu_count": os.cpu_count(), "prompt": PROMPT}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        from edgevlm.exporters.verify import sample_image

        image, photo_path, embeds = Path(tmp) / "448.png", Path(tmp) / "photo.jpg", Path(tmp) / "torch.npy"
        sample_image(IMAGE_SIZE, IMAGE_SIZE).save(image)
        photo(*PHOTO_SIZE).save(photo_path, quality=90)
        print("transformers fp32 …", file=sys.stderr, flush=True)
        results["transformers"], results["transformers_peak_rss_bytes"] = child_json(
            ["transformers", str(args.model), str(image), str(args.threads), str(args.runs), str(embeds)]
        )
        print(f"edgevlm, profile {args.profile} …", file=sys.stderr, flush=True)
        results["edgevlm"], _ = child_json(
            ["edgevlm", str(args.bundle), str(image), str(photo_path), args.profile, str(args.runs), str(embeds)]
        )
        print("edgevlm run (peak RSS) …", file=sys.stderr, flush=True)
        edgevlm_cli = str(Path(sys.executable).with_name("edgevlm"))
        run = run_child([edgevlm_cli, "run", str(args.bundle), "--profile", args.profile, "--image", str(image),
                         "-p", PROMPT, "--max-new-tokens", "32"])  # fmt: skip
        results["run_peak_rss_bytes"] = run.peak_rss_bytes
        print("edgevlm bench (decode vs plain llama-cpp-python) …", file=sys.stderr, flush=True)
        bench_json = Path(tmp) / "bench.json"
        run_child([edgevlm_cli, "bench", str(args.bundle), "--profile", args.profile, "--image-tokens", "256",
                   "--runs", str(args.runs), "--json", str(bench_json)])  # fmt: skip
        results["bench"] = json.loads(bench_json.read_text())

    ours, theirs = results["edgevlm"], results["transformers"]
    from edgevlm.exporters.onnx_export import onnx_file_bytes  # graph + its external data; torch-free

    budget_bytes = ((args.bundle / ours["gguf_file"]).stat().st_size
                    + onnx_file_bytes(args.bundle / ours["loaded_vision_file"]) + 600 * 10**6)  # fmt: skip
    baseline = results["bench"]["baseline"]
    checks = [
        (
            "vision encode / transformers fp32 tower",
            median(ours["image"]["vision_s"]) / median(theirs["vision_s"]),
            "<= 0.28",
        ),
        (
            "time to first token / transformers fp32",
            median(ours["image"]["ttft_s"]) / median(theirs["ttft_s"]),
            "<= 0.40",
        ),
        ("decode / plain llama-cpp-python", baseline["decode_ratio"], ">= 0.97"),
        ("edgevlm run peak RSS / (GGUF + vision + 600 MB)", results["run_peak_rss_bytes"] / budget_bytes, "<= 1.00"),
        (
            "4032x3024 photo TTFT / 448x448 TTFT",
            median(ours["photo"]["ttft_s"]) / median(ours["image"]["ttft_s"]),
            "< 2.00",
        ),
    ]
    results["checks"] = [{"what": what, "ratio": ratio, "target": target} for what, ratio, target in checks]
    cosine = ours["embedding_cosine_to_transformers_fp32"]
    lines = [
        (
            f"edgevlm {results['edgevlm_revision']}, {results['cpu_count']} CPUs, profile {args.profile} "
            f"(vision {ours['vision_dtype']}), medians of {args.runs} runs"
        ),
        "",
        f"transformers fp32: vision {median(theirs['vision_s']):.2f} s, TTFT {median(theirs['ttft_s']):.2f} s",
        (
            f"edgevlm: vision {median(ours['image']['vision_s']):.2f} s, TTFT {median(ours['image']['ttft_s']):.2f} s; "
            f"4032x3024 photo: {ours['photo']['n_image_tokens']} image tokens, TTFT {median(ours['photo']['ttft_s']):.2f} s"
        ),
        f"image embeddings vs transformers fp32: cosine mean {cosine['mean']:.5f}, min {cosine['min']:.5f}",
        (
            f"decode {baseline['runtime_decode_tokens_per_s']['median']:.1f} tok/s vs plain llama-cpp-python "
            f"{baseline['plain_llama_decode_tokens_per_s']['median']:.1f} tok/s"
        ),
        f"edgevlm run peak RSS {results['run_peak_rss_bytes'] / 2**30:.2f} GiB, budget {budget_bytes / 2**30:.2f} GiB",
        "",
        "| ratio | measured | target |",
        "|---|---:|---|",
        *(f"| {what} | {ratio:.2f} | {target} |" for what, ratio, target in checks),
    ]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
