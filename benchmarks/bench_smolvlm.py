"""SmolVLM2-256M-shaped model (random weights): export, bundle sizes, edgevlm's generation with the `cpu` profile on a
448x448 image and a 4032x3024 photo, and llama.cpp's own multimodal path (mtmd) on the same GGUF and images.

    python benchmarks/bench_smolvlm.py /work/bench/smolvlm2-256m --json benchmarks/results/smolvlm2-256m.json

No hub here, so the model is built from a config written from SmolVLM2-256M-Video-Instruct's published one
(assumptions, from memory of it): SigLIP-B/16 at 512 px (hidden 768, 12 layers, 12 heads, MLP 3072; ~93M), pixel
shuffle 4 (64 tokens per 512 px view) and a bias-free projection to SmolLM2-135M (hidden 576, 30 layers, 9 heads,
3 KV heads, MLP 1536, vocab 49280, rope theta 100000, tied embeddings); the processor resizes the longest edge to 2048
and cuts 512 px tiles. Weights are random (bf16 on disk, as published) and the tokenizer is the tiny byte-level BPE
of the test model padded to the vocabulary: timings and sizes are the real model's, the text is noise.

The bundle is `edgevlm export DIR -o BUNDLE --int8` (Q8_0: SmolLM2's 576-wide rows are not multiples of 256, so
K-quants would fall back). edgevlm runs twice per image, int8 vision graph: with the `cpu` profile (the processor's
own grid: up to 4 x 4 tiles and the global view, 1088 tokens) and with `cpu-lowmem` (at most 4 tiles).
mtmd runs `convert_hf_to_gguf.py --mmproj` (F16) and llama-cpp-python's `MTMDChatHandler` over
the bundle's own GGUF, with its own tiling of the image (its token count is not reported). Each side: one process per image, 1 warm-up + `--runs`. The model is built in a
child process so that no measured child inherits its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench_export_run import bundle_files, edgevlm_revision, measure_generation, run_child
from bench_mtmd_peer import make_mmproj, measure_peer

from edgevlm.bench import host_record

BUILD_WORKER = "--build-worker"  # first argument of the child process that builds the model
LLAMA_CPP = Path("/work/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp")
IMAGES = {"448x448": (448, 448), "4032x3024 photo": (3024, 4032)}  # (height, width)
VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "image_size": 512, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}  # fmt: skip
TEXT = {"vocab_size": 49280, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "tie_word_embeddings": True}  # fmt: skip


def build_model(out_dir: Path) -> dict:
    """The SmolVLM2-256M-shaped model directory (see the module docstring), built in a child process: Linux children
    inherit their parent's peak RSS across fork + exec, so a parent that held the model would inflate every measured
    child's. Returns its parameter counts."""
    return json.loads(run_child([sys.executable, __file__, BUILD_WORKER, str(out_dir)]).stdout)


def build_worker(out_dir: str) -> int:
    print(json.dumps(build_in_process(Path(out_dir))))
    return 0


def build_in_process(out_dir: Path) -> dict:
    import torch
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil
    from transformers.models.smolvlm import SmolVLMVisionConfig

    from edgevlm.exporters.smolvlm.synthetic import SMOLVLM_CHAT_TEMPLATE, write_smolvlm_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = write_smolvlm_tokenizer(out_dir)
    text = LlamaConfig(**TEXT, bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<|im_end|>"])  # fmt: skip
    config = SmolVLMConfig(vision_config=SmolVLMVisionConfig(**VISION), text_config=text, scale_factor=4,
                           image_token_id=ids["<image>"], tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(config).eval().to(torch.bfloat16)
    model.save_pretrained(out_dir)
    SmolVLMImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}).save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(SMOLVLM_CHAT_TEMPLATE)
    parts = {"vision_params": model.model.vision_model, "connector_params": model.model.connector,
             "text_params": model.model.text_model, "total_params": model}  # fmt: skip
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}


def export(model_dir: Path, bundle: Path) -> dict:
    edgevlm = Path(sys.executable).with_name("edgevlm")
    flags = ["--int8", "--force"]
    run = run_child([str(edgevlm), "export", str(model_dir), "-o", str(bundle), *flags])
    return {"command": f"edgevlm export {model_dir} -o {bundle} {' '.join(flags)}", "wall_s": run.wall_s,
            "peak_rss_bytes": run.peak_rss_bytes}  # fmt: skip


