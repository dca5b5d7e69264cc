"""LLaVA-1.5 end to end: preprocessing, the vision graph and exported bundles against transformers on the same
(tiny, random) weights, plus what a fixed-size family means for token budgets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import random_image

import edgevlm
from edgevlm.budget import BudgetLimits, ImageRequest, plan_images, resolve_limits
from edgevlm.contract.kinds import strategy_from_dict
from edgevlm.contract.kinds.patch_positions import NoPatchPositions
from edgevlm.contract.kinds.preprocessing import FixedResize, preprocess
from edgevlm.errors import BudgetError, ContextOverflowError
from edgevlm.exporters.gguf import read_gguf_metadata, read_gguf_tensor_types
from edgevlm.exporters.llava import FAMILY
from edgevlm.exporters.verify import LOGIT_ATOL, PARITY_CASES, compare_case

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def f32_vlm(tiny_llava_bundles):
    vlm = edgevlm.load(tiny_llava_bundles["F32"], n_ctx=2048)
    yield vlm
    vlm.close()


# ------------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("pad_to_square", [False, True])
@pytest.mark.parametrize("size", [(224, 308), (196, 140), (112, 364), (336, 336), (1000, 17), (337, 335), (35, 800)])
def test_preprocessing_equals_transformers_processor(size, pad_to_square):
    from transformers import LlavaImageProcessorPil

    processor = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=pad_to_square)  # fmt: skip
    image = random_image(*size, seed=size[0])
    expected = processor(images=[image], return_tensors="np")["pixel_values"][0]  # (3, 336, 336)
    prepared = preprocess(image, FixedResize(pad_to_square=pad_to_square))
    assert prepared.grid == (1, 24, 24) and prepared.n_tokens == 576
    patches = expected.reshape(3, 24, 14, 24, 14).transpose(1, 3, 0, 2, 4).reshape(576, 3 * 14 * 14)
    assert np.array_equal(prepared.pixel_patches, patches)  # bit for bit


def test_preprocessing_spec_from_llava_and_clip_processor_configs(tmp_path):
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

    for processor, pad in ((CLIPImageProcessorPil(), False), (LlavaImageProcessorPil(do_pad=True), True)):
        processor.save_pretrained(tmp_path)
        config = json.loads((tmp_path / "preprocessor_config.json").read_text())
        spec = FixedResize.from_preprocessor_config(config, patch_size=14)
        assert (spec.crop_size, spec.shortest_edge, spec.pad_to_square) == (224, 224, pad)
        assert strategy_from_dict("preprocessing", spec.to_dict()) == spec
    with pytest.raises(ValueError, match="do_center_crop=False"):
        FixedResize.from_preprocessor_config({"do_center_crop": False}, patch_size=14)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        FixedResize(crop_size=300)


# ------------------------------------------------------------------------------------------------- vision graph


def test_vision_graphs_match_transformers(tiny_llava_bundles, tiny_llava_loaded):
    import torch
    from transformers import CLIPImageProcessorPil

    from edgevlm.runtimes.vision import VisionEncoder

    bundle = tiny_llava_bundles["Q4_K_M"]
    validation = json.loads((bundle / "edgevlm.json").read_text())["validation"]["vision"]
    assert validation["fp32"]["max_abs_diff"] <= 1e-4 and validation["int8"]["cosine_vs_fp32"] >= 0.99
    image = random_image(480, 640)
    pixel_values = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})(images=[image], return_tensors="pt")["pixel_values"]  # fmt: skip
    model = tiny_llava_loaded.model
    with torch.no_grad():
        expected = model.model.get_image_features(pixel_values, vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output[0].numpy()  # fmt: skip
    prepared = preprocess(image, tiny_llava_loaded.preprocessing)
    for file, atol in (("vision.onnx", 1e-4), ("vision-int8.onnx", 0.05)):
        encoder = VisionEncoder(bundle / file, providers=["CPUExecutionProvider"], merge_size=1, patch_positions=NoPatchPositions())
        embeds = encoder.encode(prepared.pixel_patches, prepared.grid)
        assert embeds.shape == expected.shape == (576, 256)
        assert np.abs(embeds - expected).max() <= atol, file


# ------------------------------------------------------------------------------------------------- bundles


def test_tokenizer_in_the_gguf_equals_transformers(f32_vlm, tiny_llava_loaded):
    # llama.cpp's SentencePiece tokenizer must give transformers' ids, <image> included, or parity cannot hold
    texts = [case.prompt for case in PARITY_CASES] + ["USER: <image>\n<image>\nÇa coûte 3,50 € ?\tTab  two spaces ASSISTANT:", "日本語 🙂"]  # fmt: skip
    for text in texts:
        assert f32_vlm.llm.tokenize(text, add_special=True) == tiny_llava_loaded.tokenizer(text).input_ids, text
    metadata = read_gguf_metadata(f32_vlm.bundle.file(f32_vlm.manifest.llm.file))
    assert metadata["tokenizer.ggml.model"] == "llama" and metadata["tokenizer.ggml.add_bos_token"] is True
    assert f32_vlm.render_prompt("Hi", 1) == "USER: <image>\nHi ASSISTANT:"  # llava-hf's chat format


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.name)
def test_f32_bundle_matches_transformers(f32_vlm, tiny_llava_loaded, case):
    result = compare_case(f32_vlm, FAMILY, tiny_llava_loaded, case, n_greedy=24)
    # 576 image tokens per image: measured 0.005 (one image), 0.012 (two), 0.001 (text). Nearly all of it is
    # llama.cpp's CPU flash attention (f16 queries) on the text after the images: 1e-6 with it off and an F32 cache.
    assert result["max_abs_logit_diff"] <= LOGIT_ATOL["F32"], result
    assert result["greedy_equal"], result
    assert result["greedy_tokens"] == 24
    assert result["n_positions"] == f32_vlm.prompt_logits(case.prompt, case.images()).shape[0]


def test_f16_bundle_passes_export_verification(tiny_llava_bundles, tiny_llava_loaded):
    from edgevlm.bundle import Bundle
    from edgevlm.exporters.verify import verify_bundle

    # what `edgevlm export --verify` runs, on the two-image case: raises when logits exceed LOGIT_ATOL["F16"] or
    # the greedy continuation differs
    bundle = Bundle.open(tiny_llava_bundles["F16"])
    report = verify_bundle(bundle, FAMILY, tiny_llava_loaded, cases=PARITY_CASES[1:2])
    assert all(result["greedy_equal"] for result in report.values()), report


def test_q4_k_m_bundle_with_int8_vision_generates(tiny_llava_bundles, tiny_llava_loaded):
    path = tiny_llava_bundles["Q4_K_M"]
    types = read_gguf_tensor_types(path / "llm-Q4_K_M.gguf")
    assert types["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K")  # K-quants, no fallback: rows are 256-long
    vlm = edgevlm.load(path, vision_dtype="int8", n_ctx=2048)
    try:
        assert vlm.vision_dtype == "int8"
        case = PARITY_CASES[1]
        agreement = compare_case(vlm, FAMILY, tiny_llava_loaded, case, n_greedy=8)["top1_agreement"]
        assert agreement >= 0.6  # measured 0.9+; quantization flips a random model's near-flat top-1 at some positions
        steps = list(vlm.generate("What is it?", images=case.images(), max_tokens=4))
        assert steps[-1].finish_reason in ("stop", "length") and all(s.token is not None for s in steps)
        assert steps[-1].timings.n_image_tokens == 2 * 576
    finally:
        vlm.close()


def test_manifest_describes_the_family_as_data(tiny_llava_bundles):
    manifest = json.loads((tiny_llava_bundles["Q4_K_M"] / "edgevlm.json").read_text())
    assert manifest["family"] == "llava"
    assert manifest["preprocessing"]["kind"] == "fixed-resize" and manifest["preprocessing"]["crop_size"] == 336
    assert manifest["positions"] == {"kind": "linear", "merge_size": 1}
    assert manifest["vision"]["patch_positions"] == "none"
    assert manifest["tokens"] == {"image_pad": "<image>"}
    assert manifest["budget"]["max_image_tokens"] == 576


def test_runtime_never_imports_torch(tiny_llava_bundles, tmp_path):
    image = tmp_path / "x.png"
    random_image(300, 200).save(image)
    code = (
        "import sys, edgevlm\n"
        f"vlm = edgevlm.load({str(tiny_llava_bundles['Q4_K_M'])!r}, n_ctx=1024)\n"
        f"steps = list(vlm.generate('What is it?', images=[{str(image)!r}], max_tokens=3))\n"
        "assert steps[-1].timings.n_image_tokens == 576, steps[-1].timings\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cli_runs_the_bundle(tiny_llava_bundles, tmp_path, capsys):
    from edgevlm.cli import main

    image = tmp_path / "x.png"
    random_image(200, 300).save(image)
    assert main(["run", str(tiny_llava_bundles["F32"]), "--image", str(image), "-p", "Hi", "--max-new-tokens", "3", "--n-ctx", "1024"]) == 0  # fmt: skip


def test_chat_with_string_content_keeps_the_text(f32_vlm):
    from edgevlm.chat import parse_messages

    messages, _ = parse_messages([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
                                  {"role": "user", "content": "Again"}])  # fmt: skip
    assert f32_vlm.render_messages(messages) == "USER: Hello ASSISTANT: Hi. USER: Again ASSISTANT:"


# ------------------------------------------------------------------------------------------------- budgets


def test_every_image_costs_576_tokens_whatever_the_default_limits(f32_vlm):
    spec = f32_vlm.preprocessing
    # a hardware profile's cap (cpu: 256) and a bundle's are defaults for any model: images keep their one size
    limits = resolve_limits(profile=BudgetLimits(max_image_tokens=256, min_image_tokens=8), bundle=BudgetLimits(max_image_tokens=1024))  # fmt: skip
    plan = plan_images([ImageRequest(4032, 3024), ImageRequest(30, 900)], spec, limits)
    assert [(s.n_tokens, s.resized_size, s.limited_by) for s in plan.spans] == [(576, (336, 336), None)] * 2
    assert f32_vlm.plan("Hi", [random_image(100, 700)]).n_image_tokens == 576  # loaded with the cpu profile
    # a limit asked for explicitly that the model cannot meet is an error, not ignored
    with pytest.raises(BudgetError, match=r"max_image_tokens=256 \(request\) is below this model's minimum of 576 .*every image costs 576 tokens"):  # fmt: skip
        f32_vlm.plan("Hi", [random_image(100, 700)], max_image_tokens=256)
    with pytest.raises(BudgetError, match=r"min_image_tokens=600 \(request\) is above this model's maximum of 576"):
        f32_vlm.plan("Hi", [random_image(100, 700)], min_image_tokens=600)
    # images never shrink to fit: too many for the context is refused with the numbers
    with pytest.raises(ContextOverflowError, match=r"4 image span\(s\) need at least 4 x 576 = 2304 tokens \(576 tokens each: .*context holds 2048"):  # fmt: skip
        f32_vlm.plan("Hi", [random_image(100, 100)] * 4, max_tokens=400)
    # a max_tokens the context cannot hold beside them is cut to what it can hold, as with text alone
    plan = f32_vlm.plan("Hi", [random_image(100, 100)] * 3, max_tokens=400)
    assert plan.n_image_tokens == 1728 and plan.max_new_tokens == 2048 - plan.n_prompt_tokens - 1728 < 400


def test_crop_and_tiles_make_576_token_spans(f32_vlm):
    image = random_image(300, 600)
    plan = f32_vlm.plan("Hi", [image], crop=edgevlm.budget.Crop(0, 0, 0.5, 1, relative=True), tiles=2)
    assert [(s.view, s.box, s.n_tokens) for s in plan.spans] == [("global", (0, 0, 300, 300), 576), ("tile", (0, 0, 150, 300), 576), ("tile", (150, 0, 300, 300), 576)]  # fmt: skip
    steps = list(f32_vlm.generate("Hi", [image], max_tokens=2, crop=edgevlm.budget.Crop(0, 0, 300, 300)))
    assert steps[-1].timings.n_image_tokens == 576
