"""Qwen2-VL end to end: exported bundles against transformers on the same (tiny, random) weights."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import random_image

import edgevlm
from edgevlm.errors import ContextOverflowError, ImageError
from edgevlm.exporters.qwen2_vl import FAMILY
from edgevlm.exporters.verify import LOGIT_ATOL, PARITY_CASES, compare_case

# Per-position top-1 agreement with transformers over the prompts of PARITY_CASES. A random model's logits are
# nearly flat (top-1 margins of a few hundredths), so quantization noise flips top-1 at some positions; measured:
# Q8_0 0.97-0.98, Q4_K_M 0.72-0.80. Greedy continuations still matched in every case.
TOP1_FLOOR = {"Q8_0": 0.9, "Q4_K_M": 0.6}


@pytest.fixture(scope="module")
def loaded_bundles(tiny_bundles):
    vlms = {quant: edgevlm.load(path, n_ctx=2048) for quant, path in tiny_bundles.items()}
    yield vlms
    for vlm in vlms.values():
        vlm.close()


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.name)
def test_f32_bundle_matches_transformers(loaded_bundles, tiny_qwen2vl_loaded, case):
    result = compare_case(loaded_bundles["F32"], FAMILY, tiny_qwen2vl_loaded, case, n_greedy=24)
    # llama.cpp and PyTorch differ only in summation order with F32 weights (measured 0.0018-0.0027)
    assert result["max_abs_logit_diff"] <= LOGIT_ATOL["F32"], result
    assert result["greedy_equal"], result
    assert result["greedy_tokens"] == 24


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_bundles_generate_and_agree(loaded_bundles, tiny_qwen2vl_loaded, quant):
    vlm = loaded_bundles[quant]
    agreements = [compare_case(vlm, FAMILY, tiny_qwen2vl_loaded, case, n_greedy=8)["top1_agreement"] for case in PARITY_CASES]  # fmt: skip
    print(f"{quant} top-1 agreement with transformers per case: {[round(a, 3) for a in agreements]}")
    assert min(agreements) >= TOP1_FLOOR[quant]
    steps = list(vlm.generate("Describe it.", images=[PARITY_CASES[0].images()[0]], max_tokens=5))
    assert steps[-1].finish_reason in ("stop", "length")
    assert all(s.token is not None for s in steps)


def test_int8_vision_variant_runs(tiny_bundles):
    vlm = edgevlm.load(tiny_bundles["Q4_K_M"], vision_dtype="int8", n_ctx=1024)
    try:
        assert vlm.vision_dtype == "int8"
        steps = list(vlm.generate("What is it?", images=[PARITY_CASES[0].images()[0]], max_tokens=3))
        assert steps[-1].timings.n_image_tokens == 88  # 224x308 -> grid 16x22 patches -> 8x11 tokens
    finally:
        vlm.close()


def test_manifest_records_export_validation(tiny_bundles):
    manifest = json.loads((tiny_bundles["Q8_0"] / "edgevlm.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["family"] == "qwen2_vl"
    assert manifest["positions"] == {"kind": "mrope-3d", "merge_size": 2}
    assert manifest["validation"]["vision"]["fp32"]["max_abs_diff"] <= 1e-4
    assert manifest["validation"]["vision"]["int8"]["cosine_vs_fp32"] >= 0.99
    assert set(manifest["files"]) == {"llm-Q8_0.gguf", "vision.onnx", "vision-int8.onnx"}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())


def test_streamed_text_and_timings(loaded_bundles):
    steps = list(loaded_bundles["F32"].generate("Hi", images=[np.zeros((50, 80, 3), np.uint8)], max_tokens=6))
    timings = steps[-1].timings
    assert timings.n_generated == len(steps)
    assert timings.n_image_tokens == 6  # 50x80 -> 56x84 -> grid 4x6 patches -> 2x3 merged tokens
    assert timings.vision_ms > 0 and timings.prefill_ms > 0 and timings.time_to_first_token_ms > 0


def test_runtime_never_imports_torch(tiny_bundles, tmp_path):
    image = tmp_path / "x.png"
    PARITY_CASES[0].images()[0].save(image)
    code = (
        "import sys, edgevlm\n"
        f"vlm = edgevlm.load({str(tiny_bundles['Q4_K_M'])!r}, n_ctx=1024)\n"
        f"steps = list(vlm.generate('What is it?', images=[{str(image)!r}], max_tokens=3))\n"
        "assert steps, 'no output'\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_prompt_longer_than_context_is_refused(tiny_bundles):
    vlm = edgevlm.load(tiny_bundles["F32"], n_ctx=64)
    try:
        # llama.cpp rounds the context up to 256. Images shrink to fit (tests/test_budget.py), and to their fewest
        # tokens when max_tokens (default 256) is more than the context holds beside them; 300 text tokens overflow.
        with pytest.raises(ContextOverflowError, match=r"need at least 1 x 4 = 4 tokens.* context holds 256: 256 - \d+ prompt tokens"):  # fmt: skip
            list(vlm.generate("Describe it. " * 100, images=[random_image(600, 800)]))
        with pytest.raises(ContextOverflowError, match=r"needs \d+ tokens \(\d+ text \+ 0 image\).* context holds 256"):
            list(vlm.generate("Describe it. " * 100))
    finally:
        vlm.close()


def test_bad_images_get_clear_errors(loaded_bundles, tmp_path):
    vlm = loaded_bundles["F32"]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cases = [(tmp_path / "missing.png", "not found"), (tmp_path, "directory"), (corrupt, "not an image Pillow recognizes")]
    for bad, message in cases:
        with pytest.raises(ImageError, match=message):
            list(vlm.generate("What is it?", images=[bad]))


def test_prompt_text_is_normalized_like_the_hf_tokenizer(loaded_bundles, tiny_qwen2vl_loaded):
    # Qwen2's tokenizer applies NFC; llama.cpp does not, so the runtime must (decomposed "é" here)
    prompt = "Un cafe\u0301 cre\u0300me, s'il vous pla\u0131\u0302t."
    ours = loaded_bundles["F32"].prompt_logits(prompt)
    reference = FAMILY.reference_logits(tiny_qwen2vl_loaded, prompt, [])
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= LOGIT_ATOL["F32"]


@pytest.mark.parametrize("quant", ["F32", "Q4_K_M"])
def test_text_around_images_rides_in_the_image_batch(loaded_bundles, tiny_qwen2vl_loaded, quant, monkeypatch):
    """The prompt's text goes into the image's embeddings batch, looked up in the GGUF as llama.cpp would: the
    rows equal the checkpoint's (F32) and the answer equals the one from separate token batches."""
    vlm = loaded_bundles[quant]
    table = vlm.prefill.token_embeddings
    assert table is not None
    if quant == "F32":
        weight = tiny_qwen2vl_loaded.model.get_input_embeddings().weight.detach().float().numpy()
        ids = [0, 5, 151643, 151655, len(weight) - 1]
        np.testing.assert_array_equal(table(ids), weight[ids])
    with pytest.raises(ValueError, match="token ids"):
        table([table.n_vocab])
    assert table([]).shape == (0, table.n_embd)  # an empty text piece between two images
    case = PARITY_CASES[1]  # text, image, image, text
    vlm.clear_caches()
    steps_merged = list(vlm.generate(case.prompt, case.images(), max_tokens=12))
    with monkeypatch.context() as patch:  # text whose rows would exceed the bound goes in token batches
        patch.setattr("edgevlm.runtimes.prefill.ONE_BATCH_TEXT_BYTES", table.row_width * 4 * 3)
        vlm.clear_caches()
        steps_long = list(vlm.generate(case.prompt, case.images(), max_tokens=12))
    monkeypatch.setattr(vlm.prefill, "token_embeddings", None)
    vlm.clear_caches()
    steps_split = list(vlm.generate(case.prompt, case.images(), max_tokens=12))
    merged, long, split = (steps[-1].timings for steps in (steps_merged, steps_long, steps_split))
    assert merged.n_text_with_images == merged.n_text_tokens and long.n_text_with_images == split.n_text_with_images == 0  # fmt: skip
    assert [s.token for s in steps_merged] == [s.token for s in steps_long] == [s.token for s in steps_split]


def test_verify_judges_what_is_exact_in_an_int8_vision_bundle(tiny_qwen2vl_dir, tmp_path):
    """An F32 language model with only an int8 vision graph: text-only parity is judged, image cases are reported
    (int8 embeddings move logits beyond the F32 tolerance by design); with fp32 also shipped, fp32 is compared."""
    from edgevlm.bundle import Bundle
    from edgevlm.exporters import export

    path = export(str(tiny_qwen2vl_dir), tmp_path / "f32-int8", quantization="F32", vision_dtypes=("int8",), verify=True)
    validation = Bundle.open(path).manifest.validation
    assert set(validation["end_to_end"]) == {case.name for case in PARITY_CASES}
    assert validation["end_to_end"]["text only"]["greedy_equal"]
