"""End-to-end checks of a bundle against transformers on the same weights: logits at every prompt position and
greedy continuations, for one image, two images of different sizes, and text only."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..bundle import Bundle
from ..errors import ExportValidationError

if TYPE_CHECKING:
    from .family import Family, Loaded

logger = logging.getLogger(__name__)

# Largest allowed difference of logits for unquantized LLM weights. F32: llama.cpp and PyTorch differ only by
# summation order (measured ~1e-3 on random tiny models); F16 rounds weights to 11 bits of mantissa.
LOGIT_ATOL = {"F32": 0.02, "F16": 0.1}


def sample_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A deterministic test image: colour gradients plus noise, so a wrong resize or patch order shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], axis=-1)
    noise = rng.integers(-40, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


@dataclass(frozen=True)
class ParityCase:
    name: str
    prompt: str
    image_sizes: tuple[tuple[int, int], ...]  # (height, width) of each image

    def images(self) -> list[Image.Image]:
        return [sample_image(h, w, seed=i) for i, (h, w) in enumerate(self.image_sizes)]


PARITY_CASES = (
    ParityCase("one image", "Describe this picture in detail.", ((224, 308),)),
    ParityCase("two images", "What differs between these two pictures?", ((196, 140), (112, 364))),
    ParityCase("text only", "Write a haiku about a robot that counts 12345 apples.", ()),
)


def compare_case(vlm, family: Family, loaded: Loaded, case: ParityCase, n_greedy: int = 24) -> dict:
    """Logit and greedy-continuation agreement of a loaded bundle (`vlm`) with transformers for one case."""
    images = case.images()
    ours = vlm.prompt_logits(case.prompt, images)
    reference = family.reference_logits(loaded, case.prompt, images)
    if ours.shape != reference.shape:
        raise ExportValidationError(f"{case.name}: bundle gives logits {ours.shape}, transformers {reference.shape}", float("inf"), 0.0)  # fmt: skip
    greedy_ours = [s.token for s in vlm.generate(case.prompt, images, max_tokens=n_greedy) if s.finish_reason != "stop"]  # fmt: skip
    greedy_reference = family.reference_greedy(loaded, case.prompt, images, n_greedy)
    greedy_reference = [t for t in greedy_reference if not vlm.llm.is_end_of_generation(t)]
    same_prefix = next((i for i, (a, b) in enumerate(zip(greedy_ours, greedy_reference)) if a != b), min(len(greedy_ours), len(greedy_reference)))  # fmt: skip
    return {
        "n_positions": int(ours.shape[0]),
        "max_abs_logit_diff": float(np.abs(ours - reference).max()),
        "top1_agreement": float((ours.argmax(-1) == reference.argmax(-1)).mean()),
        "greedy_equal": greedy_ours == greedy_reference,
        "greedy_same_prefix": same_prefix,
        "greedy_tokens": len(greedy_reference),
    }


def verify_bundle(bundle: Bundle, family: Family, loaded: Loaded, cases=PARITY_CASES, n_greedy: int = 24) -> dict:
    """Compare a bundle with transformers on `cases`. For F32/F16 language models, logits beyond `LOGIT_ATOL` or a
    different greedy continuation raise ExportValidationError; quantized ones are reported, not judged. Images go
    through the bundle's fp32 vision graph when it has one; through an int8 graph, cases with images are reported,
    not judged (the graph's own agreement with PyTorch is checked at export)."""
    from ..profiles import Profile
    from ..runtimes.pipeline import EdgeVLM

    loaded.model.float()  # the reference runs in fp32, whatever dtype the checkpoint was loaded in
    # on the CPU with the bundle's own limits and default precision, whatever machine exports: what is compared
    # with transformers is the bundle, not a hardware profile's choices
    neutral = Profile("export-verify", __name__)
    variants = bundle.manifest.vision.variants
    vision_dtype = "fp32" if "fp32" in variants else bundle.manifest.vision.default
    vlm = EdgeVLM(bundle, profile=neutral, n_ctx=2048, vision_dtype=vision_dtype)
    try:
        report = {case.name: compare_case(vlm, family, loaded, case, n_greedy) for case in cases}
    finally:
        vlm.close()
    atol = LOGIT_ATOL.get(bundle.manifest.llm.quantization)
    exact_vision = vision_dtype in ("fp32", "fp16")
    for case in cases:
        name, result = case.name, report[case.name]
        logger.info("verify %s: %s", name, result)
        if atol is None or (case.image_sizes and not exact_vision):
            continue
        if result["max_abs_logit_diff"] > atol:
            raise ExportValidationError(f"bundle logits vs transformers ({name})", result["max_abs_logit_diff"], atol)
        if not result["greedy_equal"]:
            diff = result["max_abs_logit_diff"]
            raise ExportValidationError(
                f"greedy continuation differs from transformers after {result['greedy_same_prefix']} tokens ({name})",
                diff, atol, f"the prompt's logits agree (max abs difference {diff:.3g} <= the tolerance {atol:.3g}); most "
                "likely two top tokens nearly tied at that step (random weights make such ties, a trained model rarely)",
            )  # fmt: skip
    return report
