"""The whole edgevlm pipeline offline, on a tiny Qwen2-VL built on this machine (`make demo`).

1. build a tiny Qwen2-VL model directory (random weights, the real Qwen2 tokenizer) — the stand-in for a hub model;
2. `edgevlm export` it to a bundle: ONNX vision encoder + Q4_K_M GGUF language model;
3. load the bundle with the device runtime (no torch) and stream an answer about a freshly drawn image.

The weights are random, so the answer is noise: this shows the mechanics and the timings, not understanding.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "demo"


def draw_scene(path: Path) -> Path:
    image = Image.new("RGB", (448, 336), (235, 235, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 90, 180, 210), fill=(200, 30, 30))
    draw.rectangle((260, 120, 380, 240), fill=(30, 60, 200))
    image.save(path)
    return path


def main() -> int:
    from edgevlm.exporters import export
    from edgevlm.exporters.synthetic import build_qwen2_vl

    CACHE.mkdir(parents=True, exist_ok=True)
    model_dir, bundle_dir = CACHE / "tiny-qwen2-vl", CACHE / "tiny-qwen2-vl-Q4_K_M"
    if not (model_dir / "config.json").is_file():
        print(f"building a tiny Qwen2-VL model in {model_dir} …", flush=True)
        build_qwen2_vl(model_dir)
    if not (bundle_dir / "edgevlm.json").is_file():
        print(f"exporting it to {bundle_dir} (vision → ONNX, LLM → Q4_K_M GGUF) …", flush=True)
        export(str(model_dir), bundle_dir, quantization="Q4_K_M", vision_dtypes=("fp32", "int8"), force=True)

    import edgevlm

    image = draw_scene(CACHE / "scene.png")
    prompt = "What shapes are in this picture?"
    t0 = time.perf_counter()
    vlm = edgevlm.load(bundle_dir, n_ctx=2048)
    load_s = time.perf_counter() - t0
    print(f"\nimage:    {image}\nquestion: {prompt}\nanswer:   ", end="", flush=True)
    last = None
    for step in vlm.generate(prompt, images=[image], max_new_tokens=24):
        print(step.text, end="", flush=True)
        last = step
    t = last.timings
    print(
        f"\n\n(random weights: the answer is noise)\n"
        f"load {load_s:.2f} s · {t.n_image_tokens} image tokens · vision {t.vision_ms:.0f} ms · "
        f"first token {t.time_to_first_token_ms:.0f} ms · decode {t.decode_tokens_per_s:.1f} tok/s"
    )
    vlm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
