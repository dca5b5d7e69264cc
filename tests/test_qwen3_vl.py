"""Qwen3-VL end to end: its vision graph (learned position embeddings resampled to the grid, DeepStack sets),
preprocessing, interleaved M-RoPE positions and bundles against transformers on the same (tiny, random) weights.

The tiny model's tower has 4 blocks, DeepStack taps after blocks 0 and 2, and a 6 x 6 learned position grid; its
language model has 3 layers (the DeepStack sets go into the first two), a head size of 128 with 4 heads on a hidden
size of 256, and Qwen3-VL's rope sections [24, 20, 20].
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from conftest import edgevlm_serve, png_data_url, random_frame, random_image

import edgevlm
from edgevlm.budget import Crop
from edgevlm.contract.kinds.positions import MRope3DInterleaved
from edgevlm.contract.kinds.preprocessing import DynamicPatches, preprocess
from edgevlm.exporters.gguf import read_gguf_metadata, read_gguf_tensor_types
from edgevlm.exporters.qwen3_vl import FAMILY
from edgevlm.exporters.qwen3_vl.synthetic import QWEN3_VL_2B, QWEN3_VL_PROCESSOR, qwen3_vl_config
from edgevlm.exporters.qwen_vit import VISION_EXPORT_SPEC, find_visual, vision_features, vision_sample_inputs
from edgevlm.exporters.verify import LOGIT_ATOL, PARITY_CASES, compare_case
from edgevlm.runtimes.vision import VisionEncoder

HIDDEN, SETS = 256, 3  # the language model's width; the input embedding and 2 DeepStack sets per image row
# (t, h, w) patch grids: one merged token, one row of tokens, odd token counts both ways, and grids smaller and
# larger than the 6 x 6 learned position grid (resampled down, up, and down one way and up the other)
GRIDS = ((1, 2, 2), (1, 2, 18), (1, 6, 10), (1, 14, 6), (1, 16, 16))
# Top-1 agreement of quantized bundles with transformers over the 275 prompt positions of the three parity cases.
# Measured on this model: Q8_0 (fp32 tower) 0.967, Q4_K_M (int8 tower) 0.585 -- as Qwen2-VL's in test_gguf.py, a
# random model's logits over 152k tokens are nearly tied at the top, so quantization flips many choices; chance and
# a broken file give ~0. Floors sit ~4.5 binomial standard deviations under the measurements.
TOP1_FLOOR = {"Q8_0": 0.9, "Q4_K_M": 0.45}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return FAMILY.build_tiny(tmp_path_factory.mktemp("tiny-qwen3-vl"), seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return FAMILY.load(tiny_dir)


@pytest.fixture(scope="module")
def bundles(tiny_dir, tmp_path_factory):
    """An F32 LLM with fp32 and fp16 graphs (exported by the CLI), a Q8_0 LLM with fp32, a Q4_K_M LLM with int8."""
    from edgevlm.cli import main
    from edgevlm.exporters import export

    root = tmp_path_factory.mktemp("qwen3-vl-bundles")
    assert main(["export", str(tiny_dir), "-o", str(root / "f32"), "--f32", "--vision-dtype", "fp32", "--vision-dtype", "fp16"]) == 0  # fmt: skip
    return {
        "F32": root / "f32",
        "Q8_0": export(str(tiny_dir), root / "q8", quantization="Q8_0", vision_dtypes=("fp32",)),
        "Q4_K_M": export(str(tiny_dir), root / "q4", quantization="Q4_K_M", vision_dtypes=("int8",)),
    }


@pytest.fixture(scope="module")
def f32_vlm(bundles):
    vlm = edgevlm.load(bundles["F32"], n_ctx=2048)
    yield vlm
    vlm.close()


def _hf_vision(visual, pixel_patches: torch.Tensor, grid: tuple[int, int, int]) -> np.ndarray:
    with torch.no_grad():
        return vision_features(visual(pixel_patches, grid_thw=torch.tensor([grid]))).numpy()


def test_tiny_model_has_deepstack_and_the_published_rope_layout(loaded):
    config = loaded.model.config
    assert list(config.vision_config.deepstack_visual_indexes) == [0, 2] and config.vision_config.depth == 4
    assert config.text_config.num_hidden_layers == 3  # one layer takes no DeepStack set
    assert config.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert config.text_config.head_dim * config.text_config.num_attention_heads != config.text_config.hidden_size
    assert loaded.preprocessing.patch_size == 16 and loaded.preprocessing.factor == 32


def test_published_2b_config_gives_llama_cpp_settings(tmp_path):
    """A Qwen3-VL-2B-shaped export takes the same code path: its GGUF keys, graph width and grids from the config."""
    from transformers import AutoConfig

    from edgevlm.exporters.qwen3_vl.llm import qwen3_vl_hparams

    # config.json of Qwen/Qwen3-VL-2B-Instruct as published, trimmed to what the export reads
    published = {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "tie_word_embeddings": True,
        "text_config": {
            "model_type": "qwen3_vl_text", "attention_bias": False, "head_dim": 128, "hidden_size": 2048,
            "intermediate_size": 6144, "max_position_embeddings": 262144, "num_attention_heads": 16,
            "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 5000000,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "tie_word_embeddings": True, "vocab_size": 151936,
        },
        "vision_config": {
            "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 1024, "in_channels": 3, "intermediate_size": 4096, "num_heads": 16,
            "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(published))
    config = AutoConfig.from_pretrained(tmp_path)
    hparams = qwen3_vl_hparams(config)
    assert hparams["qwen3vl.rope.dimension_sections"] == [24, 20, 20, 0]
    assert hparams["qwen3vl.n_deepstack_layers"] == 3
    assert hparams["qwen3vl.attention.key_length"] == hparams["qwen3vl.attention.value_length"] == 128
    assert hparams["qwen3vl.rope.freq_base"] == 5e6 and hparams["qwen3vl.context_length"] == 262144
    assert FAMILY.validation_grids(config.vision_config) == ((1, 2, 14), (1, 6, 10), (1, 50, 6))  # 48 x 48 learned
    assert FAMILY.tower_sizes(config.vision_config) == {"embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0}  # fmt: skip
    # the benchmark's builder makes exactly this shape
    ours = qwen3_vl_config(QWEN3_VL_2B)
    for section in ("text_config", "vision_config"):
        for key, value in published[section].items():
            if key not in ("model_type", "rope_theta", "rope_scaling"):
                assert getattr(getattr(ours, section), key) == value, (section, key)
    assert qwen3_vl_hparams(ours) == hparams


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_vision_graphs_match_transformers(bundles, loaded, grid):
    visual = find_visual(loaded.model)
    pixel_patches, _ = vision_sample_inputs(visual, grid, seed=sum(grid))
    reference = _hf_vision(visual, pixel_patches, grid)
    fp32 = VisionEncoder(bundles["F32"] / "vision.onnx").encode(pixel_patches.numpy(), grid)
    assert fp32.shape == reference.shape == (grid[1] * grid[2] // 4, SETS * HIDDEN)
    assert np.abs(fp32 - reference).max() <= VISION_EXPORT_SPEC.atol
    int8 = VisionEncoder(bundles["Q4_K_M"] / "vision-int8.onnx").encode(pixel_patches.numpy(), grid)
    cosine = np.sum(int8 * reference, -1) / (np.linalg.norm(int8, axis=-1) * np.linalg.norm(reference, axis=-1))
    assert cosine.min() >= 0.99


def test_vision_graph_carries_every_deepstack_set_and_the_position_embeddings(bundles, loaded):
    """Each third of a row is its own feature set (dropping a set's merger or the learned positions shows here)."""
    visual = find_visual(loaded.model)
    grid = (1, 6, 10)
    pixel_patches, _ = vision_sample_inputs(visual, grid, seed=1)
    reference = _hf_vision(visual, pixel_patches, grid)
    sets = np.split(reference, SETS, axis=-1)
    assert min(np.abs(a - b).max() for i, a in enumerate(sets) for b in sets[i + 1 :]) > 100 * VISION_EXPORT_SPEC.atol
    weights = visual.pos_embed.weight.data.clone()
    try:
        visual.pos_embed.weight.data.zero_()
        without_positions = _hf_vision(visual, pixel_patches, grid)
    finally:
        visual.pos_embed.weight.data.copy_(weights)
    assert np.abs(without_positions - reference).max() > 100 * VISION_EXPORT_SPEC.atol


@pytest.mark.parametrize("size", [(224, 308), (57, 111), (1000, 20), (333, 517)], ids=str)
def test_preprocessing_matches_transformers(tmp_path, size):
    from transformers import AutoImageProcessor

    config = {**QWEN3_VL_PROCESSOR, "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor"}  # fmt: skip
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    image = random_image(*size)
    reference = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="np")
    ours = preprocess(image, DynamicPatches.from_preprocessor_config(config))
    assert ours.grid == tuple(int(v) for v in reference["image_grid_thw"][0])
    assert ours.pixel_patches.shape[1] == 3 * 2 * 16 * 16
    assert np.abs(ours.pixel_patches - reference["pixel_values"]).max() <= 1e-5


