"""The demo VLM that ships with edgevlm: a tiny Qwen2-VL trained on synthetic scenes (`edgevlm demo`).

The checkpoint (`model/`, Hugging Face format) is exported like any model (`edgevlm export demo`); `run_demo`
exports it once into a cache directory, draws a fresh scene, asks the bundle a question about it and returns the
answer next to the expected one. Drawing and answering need no torch; the one-time export does.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ..integrity import cache_dir
from .scenes import Scene, scene

MODEL_DIR = Path(__file__).resolve().parent / "model"
DEMO_VISION_DTYPES = ("fp32", "int8")


@dataclass(frozen=True)
class DemoResult:
    bundle: Path
    image_path: Path
    question: str
    expected: str
    answer: str
    export_s: float  # 0 when the bundle was already in the cache
    load_s: float
    timings: object  # the last step's `Timings` from the runtime


def demo_bundle(quantization: str = "Q4_K_M", cache: Path | None = None) -> tuple[Path, float]:
    """The demo model's bundle in `quantization` (fp32 and int8 vision), exported on first use: (path, export s).

    The directory name carries a digest of the checkpoint, so a new edgevlm version with a retrained model exports
    again instead of reusing a stale bundle.
    """
    bundle = demo_bundle_path(quantization, cache)
    if (bundle / "edgevlm.json").is_file():
        return bundle, 0.0
    try:
        import torch  # noqa: F401  (only to fail early with the install command)
    except ImportError as e:
        raise ImportError(
            f"the demo bundle is not in {bundle.parent} yet and exporting it needs torch: "
            "pip install 'edgevlm[export]' (once; later runs need only the runtime)"
        ) from e
    from ..exporters import export

    start = time.perf_counter()
    export("demo", bundle, quantization=quantization, vision_dtypes=DEMO_VISION_DTYPES, force=True)
    return bundle, time.perf_counter() - start


def demo_bundle_path(quantization: str = "Q4_K_M", cache: Path | None = None) -> Path:
    """Where `demo_bundle` keeps the demo bundle in `quantization` (exported there or not)."""
    return (cache or cache_dir()) / f"demo-{quantization}-{_checkpoint_digest()}"


def ask(vlm, demo_scene: Scene, max_new_tokens: int = 8):
    """The bundle's greedy answer to the scene's question (stripped), and the last step's timings."""
    text, last = "", None
    for step in vlm.generate(demo_scene.question, images=[demo_scene.image], max_tokens=max_new_tokens):
        text += step.text
        last = step
    return text.strip(), (last.timings if last is not None else None)


def run_demo(
    quantization: str = "Q4_K_M",
    *,
    seed: int | None = None,
    question_type: str | None = None,
    vision_dtype: str | None = None,
    cache: Path | None = None,
    profile: str = "auto",
) -> DemoResult:
    """Export the demo model if needed, draw scene `seed` (random if None), ask its question, return the answer
    (with hardware profile `profile`, see `edgevlm.load`)."""
    import edgevlm

    cache = cache or cache_dir()
    seed = secrets.randbelow(2**31) if seed is None else seed
    demo_scene = scene(seed, "demo", question_type)  # checks question_type before any export
    bundle, export_s = demo_bundle(quantization, cache)
    image_path = cache / "scenes" / f"scene-{seed}.png"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    demo_scene.image.save(image_path)

    start = time.perf_counter()
    vlm = edgevlm.load(bundle, profile, n_ctx=512, vision_dtype=vision_dtype)
    load_s = time.perf_counter() - start
    try:
        answer, timings = ask(vlm, demo_scene)
    finally:
        vlm.close()
    return DemoResult(bundle, image_path, demo_scene.question, demo_scene.answer, answer, export_s, load_s, timings)


def _checkpoint_digest() -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        digest.update((MODEL_DIR / name).read_bytes())
    return digest.hexdigest()[:10]
