"""Qwen2.5-VL end to end: its window-attention vision graph, preprocessing, positions and bundles against
transformers on the same (tiny, random) weights.

The tiny model has windows of 2 x 2 merged tokens (4 x 4 patches) and full attention in blocks 1 and 3 of 4, so
every test image spans several windows, some cut by the image's right or bottom edge.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_image

import edgevlm
from edgevlm.contract.kinds.positions import MRope3D
from edgevlm.contract.kinds.preprocessing import DynamicPatches, preprocess
from edgevlm.exporters.qwen2_5_vl import FAMILY
from edgevlm.exporters.qwen_vit import VISION_EXPORT_SPEC, WindowAttention, find_visual, vision_sample_inputs
from edgevlm.exporters.verify import LOGIT_ATOL, PARITY_CASES, compare_case
from edgevlm.runtimes.vision import VisionEncoder

# (t, h, w) patch grids: square, non-square both ways, and sizes the 4-patch window does not divide
GRIDS = ((1, 8, 8), (1, 6, 10), (1, 14, 6), (1, 2, 18))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return FAMILY.build_tiny(tmp_path_factory.mktemp("tiny-qwen2.5-vl"), seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return FAMILY.load(tiny_dir)


@pytest.fixture(scope="module")
def bundles(tiny_dir, tmp_path_factory):
    """An F32 LLM with fp32 and fp16 vision graphs, and a Q4_K_M LLM whose only vision graph is int8.

    (The F16 LLM is not exported again here: its GGUF path is Qwen2-VL's, tested there and in test_gguf.py.)"""
    from edgevlm.exporters import export

    root = tmp_path_factory.mktemp("qwen2.5-vl-bundles")
    return {
        "F32": export(str(tiny_dir), root / "f32", quantization="F32", vision_dtypes=("fp32", "fp16")),
        "Q4_K_M": export(str(tiny_dir), root / "q4", quantization="Q4_K_M", vision_dtypes=("int8",)),
    }


@pytest.fixture(scope="module")
def f32_vlm(bundles):
    vlm = edgevlm.load(bundles["F32"], n_ctx=2048)
    yield vlm
    vlm.close()


def _hf_vision(visual, pixel_patches: torch.Tensor, grid: tuple[int, int, int]) -> np.ndarray:
    with torch.no_grad():
        return visual(pixel_patches, grid_thw=torch.tensor([grid])).pooler_output.numpy()


def test_tiny_model_exercises_both_attention_kinds(loaded):
    visual = find_visual(loaded.model)
    window = WindowAttention.of(visual.config)
    assert window == WindowAttention(side=4, full_blocks=frozenset({1, 3}))
    # transformers' own windows for 6 x 10 patches (3 x 5 merged tokens): 2 x 3 windows, the last row and column cut
    from transformers.vision_utils import get_vision_window_index

    _, cu_window_seqlens = get_vision_window_index(torch.tensor([[1, 6, 10]]), 2, visual.config.window_size, 14)
    assert np.diff(cu_window_seqlens.numpy()).tolist() == [16, 16, 8, 8, 8, 4]
    # with every block attending to the whole image the output differs far beyond the graph's tolerance: a graph
    # that ignored the windows would fail the checks below
    pixel_patches, _ = vision_sample_inputs(visual, (1, 6, 10))
    windowed = _hf_vision(visual, pixel_patches, (1, 6, 10))
    full_blocks = visual.fullatt_block_indexes
    visual.fullatt_block_indexes = list(range(len(visual.blocks)))
    try:
        unwindowed = _hf_vision(visual, pixel_patches, (1, 6, 10))
    finally:
        visual.fullatt_block_indexes = full_blocks
    assert np.abs(windowed - unwindowed).max() > 10 * VISION_EXPORT_SPEC.atol


def test_published_3b_config_gives_llama_cpp_settings_and_windows(tmp_path):
    from transformers import AutoConfig

    from edgevlm.exporters.qwen2vl_gguf import qwen2_vl_hparams

    # config.json of Qwen/Qwen2.5-VL-3B-Instruct as published (flat, transformers 4.x spellings), trimmed to what
    # the export reads
    published = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 2048,
        "intermediate_size": 11008, "max_position_embeddings": 128000, "num_attention_heads": 16,
        "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True, "vocab_size": 151936,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {
            "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
            "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
            "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2, "temporal_patch_size": 2,
        },
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(published))
    config = AutoConfig.from_pretrained(tmp_path)
    hparams = qwen2_vl_hparams(config.text_config)
    assert hparams["qwen2vl.rope.dimension_sections"] == [16, 24, 24, 0]
    assert hparams["qwen2vl.rope.freq_base"] == 1e6 and hparams["qwen2vl.context_length"] == 128000
    assert WindowAttention.of(config.vision_config) == WindowAttention(side=8, full_blocks=frozenset({7, 15, 23, 31}))
    assert FAMILY.validation_grids(config.vision_config) == ((1, 4, 6), (1, 18, 12), (1, 8, 24))


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_vision_graphs_match_transformers(bundles, loaded, grid):
    visual = find_visual(loaded.model)
    pixel_patches, _ = vision_sample_inputs(visual, grid, seed=sum(grid))
    reference = _hf_vision(visual, pixel_patches, grid)
    fp32 = VisionEncoder(bundles["F32"] / "vision.onnx").encode(pixel_patches.numpy(), grid)
    assert fp32.shape == reference.shape == (grid[1] * grid[2] // 4, 256)
    assert np.abs(fp32 - reference).max() <= VISION_EXPORT_SPEC.atol
    int8 = VisionEncoder(bundles["Q4_K_M"] / "vision-int8.onnx").encode(pixel_patches.numpy(), grid)
    cosine = np.sum(int8 * reference, -1) / (np.linalg.norm(int8, axis=-1) * np.linalg.norm(reference, axis=-1))
    assert cosine.min() >= 0.99


@pytest.mark.parametrize("size", [(224, 308), (57, 111), (1000, 20), (333, 517)], ids=str)
def test_preprocessing_matches_transformers(tmp_path, size):
    from transformers import AutoImageProcessor

    # preprocessor_config.json as Qwen/Qwen2.5-VL-3B-Instruct publishes it
    config = {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }  # fmt: skip
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    image = random_image(*size)
    reference = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="np")
    ours = preprocess(image, DynamicPatches.from_preprocessor_config(config))
    assert ours.grid == tuple(int(v) for v in reference["image_grid_thw"][0])
    assert np.abs(ours.pixel_patches - reference["pixel_values"]).max() <= 1e-6