def test_image_positions_equal_transformers(loaded):
    spec = FAMILY.positions(loaded)
    assert spec == MRope3DInterleaved(merge_size=2) and spec.kind == "mrope-3d-interleaved"
    for start, grid in ((5, (1, 6, 10)), (17, (1, 14, 6))):
        ours, next_position = spec.image_positions(start, grid)
        reference = loaded.model.model.get_vision_position_ids(start, torch.tensor(grid), 1, 2)
        np.testing.assert_array_equal(ours[:3], reference.numpy())
        # llama.cpp's interleaved kernel reads the fourth slot where transformers rotates by time
        np.testing.assert_array_equal(ours[3], ours[0])
        assert next_position == start + max(grid[1:]) // 2  # what get_rope_index advances by for an image
    # text decoded as embeddings: one position in every slot, as llama.cpp expands a token batch's
    np.testing.assert_array_equal(spec.text_embedding_positions(7, 3), np.tile(np.arange(7, 10), (4, 1)))


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.name)
def test_f32_bundle_matches_transformers(f32_vlm, loaded, case):
    assert f32_vlm.prefill.token_embeddings.row_width == SETS * HIDDEN  # generation decodes text + images as one batch
    result = compare_case(f32_vlm, FAMILY, loaded, case, n_greedy=24)
    # llama.cpp and PyTorch differ only in summation order with F32 weights (measured 0.004-0.009)
    assert result["max_abs_logit_diff"] <= LOGIT_ATOL["F32"], result
    assert result["greedy_equal"], result
    assert result["greedy_tokens"] == 24


