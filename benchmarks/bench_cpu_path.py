"""The CPU path against transformers, on the same model, image and prompt: the ratios issue #8 sets as targets.

    python benchmarks/bench_cpu_path.py /work/bench/qwen2-vl-2b-random /work/bench/qwen2-vl-2b-Q4_K_M \
        --json benchmarks/results/cpu-path-qwen2-vl-2b.json

Each side loads once in its own process, with the same thread count (each peak RSS is its own), and the two take
turns: every round times transformers, then edgevlm, then transformers again, one at a time, so a machine whose
speed drifts over minutes (a shared host's does) slows both sides of a ratio alike. Each round's ratio puts
edgevlm's time against transformers' time of that round, and the ratios reported are their medians over `--runs`
rounds after one warm-up round.
1. transformers, fp32 (the whole model upcast): the vision tower's time on a 448x448 image, and the time to first
   token of `generate` (processor included) for one short prompt about it; the tower's embeddings are kept.
2. edgevlm, the bundle loaded with `--profile` (default `cpu`): the same image and prompt, the vision time and the
   time to first token with cold caches, then a 4032x3024 JPEG photo at the profile's default budget, and at the
   end the embeddings' cosine to transformers' fp32 ones.
3. `edgevlm run` as a user runs it, for its peak RSS, against GGUF + loaded vision file + 600 MB.
4. `edgevlm bench --image-tokens 256` for the decode speed against plain llama-cpp-python on the same GGUF.
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
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export_run import edgevlm_revision, run_child

from edgevlm.bench import host_record

PROMPT = "Describe this picture in detail."
IMAGE_SIZE = 448  # 256 image tokens for Qwen2-VL
PHOTO_SIZE = (4032, 3024)  # a 12-megapixel phone photo
WORKER = "--worker"
REPLY = "@bench "  # marks the worker's answers on its stdout, whatever else a library prints there
SETTLE_S = 0.5  # between two timings: threads a library leaves spinning after its work go back to sleep


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


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def serve(requests: dict[str, Callable[[], dict]], finish: Callable[[], dict]) -> int:
    """The worker's side of the turns: answer each request named on stdin with one JSON line, then `finish`."""
    print(REPLY + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name == "finish":
            print(REPLY + json.dumps(finish()), flush=True)
            return 0
        print(REPLY + json.dumps(requests[name]()), flush=True)
    return 1


def transformers_worker(model_dir: str, image: str, threads: str, embeds_out: str) -> int:
    import torch

    from edgevlm.exporters.qwen2_vl import FAMILY
    from edgevlm.exporters.qwen_vit import find_visual

    torch.set_num_threads(int(threads))
    loaded = FAMILY.load(Path(model_dir))
    model = loaded.model.to(torch.float32)
    visual = find_visual(model)
    inputs = FAMILY.reference_inputs(loaded, PROMPT, [image])
    embeds = []

    @torch.no_grad()
    def vision() -> dict:
        start = time.perf_counter()
        embeds[:] = [visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output]
        return {"vision_s": time.perf_counter() - start}

    @torch.no_grad()
    def first_token() -> dict:
        def generate():
            fresh = FAMILY.reference_inputs(loaded, PROMPT, [image])  # the processor is part of the wait
            model.generate(**fresh, max_new_tokens=1, do_sample=False)

        return {"ttft_s": seconds(generate)}

    def finish() -> dict:
        np.save(embeds_out, embeds[0].float().numpy())
        return {"n_image_tokens": int(embeds[0].shape[0])}

    return serve({"vision": vision, "ttft": first_token}, finish)


def edgevlm_worker(bundle: str, image: str, photo_path: str, profile: str, torch_embeds: str) -> int:
    import edgevlm
    from edgevlm.contract.kinds.preprocessing import preprocess
    from edgevlm.images import load_image

    vlm = edgevlm.load(bundle, profile=profile)

    def answer(path: str) -> Callable[[], dict]:
        def run() -> dict:
            vlm.clear_caches()  # every run cold: no KV prefix or embedding reused from the previous one
            *_, last = vlm.generate(PROMPT, [path], max_new_tokens=1)
            t = last.timings
            return {"vision_s": t.vision_ms / 1000, "ttft_s": t.time_to_first_token_ms / 1000,
                    "preprocess_s": t.preprocess_ms / 1000, "n_image_tokens": t.n_image_tokens}  # fmt: skip

        return run

    def finish() -> dict:
        prepared = preprocess(load_image(image), vlm.preprocessing)  # 448x448 is within every budget: not resized
        ours = vlm.vision.encode(prepared.pixel_patches, prepared.grid)
        theirs = np.load(torch_embeds)
        cosine = np.sum(ours * theirs, -1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
        result = {
            "vision_dtype": vlm.vision_dtype,
            "vision_providers": vlm.vision.providers,
            "embedding_cosine_to_transformers_fp32": {"mean": float(cosine.mean()), "min": float(cosine.min())},
            "loaded_vision_file": vlm.manifest.vision.variants[vlm.vision_dtype].file,
            "gguf_file": vlm.manifest.llm.file,
        }
        vlm.close()
        return result

    return serve({"image": answer(image), "photo": answer(photo_path)}, finish)


def worker(kind: str, *args: str) -> int:
    return transformers_worker(*args) if kind == "transformers" else edgevlm_worker(*args)


class Side:
    """One side of the comparison: a worker process, loaded once, that times what it is asked, one thing at a time."""

    def __init__(self, *args: str):
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (open while the worker lives; closed in finish)
        self.proc = subprocess.Popen([sys.executable, __file__, WORKER, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True)  # fmt: skip
        self._reply()  # loaded

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        self.stderr.seek(0)
        tail = "\n".join(self.stderr.read().splitlines()[-25:])
        raise RuntimeError(f"benchmark worker {self.proc.args[3]} exited with {self.proc.wait()}; stderr ends:\n{tail}")

    def ask(self, name: str) -> dict:
        time.sleep(SETTLE_S)
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def finish(self) -> tuple[dict, int]:
        """The worker's last answer and its peak RSS in bytes."""
        result = self.ask("finish")
        _, status, usage = os.wait4(self.proc.pid, 0)  # unlike RUSAGE_CHILDREN, the rusage of this child alone
        self.stderr.close()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"benchmark worker {self.proc.args[3]} exited with {os.waitstatus_to_exitcode(status)}")
        return result, usage.ru_maxrss * 1024


def take_turns(theirs: Side, ours: Side, runs: int) -> tuple[dict, dict]:
    """Rounds of transformers' tower, edgevlm's image and photo, transformers' first token; the first is a warm-up.

    Returns each side's times, round by round: transformers' {measure: [s, ...]}, edgevlm's {case: {measure: ...}}.
    """
    theirs_times: dict = {}
    ours_times: dict = {"image": {}, "photo": {}}

    def keep(into: dict, answer: dict) -> None:
        for key, value in answer.items():
            into.setdefault(key, []).append(value)

    for round_ in range(1 + runs):
        vision, image, photo_, first = theirs.ask("vision"), ours.ask("image"), ours.ask("photo"), theirs.ask("ttft")
        if round_ == 0:
            continue
        keep(theirs_times, {**vision, **first})
        keep(ours_times["image"], image)
        keep(ours_times["photo"], photo_)
        print(f"round {round_}: transformers vision {vision['vision_s']:.2f} s, TTFT {first['ttft_s']:.2f} s; "
              f"edgevlm vision {image['vision_s']:.2f} s, TTFT {image['ttft_s']:.2f} s", file=sys.stderr, flush=True)  # fmt: skip
    for case in ours_times.values():
        case["n_image_tokens"] = case["n_image_tokens"][-1]
    return theirs_times, ours_times


def round_ratio(ours: list[float], theirs: list[float]) -> float:
    """The median over rounds of each round's ratio."""
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


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
                     "edgevlm_revision": edgevlm_revision(), "cpu_count": os.cpu_count(), "host": host_record(), "prompt": PROMPT}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        from edgevlm.exporters.verify import sample_image

        image, photo_path, embeds = Path(tmp) / "448.png", Path(tmp) / "photo.jpg", Path(tmp) / "torch.npy"
        sample_image(IMAGE_SIZE, IMAGE_SIZE).save(image)
        photo(*PHOTO_SIZE).save(photo_path, quality=90)
        print(f"transformers fp32 and edgevlm (profile {args.profile}), taking turns …", file=sys.stderr, flush=True)
        theirs_side = Side("transformers", str(args.model), str(image), str(args.threads), str(embeds))
        ours_side = Side("edgevlm", str(args.bundle), str(image), str(photo_path), args.profile, str(embeds))
        results["transformers"], results["edgevlm"] = take_turns(theirs_side, ours_side, args.runs)
        # transformers first: its finish writes the embeddings that edgevlm's finish compares with
        last, results["transformers_peak_rss_bytes"] = theirs_side.finish()
        results["transformers"].update(last)
        last, _ = ours_side.finish()
        results["edgevlm"].update(last)
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
            round_ratio(ours["image"]["vision_s"], theirs["vision_s"]),
            "<= 0.28",
        ),
        (
            "time to first token / transformers fp32",
            round_ratio(ours["image"]["ttft_s"], theirs["ttft_s"]),
            "<= 0.40",
        ),
        ("decode / plain llama-cpp-python", baseline["decode_ratio"], ">= 0.97"),
        ("edgevlm run peak RSS / (GGUF + vision + 600 MB)", results["run_peak_rss_bytes"] / budget_bytes, "<= 1.00"),
        (
            "4032x3024 photo TTFT / 448x448 TTFT",
            round_ratio(ours["photo"]["ttft_s"], ours["image"]["ttft_s"]),
            "< 2.00",
        ),
    ]
    results["checks"] = [{"what": what, "ratio": ratio, "target": target} for what, ratio, target in checks]
    cosine = ours["embedding_cosine_to_transformers_fp32"]
    lines = [
        (
            f"edgevlm {results['edgevlm_revision']}, {results['cpu_count']} CPUs, profile {args.profile} "
            f"(vision {ours['vision_dtype']}), medians of {args.runs} rounds taking turns"
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