def medians(runs: list[dict], fields: tuple[str, ...]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in fields if all(k in r for r in runs)}


def markdown(results: dict) -> str:
    gib = 2**30
    export, mmproj = results["export"], results["mmproj"]
    lines = [(f"edgevlm {results['edgevlm_revision']} on {results['host'].get('cpu_model')}, {results['cpu_count']} CPUs; "
              f"{results['max_new_tokens']} new tokens, median of {results['runs']} runs after 1 warm-up"), "",
             (f"export: {export['wall_s']:.0f} s, peak RSS {export['peak_rss_bytes'] / gib:.2f} GiB; "
              f"mmproj (llama.cpp converter, F16): {mmproj['bytes'] / 1e6:.0f} MB in {mmproj['wall_s']:.0f} s"), "",
             "| file | MB |", "|---|---:|"]  # fmt: skip
    lines += [f"| {name} | {size / 1e6:.1f} |" for name, size in results["bundle_files"].items()]
    lines += ["", "| image | side | image tokens | vision ms | prefill ms | TTFT ms | decode tok/s | peak RSS GiB |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, sides in results["images"].items():  # mtmd's own tiling: its token count is not reported
        for side in sides:
            m, tokens = sides[side]["medians"], sides[side].get("n_image_tokens", "?")
            prefill = m.get("prefill_ms", m.get("image_prefill_ms", float("nan")))
            lines.append(f"| {label} | {side} | {tokens} | {m['vision_ms']:.0f} | {prefill:.0f} | "
                         f"{m['time_to_first_token_ms']:.0f} | {m['decode_tokens_per_s']:.1f} | {sides[side]['peak_rss_bytes'] / gib:.2f} |")  # fmt: skip
    return "\n".join(lines)


def write_image(height: int, width: int, path: Path) -> Path:
    """`sample_image` saved by a child process: a 4032x3024 one would raise this process's peak RSS, which every
    measured child inherits."""
    code = f"from edgevlm.exporters.verify import sample_image; sample_image({height}, {width}).save({str(path)!r})"
    run_child([sys.executable, "-c", code])
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [BUILD_WORKER]:
        return build_worker(*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, help="where the model directory and the bundle go (reused if there)")
    parser.add_argument("--runs", type=int, default=1, help="measured generations per process (default: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    model_dir, bundle = args.workdir / "smolvlm2-256m-random", args.workdir / "smolvlm2-256m-Q8_0"
    results: dict = {"edgevlm_revision": edgevlm_revision(), "host": host_record(), "cpu_count": os.cpu_count(),
                     "runs": args.runs, "max_new_tokens": args.max_new_tokens, "profile": "cpu"}  # fmt: skip
    print("building the model …", file=sys.stderr, flush=True)
    results["model"] = build_model(model_dir)
    print("exporting …", file=sys.stderr, flush=True)
    results["export"] = export(model_dir, bundle)
    results["bundle_files"] = bundle_files(bundle)
    (gguf,) = [bundle / name for name in json.loads((bundle / "edgevlm.json").read_text())["files"] if name.endswith(".gguf")]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("converting the mmproj with llama.cpp's converter …", file=sys.stderr, flush=True)
        mmproj = work / "mmproj-f16.gguf"
        results["mmproj"] = make_mmproj(LLAMA_CPP, model_dir, mmproj)
        results["images"] = {}
        for label, (height, width) in IMAGES.items():
            image = write_image(height, width, work / f"{width}x{height}.png")
            sides = {}
            for side, profile in (("edgevlm cpu", "cpu"), ("edgevlm cpu-lowmem", "cpu-lowmem")):
                print(f"{label}: {side} …", file=sys.stderr, flush=True)
                os.environ["EDGEVLM_PROFILE"] = profile  # what `auto` means for the generation child
                sides[side] = measure_generation(bundle, "int8", image, args.max_new_tokens, args.runs)
                sides[side]["n_image_tokens"] = sides[side]["runs"][0]["n_image_tokens"]
            print(f"{label}: mtmd …", file=sys.stderr, flush=True)
            peer = measure_peer(gguf, mmproj, image, args.max_new_tokens, args.runs)
            peer["medians"] = medians(peer["runs"], ("vision_ms", "image_prefill_ms", "time_to_first_token_ms", "decode_tokens_per_s"))  # fmt: skip
            results["images"][label] = {**sides, "mtmd": peer}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