def test_dropping_the_deepstack_sets_breaks_parity(f32_vlm, loaded, monkeypatch):
    """The image rows' DeepStack sets are the model: zeroed, the logits leave transformers' far behind (max abs
    difference measured 2.77, against 0.007 with them)."""
    case = PARITY_CASES[0]
    encode = f32_vlm.vision.encode

    def without_deepstack(*args):
        embeds = encode(*args).copy()
        embeds[:, HIDDEN:] = 0
        return embeds

    monkeypatch.setattr(f32_vlm.vision, "encode", without_deepstack)
    reference = FAMILY.reference_logits(loaded, case.prompt, case.images())
    dropped = np.abs(f32_vlm.prompt_logits(case.prompt, case.images()) - reference).max()
    monkeypatch.undo()
    kept = np.abs(f32_vlm.prompt_logits(case.prompt, case.images()) - reference).max()
    print(f"max |logit - transformers|: DeepStack kept {kept:.4f}, dropped {dropped:.4f}")
    assert kept <= LOGIT_ATOL["F32"] < 5 * LOGIT_ATOL["F32"] < dropped


def test_fp16_vision_graph_in_the_bundle_matches_transformers(bundles, loaded):
    vlm = edgevlm.load(bundles["F32"], n_ctx=2048, vision_dtype="fp16")
    try:
        assert vlm.vision_dtype == "fp16"
        result = compare_case(vlm, FAMILY, loaded, PARITY_CASES[1], n_greedy=12)  # two images of different sizes
        assert result["max_abs_logit_diff"] <= LOGIT_ATOL["F16"], result
        assert result["greedy_equal"], result
    finally:
        vlm.close()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_quantized_bundles_agree_with_transformers(bundles, loaded, qtype):
    path = bundles[qtype]
    types = set(read_gguf_tensor_types(path / f"llm-{qtype}.gguf").values())
    assert types & ({"Q8_0"} if qtype == "Q8_0" else {"Q4_K", "Q5_K", "Q6_K"})
    vlm = edgevlm.load(path, n_ctx=2048)
    try:
        results = [compare_case(vlm, FAMILY, loaded, case, n_greedy=4) for case in PARITY_CASES]
    finally:
        vlm.close()
    positions = sum(r["n_positions"] for r in results)
    agreement = sum(r["top1_agreement"] * r["n_positions"] for r in results) / positions
    print(f"{qtype}: top-1 agreement with transformers {agreement:.3f} over {positions} positions",
          [round(r["top1_agreement"], 3) for r in results])  # fmt: skip
    assert agreement >= TOP1_FLOOR[qtype]


