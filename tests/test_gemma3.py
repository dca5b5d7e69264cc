"""Gemma 3 end to end: preprocessing, the vision graph and exported bundles against transformers on the same (tiny,
random) weights; the bidirectional attention between an image's tokens; the CLI and the server on the bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
from conftest import edgevlm_serve, png_data_url, random_frame, random_image

import edgevlm
from edgevlm.contract.kinds.patch_positions import NoPatchPositions
from edgevlm.contract.kinds.preprocessing import preprocess
from edgevlm.exporters.gemma3 import FAMILY
from edgevlm.exporters.gguf import read_gguf_metadata, read_gguf_tensor_types
from edgevlm.exporters.verify import LOGIT_ATOL, PARITY_CASES, compare_case

pytest.importorskip("transformers")

# Per-position top-1 agreement with transformers over the prompts of PARITY_CASES, fp32 vision; quantization flips a
# random model's top-1 where its margins are small. Measured: Q8_0 1.0, Q4_K_M 0.89-1.0; the other families' floors.
TOP1_FLOOR = {"Q8_0": 0.9, "Q4_K_M": 0.6}
N_TOKENS = 16  # the tiny model: 64 px, 4 px patches, 16x16 patches pooled 4x4


@pytest.fixture(scope="module")
def f32_vlm(tiny_gemma3_bundles):
    vlm = edgevlm.load(tiny_gemma3_bundles["F32"], n_ctx=2048, n_threads=1)
    yield vlm
    vlm.close()


# ------------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [(224, 308), (196, 140), (64, 64), (1000, 17), (35, 800)])
def test_preprocessing_equals_transformers_processor(size, tiny_gemma3_loaded):
    from transformers import Gemma3ImageProcessorPil

    processor = Gemma3ImageProcessorPil.from_pretrained(tiny_gemma3_loaded.model_dir)
    image = random_image(*size, seed=size[0])
    expected = processor(images=[image], return_tensors="np")["pixel_values"][0]  # (3, 64, 64)
    prepared = preprocess(image, tiny_gemma3_loaded.preprocessing)
    assert prepared.grid == (1, 16, 16) and prepared.n_tokens == N_TOKENS
    patches = expected.reshape(3, 16, 4, 16, 4).transpose(1, 3, 0, 2, 4).reshape(256, 3 * 4 * 4)
    assert np.array_equal(prepared.pixel_patches, patches)  # bit for bit


@pytest.mark.parametrize(("size", "n_crops"), [((100, 350), 4), ((300, 90), 3), ((100, 110), 0), ((40, 1000), 4)])
def test_tiles_are_the_processors_pan_and_scan_crops(f32_vlm, tiny_gemma3_loaded, size, n_crops):
    from transformers import Gemma3ImageProcessorPil

    processor = Gemma3ImageProcessorPil.from_pretrained(tiny_gemma3_loaded.model_dir)
    image = random_image(*size, seed=size[1])
    out = processor(images=[image], do_pan_and_scan=True, return_tensors="np")
    assert out["num_crops"].tolist() == [n_crops]
    plan = f32_vlm.plan("Hi", [image], tiles=8)  # at most the processor's pan_and_scan_max_num_crops (4) are made
    assert len(plan.spans) == 1 + n_crops and all(span.n_tokens == N_TOKENS for span in plan.spans)
    for span, expected in zip(plan.spans, out["pixel_values"], strict=True):
        prepared = preprocess(image.crop(span.box), tiny_gemma3_loaded.preprocessing)
        patches = expected.reshape(3, 16, 4, 16, 4).transpose(1, 3, 0, 2, 4).reshape(256, 3 * 4 * 4)
        assert np.array_equal(prepared.pixel_patches, patches), span  # bit for bit
    steps = list(f32_vlm.generate("Hi", [image], tiles=8, max_tokens=2))
    assert steps[-1].timings.n_image_tokens == (1 + n_crops) * N_TOKENS


def test_gemma_3_4b_preprocessing_is_256_tokens_of_896_px():
    from transformers import SiglipVisionConfig

    from edgevlm.exporters.gemma3 import preprocessing_from_config

    # gemma-3-4b-it's preprocessor_config.json and vision config (SigLIP-So400m at 896 px, patch 14)
    config = {"do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
              "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2,
              "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
              "pan_and_scan_min_ratio_to_activate": None, "rescale_factor": 0.00392156862745098,
              "size": {"height": 896, "width": 896}}  # fmt: skip
    spec = preprocessing_from_config({k: v for k, v in config.items() if v is not None}, SiglipVisionConfig(image_size=896, patch_size=14), 256)  # fmt: skip
    assert (spec.merge_size, spec.token_range(), spec.factor, spec.patch_dim) == (4, (256, 256), 56, 588)
    assert (spec.pan_and_scan_min_crop_size, spec.pan_and_scan_max_crops, spec.pan_and_scan_min_ratio) == (256, 4, 1.2)
    assert preprocess(random_image(300, 1200), spec).grid == (1, 64, 64)


# ------------------------------------------------------------------------------------------------- vision graph


def test_vision_graphs_match_transformers(tiny_gemma3_bundles, tiny_gemma3_loaded):
    import torch

    from edgevlm.runtimes.vision import VisionEncoder

    bundle = tiny_gemma3_bundles["Q4_K_M"]
    validation = json.loads((bundle / "edgevlm.json").read_text())["validation"]["vision"]
    assert validation["fp32"]["max_abs_diff"] <= 1e-4 and validation["int8"]["cosine_vs_fp32"] >= 0.99
    model, spec = tiny_gemma3_loaded.model, tiny_gemma3_loaded.preprocessing
    worst = 0.0
    for i, size in enumerate([(480, 640), (64, 64), (37, 300)]):
        inputs = FAMILY.reference_inputs(tiny_gemma3_loaded, "Hi", [random_image(*size, seed=i)])
        with torch.no_grad():
            expected = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0].numpy()
        prepared = preprocess(random_image(*size, seed=i), spec)
        for file, atol in (("vision.onnx", 1e-4), ("vision-int8.onnx", 0.05)):
            encoder = VisionEncoder(bundle / file, providers=["CPUExecutionProvider"], merge_size=spec.merge_size, patch_positions=NoPatchPositions())  # fmt: skip
            embeds = encoder.encode(prepared.pixel_patches, prepared.grid)
            assert embeds.shape == expected.shape == (N_TOKENS, 256)
            diff = float(np.abs(embeds - expected).max())
            assert diff <= atol, (file, size, diff)
            worst = max(worst, diff) if file == "vision.onnx" else worst
    print(f"fp32 vision graph vs transformers, max abs diff over 3 images: {worst:.2e}")


# ------------------------------------------------------------------------------------------------- bundles


def test_tokenizer_and_gguf_keys(f32_vlm, tiny_gemma3_loaded):
    # llama.cpp's SentencePiece tokenizer must give transformers' ids, Gemma's special tokens included
    texts = [case.prompt for case in PARITY_CASES] + ["<start_of_turn>user\n\n\n<start_of_image><end_of_image>\n\nÇa coûte 3,50 € ?\tTab  two<end_of_turn>", "日本語 🙂"]  # fmt: skip
    for text in texts:
        assert f32_vlm.llm.tokenize(text) == tiny_gemma3_loaded.tokenizer(text, add_special_tokens=False).input_ids, (
            text
        )
    metadata = read_gguf_metadata(f32_vlm.bundle.file(f32_vlm.manifest.llm.file))
    assert metadata["tokenizer.ggml.model"] == "llama" and metadata["tokenizer.ggml.add_space_prefix"] is False
    assert metadata["gemma3.attention.sliding_window"] == 8
    assert metadata["gemma3.attention.sliding_window_pattern"] == [True, False]
    assert metadata["gemma3.rope.freq_base"] == 1e6 and metadata["gemma3.rope.freq_base_swa"] == 1e4
    assert metadata["gemma3.rope.scaling.type"] == "linear" and metadata["gemma3.rope.scaling.factor"] == 8.0
    assert f32_vlm.llm.is_end_of_generation(f32_vlm.llm.tokenize("<end_of_turn>")[0])
    assert f32_vlm.render_prompt("Hi", 1) == "<start_of_turn>user\n<start_of_image>Hi<end_of_turn>\n<start_of_turn>model\n"  # fmt: skip


def test_prompt_tokens_equal_the_processors(f32_vlm, tiny_gemma3_loaded):
    # each <start_of_image> of the template becomes "\n\n<start_of_image>", the image, "<end_of_image>\n\n"
    case = PARITY_CASES[1]
    expected = FAMILY.reference_inputs(tiny_gemma3_loaded, case.prompt, case.images())["input_ids"][0].tolist()
    pieces = f32_vlm.prompts.pieces(f32_vlm._prompt_segments(case.prompt, 2), f32_vlm.llm)
    image_id = tiny_gemma3_loaded.model.config.image_token_id
    ours = pieces[0] + [image_id] * N_TOKENS + pieces[1] + [image_id] * N_TOKENS + pieces[2]
    assert ours == expected


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.name)
def test_f32_bundle_matches_transformers(f32_vlm, tiny_gemma3_loaded, case):
    result = compare_case(f32_vlm, FAMILY, tiny_gemma3_loaded, case, n_greedy=24)
    # measured 0.0024 (one image), 0.0028 (two), 0.0024 (text only)
    print(case.name, result)
    assert result["max_abs_logit_diff"] <= LOGIT_ATOL["F32"], result
    assert result["greedy_equal"], result
    assert result["greedy_tokens"] == 24


def test_image_tokens_must_attend_to_each_other(f32_vlm, tiny_gemma3_loaded):
    """Decoding the image causally (what any other family does) is not Gemma 3: the logits move far beyond the
    tolerance, while the bidirectional decode stays within it."""
    case = PARITY_CASES[0]
    reference = FAMILY.reference_logits(tiny_gemma3_loaded, case.prompt, case.images())
    bidirectional = f32_vlm.prompt_logits(case.prompt, case.images())
    f32_vlm.prefill.bidirectional_images = False
    try:
        causal = f32_vlm.prompt_logits(case.prompt, case.images())
    finally:
        f32_vlm.prefill.bidirectional_images = True
    good, dropped = float(np.abs(bidirectional - reference).max()), float(np.abs(causal - reference).max())
    print(f"max abs logit diff vs transformers: bidirectional image {good:.4f}, causal image {dropped:.4f}")
    assert good <= LOGIT_ATOL["F32"] < dropped / 5  # measured 0.0024 and 3.48


def test_image_embeddings_are_not_scaled_like_token_embeddings(f32_vlm, tiny_gemma3_loaded, monkeypatch):
    """transformers scales token embeddings by sqrt(hidden) and scatters the image features in unscaled; llama.cpp's
    gemma3 scales token batches only. Parity holds with the features fed as they are, and an image scaled as tokens
    are (what a runtime that scaled `batch.embd` would decode) is far off: the parity tests would catch it."""
    case = PARITY_CASES[0]
    reference = FAMILY.reference_logits(tiny_gemma3_loaded, case.prompt, case.images())
    encode = f32_vlm.vision.encode
    monkeypatch.setattr(f32_vlm.vision, "encode", lambda *args: encode(*args) * np.sqrt(256))
    scaled = f32_vlm.prompt_logits(case.prompt, case.images())
    print(
        f"max abs logit diff vs transformers with the image scaled by sqrt(hidden): {np.abs(scaled - reference).max():.3f}"
    )
    assert np.abs(scaled - reference).max() > 10 * LOGIT_ATOL["F32"]


def test_follow_up_reuses_the_cache_and_matches_a_fresh_decode(tiny_gemma3_bundles, f32_vlm):
    """KV reuse (the image a unit of the cache) and the embedding cache give what a cold start gives."""
    image = PARITY_CASES[0].images()[0]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(np.asarray(image))}},
                                             {"type": "text", "text": "Describe it."}]}]  # fmt: skip
    first = f32_vlm.chat(messages, max_tokens=6)
    follow = [*messages, {"role": "assistant", "content": first.text}, {"role": "user", "content": "And the colours?"}]
    warm = f32_vlm.chat(follow, max_tokens=8)
    assert warm.timings.n_reused_tokens > N_TOKENS and warm.timings.n_encoded_image_tokens == 0  # the image stayed
    with edgevlm.load(tiny_gemma3_bundles["F32"], n_ctx=2048, n_threads=1) as cold_vlm:
        assert cold_vlm.chat(follow, max_tokens=8).text == warm.text


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_bundles_generate_and_agree(tiny_gemma3_bundles, tiny_gemma3_loaded, quant):
    path = tiny_gemma3_bundles[quant]
    if quant == "Q4_K_M":
        assert read_gguf_tensor_types(path / "llm-Q4_K_M.gguf")["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    with edgevlm.load(path, n_ctx=2048, n_threads=1, vision_dtype="fp32") as vlm:  # the LLM's quantization only
        agreements = [compare_case(vlm, FAMILY, tiny_gemma3_loaded, case, n_greedy=8)["top1_agreement"] for case in PARITY_CASES]  # fmt: skip
        print(f"{quant} top-1 agreement with transformers per case: {[round(a, 3) for a in agreements]}")
        assert min(agreements) >= TOP1_FLOOR[quant]
    with edgevlm.load(path, n_ctx=1024, n_threads=1, vision_dtype="int8") as vlm:
        steps = list(vlm.generate("Describe it.", images=PARITY_CASES[1].images(), max_tokens=4))
        assert steps[-1].finish_reason in ("stop", "length") and steps[-1].timings.n_image_tokens == 2 * N_TOKENS


def test_manifest_describes_the_family_as_data(tiny_gemma3_bundles):
    manifest = json.loads((tiny_gemma3_bundles["Q8_0"] / "edgevlm.json").read_text())
    assert manifest["family"] == "gemma3" and manifest["llm"]["arch"] == "gemma3"
    preprocessing = manifest["preprocessing"]
    assert (preprocessing["kind"], preprocessing["resize"], preprocessing["resample"]) == ("fixed-resize", "square", "bilinear")  # fmt: skip
    assert (preprocessing["crop_size"], preprocessing["patch_size"], preprocessing["merge_size"]) == (64, 4, 4)
    assert (preprocessing["tiling"], preprocessing["pan_and_scan_min_crop_size"]) == ("pan-and-scan", 16)
    assert manifest["positions"] == {"kind": "linear", "merge_size": 4}
    assert manifest["llm"]["image_attention"] == "bidirectional"
    assert manifest["tokens"] == {"image_pad": "<start_of_image>", "image_prefix": "\n\n<start_of_image>", "image_suffix": "<end_of_image>\n\n"}  # fmt: skip
    assert manifest["budget"]["max_image_tokens"] == N_TOKENS


def test_a_small_batch_is_raised_to_hold_one_image(tiny_gemma3_bundles, tmp_path):
    profile = tmp_path / "tiny-batch.toml"
    profile.write_text("[llm]\nn_batch = 8\nn_ubatch = 8\n")
    with edgevlm.load(tiny_gemma3_bundles["F32"], profile=profile, n_ctx=1024, n_threads=1) as vlm:
        assert (vlm.llm.n_batch, vlm.llm.n_ubatch) == (N_TOKENS, N_TOKENS)
        steps = list(vlm.generate("Hi", images=[random_image(50, 90)], max_tokens=2))
        assert steps[-1].timings.n_image_tokens == N_TOKENS


def test_cli_export_run_and_server(tiny_gemma3_dir, tiny_gemma3_bundles, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "bundle"
    subprocess.run([sys.executable, "-m", "edgevlm.cli", "export", str(tiny_gemma3_dir), "-o", str(out), "--f16", "--verify"],
                   check=True, env=env, timeout=300, capture_output=True)  # fmt: skip
    image = tmp_path / "x.png"
    random_image(200, 300).save(image)
    run = subprocess.run([sys.executable, "-m", "edgevlm.cli", "run", str(out), "--image", str(image), "-p", "Hi",
                          "--max-new-tokens", "3", "--n-ctx", "1024"], env=env, timeout=120, capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    with edgevlm_serve(tiny_gemma3_bundles["Q8_0"]) as (base, _):
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(random_frame(3, (40, 70)))}},
                                                          {"type": "text", "text": "What is it?"}]}], "max_tokens": 3}  # fmt: skip
        reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["finish_reason"] in ("stop", "length"), reply