def test_image_positions_equal_transformers(loaded):
    spec = FAMILY.positions(loaded)
    assert spec == MRope3D(merge_size=2)
    for start, grid in ((5, (1, 6, 10)), (17, (1, 14, 6))):
        ours, next_position = spec.image_positions(start, grid)
        reference = loaded.model.model.get_vision_position_ids(start, torch.tensor(grid), 1, 2)
        np.testing.assert_array_equal(ours[:3], reference.numpy())
        assert next_position == start + max(grid[1:]) // 2  # what get_rope_index advances by for an image


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.name)
def test_f32_bundle_matches_transformers(f32_vlm, loaded, case):
    result = compare_case(f32_vlm, FAMILY, loaded, case, n_greedy=24)
    # llama.cpp and PyTorch differ only in summation order with F32 weights (measured 0.005-0.009)
    assert result["max_abs_logit_diff"] <= LOGIT_ATOL["F32"], result
    assert result["greedy_equal"], result
    assert result["greedy_tokens"] == 24


def test_fp16_vision_graph_in_the_bundle_matches_transformers(bundles, loaded):
    vlm = edgevlm.load(bundles["F32"], n_ctx=2048, vision_dtype="fp16")
    try:
        assert vlm.vision_dtype == "fp16"
        result = compare_case(vlm, FAMILY, loaded, PARITY_CASES[1], n_greedy=12)  # two images of different sizes
        assert result["max_abs_logit_diff"] <= LOGIT_ATOL["F16"], result
        assert result["greedy_equal"], result
    finally:
        vlm.close()


def test_quantized_bundle_with_int8_vision_generates(bundles):
    vlm = edgevlm.load(bundles["Q4_K_M"], n_ctx=1024)
    try:
        assert vlm.vision_dtype == "int8"  # the bundle's only vision graph
        steps = list(vlm.generate("What is it?", images=[PARITY_CASES[0].images()[0]], max_tokens=5))
        assert all(s.token is not None for s in steps) and steps[-1].finish_reason in ("stop", "length")
        assert steps[-1].timings.n_image_tokens == 88  # 224x308 -> grid 16x22 patches -> 8x11 tokens
    finally:
        vlm.close()


def test_manifest_describes_the_family(bundles):
    manifest = json.loads((bundles["Q4_K_M"] / "edgevlm.json").read_text())
    assert manifest["family"] == "qwen2_5_vl"
    assert manifest["source"]["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    assert manifest["llm"]["arch"] == "qwen2vl"
    assert manifest["preprocessing"]["kind"] == "dynamic-patches" and manifest["vision"]["patch_positions"] == "grid-2d"
    assert set(manifest["files"]) == {"llm-Q4_K_M.gguf", "vision-int8.onnx"}  # fp32 was exported, checked, removed
    assert manifest["validation"]["vision"]["int8"]["cosine_vs_fp32"] >= 0.99
    assert json.loads((bundles["F32"] / "edgevlm.json").read_text())["validation"]["vision"]["fp32"]["grids"] == [
        [1, 4, 6], [1, 10, 8], [1, 4, 12]
    ]  # fmt: skip


def test_edgevlm_run_answers(bundles, tmp_path):
    import subprocess
    import sys

    image = tmp_path / "photo.png"
    random_image(100, 150).save(image)
    command = [sys.executable, "-m", "edgevlm.cli", "run", str(bundles["Q4_K_M"]), "--image", str(image)]
    result = subprocess.run([*command, "-p", "What is this?", "--max-new-tokens", "3", "--stats"], check=False, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "image tokens 20" in result.stderr  # 100x150 -> 112x140 -> grid 8x10 patches -> 4x5 tokens