def test_manifest_describes_the_family(bundles):
    manifest = json.loads((bundles["Q4_K_M"] / "edgevlm.json").read_text())
    assert manifest["family"] == "qwen3_vl"
    assert manifest["source"]["architecture"] == "Qwen3VLForConditionalGeneration"
    assert manifest["llm"]["arch"] == "qwen3vl" and manifest["llm"]["embedding_length"] == HIDDEN
    assert manifest["vision"]["embedding_dim"] == SETS * HIDDEN and manifest["vision"]["deepstack_layers"] == 2
    assert manifest["positions"] == {"kind": "mrope-3d-interleaved", "merge_size": 2}
    assert manifest["preprocessing"]["kind"] == "dynamic-patches" and manifest["preprocessing"]["patch_size"] == 16
    assert manifest["vision"]["patch_positions"] == "grid-2d"
    metadata = read_gguf_metadata(bundles["Q4_K_M"] / "llm-Q4_K_M.gguf")
    assert metadata["general.architecture"] == "qwen3vl" and metadata["qwen3vl.n_deepstack_layers"] == 2
    assert list(metadata["qwen3vl.rope.dimension_sections"]) == [24, 20, 20, 0]
    assert "<|vision_start|><|image_pad|><|vision_end|>" in metadata["tokenizer.chat_template"]


def test_manifest_refuses_rows_that_do_not_fit_the_language_model(bundles):
    from edgevlm.contract.manifest import Manifest
    from edgevlm.errors import BundleError

    manifest = json.loads((bundles["Q4_K_M"] / "edgevlm.json").read_text())
    manifest["vision"]["deepstack_layers"] = 1  # a graph of 3 sets per row read as 2
    with pytest.raises(BundleError, match=r"vision.embedding_dim: 768 differs from llm.embedding_length 256 x 2 \(the input embedding and 1 DeepStack sets\)"):  # fmt: skip
        Manifest.from_dict(manifest)


def test_text_rows_are_zero_padded_to_the_image_rows(f32_vlm):
    """llama.cpp pads a token's row to n_embd_inp with zeros (`build_inp_embd`): text decoded as embeddings beside
    an image takes no DeepStack values."""
    from edgevlm.runtimes.token_embeddings import TokenEmbeddings

    assert (f32_vlm.llm.n_embd, f32_vlm.llm.n_embd_inp) == (HIDDEN, SETS * HIDDEN)
    tokens = [151644, 872, 198]
    rows = f32_vlm.prefill.token_embeddings(tokens)
    assert rows.shape == (3, SETS * HIDDEN) and not rows[:, HIDDEN:].any()
    np.testing.assert_array_equal(rows[:, :HIDDEN], TokenEmbeddings(f32_vlm.llm.path)(tokens))


def test_budgets_count_32_pixel_tokens(f32_vlm):
    image = random_image(300, 700)
    plan = f32_vlm.plan("Hi", [image], max_image_tokens=100)
    (span,) = plan.spans
    assert all(side % 32 == 0 for side in span.resized_size) and span.n_tokens <= 100
    assert span.n_tokens == span.resized_size[0] * span.resized_size[1] // 32**2
    plan = f32_vlm.plan("Hi", [image], crop=Crop(0, 0, 0.5, 1, relative=True), tiles=2, max_image_tokens=100)
    assert [s.view for s in plan.spans] == ["global", "tile", "tile"]
    assert all(s.resized_size[0] % 32 == 0 == s.resized_size[1] % 32 for s in plan.spans)
    steps = list(f32_vlm.generate("Hi", [image], max_tokens=2, crop=Crop(0, 0, 0.5, 1, relative=True), tiles=2, max_image_tokens=100))  # fmt: skip
    assert steps[-1].timings.n_image_tokens == sum(s.n_tokens for s in plan.spans)


def test_edgevlm_run_answers_without_torch(bundles, tmp_path):
    image = tmp_path / "photo.png"
    random_image(100, 150).save(image)
    code = (
        "import sys\nfrom edgevlm.cli import main\n"
        f"rc = main(['run', {str(bundles['Q4_K_M'])!r}, '--image', {str(image)!r}, '-p', 'What is this?', "
        "'--max-new-tokens', '3', '--stats'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\nsys.exit(rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, check=False, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "image tokens 70" in result.stderr  # 100x150 -> scaled up to >= 65536 pixels: 224x320 -> 7x10 tokens


def test_server_answers_with_an_image(bundles):
    with edgevlm_serve(bundles["Q4_K_M"]) as (base, _):
        content = [{"type": "image_url", "image_url": {"url": png_data_url(random_frame(3, (96, 128)))}},
                   {"type": "text", "text": "What is this?"}]  # fmt: skip
        reply = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": 3}, timeout=60)  # fmt: skip
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["prompt_tokens"] > 64
