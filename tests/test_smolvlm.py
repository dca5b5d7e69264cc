"""SmolVLM2 / Idefics3 end to end: the `tiles-idefics3` kind against transformers' processor (pixels and the prompt
it expands), the vision graph per view and exported bundles against transformers on the same (tiny, random)
weights, the tokenizer in the GGUF, the CLI and the server on the bundle."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
from conftest import edgevlm_serve, png_data_url, random_frame, random_image

import edgevlm
from edgevlm.contract.kinds import strategy_from_dict
from edgevlm.contract.kinds.patch_positions import NoPatchPositions
from edgevlm.contract.kinds.tiles_idefics3 import Idefics3Tiles
from edgevlm.contract.kinds.tiling import TileGrid
from edgevlm.exporters.gguf import read_gguf_metadata, read_gguf_tensor_types
from edgevlm.exporters.smolvlm import FAMILY, image_processor
from edgevlm.exporters.verify import LOGIT_ATOL, PARITY_CASES, compare_case

pytest.importorskip("transformers")

# Per-position top-1 agreement with transformers over the prompts of PARITY_CASES, fp32 vision; quantization flips a
# random model's top-1 where its margins are small (the other families' floors).
TOP1_FLOOR = {"Q8_0": 0.9, "Q4_K_M": 0.6}

N_TOKENS = 4  # per view of the tiny model: 64 px tiles, 8 px patches, pixel shuffle 4
# (height, width): landscape, portrait, square, tiny (upscaled to 4 x 4 tiles), very wide, very tall, a large photo
SIZES = [(224, 308), (196, 140), (64, 64), (10, 12), (150, 2000), (2000, 150), (3024, 4032), (97, 333)]


@pytest.fixture(scope="module")
def f32_vlm(tiny_smolvlm_bundles):
    vlm = edgevlm.load(tiny_smolvlm_bundles["F32"], n_ctx=2048, n_threads=1)
    yield vlm
    vlm.close()


def _processor(spec: Idefics3Tiles):
    from transformers import Idefics3Processor, SmolVLMImageProcessorPil

    def make(tokenizer):
        return Idefics3Processor(image_processor(spec, SmolVLMImageProcessorPil), tokenizer, image_seq_len=spec.tokens_per_view)  # fmt: skip

    return make


def _views_as_pixel_values(prepared, spec: Idefics3Tiles) -> np.ndarray:
    side, patch = spec.tile_size // spec.patch_size, spec.patch_size
    return np.stack([view.pixel_patches.reshape(side, side, 3, patch, patch).transpose(2, 0, 3, 1, 4).reshape(3, spec.tile_size, spec.tile_size) for view in prepared])  # fmt: skip


def _layout_ids(spec: Idefics3Tiles, grid: TileGrid, width: int, height: int, tokenizer, image_id: int) -> list[int]:
    views = spec.views(grid, width, height)
    ids: list[int] = []
    for piece in spec.layout(grid, width, height):
        ids += tokenizer(piece, add_special_tokens=False).input_ids if isinstance(piece, str) else [image_id] * views[piece].n_tokens  # fmt: skip
    return ids


# ------------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", SIZES)
def test_views_and_layout_equal_the_processors(size, tiny_smolvlm_loaded):
    spec, tokenizer = tiny_smolvlm_loaded.preprocessing, tiny_smolvlm_loaded.tokenizer
    image = random_image(*size, seed=size[1])
    out = _processor(spec)(tokenizer)(text="<image>", images=[image], add_special_tokens=False, return_tensors="np")
    grid = spec.grid(image.width, image.height)
    prepared = spec.prepare_views(image, grid)
    assert [v.n_tokens for v in prepared] == [v.n_tokens for v in spec.views(grid, *image.size)] == [N_TOKENS] * (grid.n_tiles + 1)  # fmt: skip
    assert np.array_equal(_views_as_pixel_values(prepared, spec), out["pixel_values"][0])  # bit for bit
    image_id = tiny_smolvlm_loaded.model.config.image_token_id
    assert _layout_ids(spec, grid, image.width, image.height, tokenizer, image_id) == out["input_ids"][0].tolist()


@pytest.mark.parametrize("size", [(224, 308), (150, 2000), (64, 64)])
def test_an_image_not_split_is_the_global_view_alone(size, tiny_smolvlm_loaded):
    # do_image_splitting false: the step-1 image squashed to one tile, "<fake><global-img>" + tokens + "<fake>"
    spec = dataclasses.replace(tiny_smolvlm_loaded.preprocessing, do_image_splitting=False)
    tokenizer = tiny_smolvlm_loaded.tokenizer
    image = random_image(*size, seed=3)
    out = _processor(spec)(tokenizer)(text="<image>", images=[image], add_special_tokens=False, return_tensors="np")
    grid = spec.grid(image.width, image.height)
    assert grid == TileGrid(0, 0) and spec.token_range() == (N_TOKENS, N_TOKENS)
    assert np.array_equal(_views_as_pixel_values(spec.prepare_views(image, grid), spec), out["pixel_values"][0])
    image_id = tiny_smolvlm_loaded.model.config.image_token_id
    assert _layout_ids(spec, grid, image.width, image.height, tokenizer, image_id) == out["input_ids"][0].tolist()
    assert spec.layout(grid, *image.size) == ["<fake_token_around_image><global-img>", 0, "<fake_token_around_image>"]


def test_a_tile_cap_lowers_the_longest_edge(tiny_smolvlm_loaded):
    spec = tiny_smolvlm_loaded.preprocessing  # 256 px longest edge, 64 px tiles: at most 4 x 4
    assert spec.default_max_tiles == 16 and spec.token_range() == (N_TOKENS, 17 * N_TOKENS)
    width, height = 308, 224
    assert spec.grid(width, height) == spec.grid(width, height, 12) == spec.grid(width, height, 99) == TileGrid(3, 4)
    # a cap below 12: the processor's rule at a 192 px longest edge (3 tiles across, 3 down), then 128 px, then none
    assert [spec.grid(width, height, k) for k in (11, 9, 8, 6, 4, 3, 1, 0)] == [TileGrid(3, 3)] * 2 + [TileGrid(2, 2)] * 3 + [TileGrid(0, 0)] * 3  # fmt: skip
    for k in range(17):  # a lower cap never costs more tokens, and the global view always stays
        grid = spec.grid(width, height, k)
        assert grid.n_tiles <= k and spec.views(grid, width, height)[-1].view == "global"
        if k:
            assert spec.n_tokens(grid, width, height) >= spec.n_tokens(spec.grid(width, height, k - 1), width, height)
    # a capped grid's views are the processor's at that longest edge, pixel for pixel
    from transformers import SmolVLMImageProcessorPil

    image = random_image(height, width, seed=5)
    capped = dataclasses.replace(spec, longest_edge=128)
    expected = image_processor(capped, SmolVLMImageProcessorPil)(images=[image], return_tensors="np")["pixel_values"][0]  # fmt: skip
    views = spec.prepare_views(image, spec.grid(width, height, 4))
    assert np.array_equal(_views_as_pixel_values(views, spec), expected)
    with pytest.raises(ValueError, match="not one this model's processor gives"):
        spec.prepare_views(image, TileGrid(1, 4))


def test_spec_from_smolvlm2_configs():
    # SmolVLM2-256M's preprocessor_config.json (the parts that matter) and its SigLIP patch 16, scale factor 4
    config = {"do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True,
              "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
              "max_image_size": {"longest_edge": 512}, "resample": 1, "rescale_factor": 1 / 255,
              "size": {"longest_edge": 2048}}  # fmt: skip
    spec = Idefics3Tiles.from_preprocessor_config(config, patch_size=16, scale_factor=4)
    assert (spec.tile_size, spec.tokens_per_view, spec.default_max_tiles) == (512, 64, 16)
    assert strategy_from_dict("preprocessing", spec.to_dict()) == spec
    assert spec.grid(4032, 3024) == TileGrid(3, 4) and spec.n_tokens(TileGrid(3, 4), 4032, 3024) == 13 * 64
    assert spec.grid(448, 448) == TileGrid(4, 4)  # small images are upscaled to the longest edge first
    with pytest.raises(ValueError, match="resample=3"):
        Idefics3Tiles.from_preprocessor_config({**config, "resample": 3}, patch_size=16, scale_factor=4)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        Idefics3Tiles(tile_size=500)


# ------------------------------------------------------------------------------------------------- vision graph


def test_vision_graph_matches_transformers_per_view(tiny_smolvlm_bundles, tiny_smolvlm_loaded):
    import torch

    from edgevlm.runtimes.vision import VisionEncoder

    bundle = tiny_smolvlm_bundles["Q8_0"]
    validation = json.loads((bundle / "edgevlm.json").read_text())["validation"]["vision"]
    assert validation["fp32"]["max_abs_diff"] <= 1e-4 and validation["int8"]["cosine_vs_fp32"] >= 0.99
    model, spec = tiny_smolvlm_loaded.model, tiny_smolvlm_loaded.preprocessing
    encoders = {file: VisionEncoder(bundle / file, providers=["CPUExecutionProvider"], merge_size=spec.merge_size, patch_positions=NoPatchPositions()) for file in ("vision.onnx", "vision-int8.onnx")}  # fmt: skip
    worst = {}
    for size in [(224, 308), (150, 2000), (10, 12)]:
        image = random_image(*size, seed=7)
        inputs = FAMILY.reference_inputs(tiny_smolvlm_loaded, "Hi", [image])
        with torch.no_grad():
            expected = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output[0].numpy()  # fmt: skip
        views = spec.prepare_views(image, spec.grid(image.width, image.height))
        for file, atol in (("vision.onnx", 1e-4), ("vision-int8.onnx", 0.05)):
            embeds = np.concatenate([encoders[file].encode(view.pixel_patches, view.grid) for view in views])
            assert embeds.shape == expected.shape == (len(views) * N_TOKENS, 256)
            diff = float(np.abs(embeds - expected).max())
            assert diff <= atol, (file, size, diff)
            worst[(file, size)] = diff
    print(
        "vision graph vs transformers, max abs diff per (graph, image size):", {k: f"{v:.1e}" for k, v in worst.items()}
    )


# ------------------------------------------------------------------------------------------------- bundles


def test_tokenizer_in_the_gguf_equals_transformers(tiny_smolvlm_bundles, tiny_smolvlm_loaded):
    from edgevlm.profiles import LlamaSettings
    from edgevlm.runtimes.llm import LlamaLM

    path = tiny_smolvlm_bundles["F32"]
    manifest = json.loads((path / "edgevlm.json").read_text())
    metadata = read_gguf_metadata(path / manifest["llm"]["file"])
    assert (metadata["tokenizer.ggml.model"], metadata["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert "output.weight" not in read_gguf_tensor_names(path / manifest["llm"]["file"])  # tied to token_embd
    tokenizer = tiny_smolvlm_loaded.tokenizer
    texts = [case.prompt for case in PARITY_CASES] + [
        ("<|im_start|>User:<fake_token_around_image><row_1_col_2><image><image>\n<fake_token_around_image><global-img>"
         "Describe 3.14159 and 2024-12-06,  two  spaces\n\n\tTab<end_of_utterance>\nAssistant:"),
        "Ça coûte 3,50 € ? 日本語 🙂 x1y22z333 ' s'll  \n \n", "\n\n<fake_token_around_image><global-img>",
    ]  # fmt: skip
    llm = LlamaLM(path / manifest["llm"]["file"], LlamaSettings(n_ctx=256, n_threads=1))
    try:
        for text in texts:
            assert llm.tokenize(text) == tokenizer(text, add_special_tokens=False).input_ids, text
        assert llm.is_end_of_generation(llm.tokenize("<end_of_utterance>")[0])
    finally:
        llm.close()


def read_gguf_tensor_names(path) -> list[str]:
    return list(read_gguf_tensor_types(path))


def test_manifest_describes_the_family_as_data(tiny_smolvlm_bundles):
    manifest = json.loads((tiny_smolvlm_bundles["Q8_0"] / "edgevlm.json").read_text())
    assert manifest["family"] == "smolvlm" and manifest["llm"]["arch"] == "llama"
    assert manifest["preprocessing"] == {"kind": "tiles-idefics3", "tile_size": 64, "patch_size": 8, "merge_size": 4,
                                         "longest_edge": 256, "do_image_splitting": True, "image_mean": [0.5] * 3,
                                         "image_std": [0.5] * 3, "rescale_factor": 1 / 255}  # fmt: skip
    assert manifest["positions"] == {"kind": "linear", "merge_size": 4}
    assert manifest["vision"]["patch_positions"] == "none"
    assert manifest["tokens"] == {"image_pad": "<image>"}


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.name)
def test_f32_bundle_matches_transformers(f32_vlm, tiny_smolvlm_loaded, case):
    # one image of 3 x 4 tiles + the global view (52 image tokens), two images (4 x 3 and 2 x 4 tiles), text only
    result = compare_case(f32_vlm, FAMILY, tiny_smolvlm_loaded, case, n_greedy=24)
    print(case.name, result)
    assert result["max_abs_logit_diff"] <= LOGIT_ATOL["F32"], result
    assert result["greedy_equal"], result
    assert result["greedy_tokens"] == 24
    assert result["n_positions"] == FAMILY.reference_inputs(tiny_smolvlm_loaded, case.prompt, case.images())["input_ids"].shape[1]  # fmt: skip


def test_the_text_between_views_matters(f32_vlm, tiny_smolvlm_loaded, monkeypatch):
    """The layout's text (<fake_token_around_image>, <row_r_col_c>, "\\n", <global-img>) is part of the model's input:
    an image written as its views alone gives another next-token distribution, far beyond the tolerance."""
    case = PARITY_CASES[0]
    reference = FAMILY.reference_logits(tiny_smolvlm_loaded, case.prompt, case.images())[-1]
    ours = f32_vlm.prompt_logits(case.prompt, case.images())[-1]
    layout = Idefics3Tiles.layout
    monkeypatch.setattr(Idefics3Tiles, "layout", lambda self, *args: [i for i in layout(self, *args) if isinstance(i, int)])  # fmt: skip
    views_only = f32_vlm.prompt_logits(case.prompt, case.images())[-1]
    good, dropped = float(np.abs(ours - reference).max()), float(np.abs(views_only - reference).max())
    print(
        f"last-position max abs logit diff vs transformers: with the layout text {good:.4f}, views alone {dropped:.4f}"
    )
    assert good <= LOGIT_ATOL["F32"] < dropped / 5


def test_a_tile_cap_reaches_the_runtime(f32_vlm):
    image = PARITY_CASES[0].images()[0]  # 308 x 224: 3 x 4 tiles uncapped
    plan = f32_vlm.plan("Hi", [image], tiles=4)
    assert plan.n_image_tokens == 5 * N_TOKENS  # 2 x 2 tiles and the global view
    steps = list(f32_vlm.generate("Hi", [image], tiles=1, max_tokens=2))
    assert steps[-1].timings.n_image_tokens == N_TOKENS  # the global view alone


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_bundles_generate_and_agree(tiny_smolvlm_bundles, tiny_smolvlm_loaded, quant):
    path = tiny_smolvlm_bundles[quant]
    if quant == "Q4_K_M":
        assert read_gguf_tensor_types(path / "llm-Q4_K_M.gguf")["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    with edgevlm.load(path, n_ctx=2048, n_threads=1, vision_dtype="fp32") as vlm:  # the LLM's quantization only
        agreements = [compare_case(vlm, FAMILY, tiny_smolvlm_loaded, case, n_greedy=8)["top1_agreement"] for case in PARITY_CASES]  # fmt: skip
        print(f"{quant} top-1 agreement with transformers per case: {[round(a, 3) for a in agreements]}")
        assert min(agreements) >= TOP1_FLOOR[quant]
    with edgevlm.load(path, n_ctx=1024, n_threads=1, vision_dtype="int8") as vlm:
        steps = list(vlm.generate("Describe it.", images=PARITY_CASES[1].images(), max_tokens=4))
        assert (
            steps[-1].finish_reason in ("stop", "length") and steps[-1].timings.n_image_tokens == 22 * N_TOKENS
        )  # (4 x 3 + 1) + (2 x 4 + 1) views


def test_cli_export_run_and_server(tiny_smolvlm_dir, tiny_smolvlm_bundles, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "bundle"
    subprocess.run([sys.executable, "-m", "edgevlm.cli", "export", str(tiny_smolvlm_dir), "-o", str(out), "--f16", "--verify"],
                   check=True, env=env, timeout=300, capture_output=True)  # fmt: skip
    image = tmp_path / "x.png"
    random_image(200, 300).save(image)
    run = subprocess.run([sys.executable, "-m", "edgevlm.cli", "run", str(out), "--image", str(image), "-p", "Hi",
                          "--max-new-tokens", "3", "--n-ctx", "1024"], env=env, timeout=120, capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    with edgevlm_serve(tiny_smolvlm_bundles["Q8_0"]) as (base, _):
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(random_frame(3, (40, 70)))}},
                                                          {"type": "text", "text": "What is it?"}]}], "max_tokens": 3}  # fmt: skip
        reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["finish_reason"] in ("stop", "length"), reply
