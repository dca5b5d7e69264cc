"""LLaVA-OneVision end to end: AnyRes preprocessing and prompt expansion, the vision graph (with the packing of
`pack_image_features`) and exported bundles against transformers on the same (tiny, random) weights; the CLI and the
server on the bundle."""

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
from edgevlm.contract.kinds import strategy_from_dict
from edgevlm.contract.kinds.patch_positions import PackedTokens
from edgevlm.contract.kinds.tiles_anyres import AnyResTiles, select_best_resolution
from edgevlm.contract.kinds.tiling import TileGrid
from edgevlm.exporters.gguf import read_gguf_metadata, read_gguf_tensor_types
from edgevlm.exporters.llava_onevision import FAMILY, reference_processor
from edgevlm.exporters.verify import LOGIT_ATOL, PARITY_CASES, compare_case

pytest.importorskip("transformers")

# Per-position top-1 agreement with transformers over the prompts of PARITY_CASES, fp32 vision (the other families'
# floors; quantization flips a random model's top-1 where its margins are small).
TOP1_FLOOR = {"Q8_0": 0.9, "Q4_K_M": 0.6}
IMAGE_ID = 151646
# (width, height): squarish (downsampled by anyres_max_9), very wide, very tall, tiny, one tile's worth, large, and a
# strip so thin that unpadding leaves no row of tile features
SIZES = [(200, 150), (2000, 150), (150, 2000), (31, 17), (64, 64), (1000, 999), (90, 200), (3000, 7)]


@pytest.fixture(scope="module")
def f32_vlm(tiny_onevision_bundles):
    vlm = edgevlm.load(tiny_onevision_bundles["F32"], n_ctx=2048, n_threads=1)
    yield vlm
    vlm.close()


def _image(width: int, height: int, seed: int = 0):
    return random_image(height, width, seed=seed)


def _as_pixel_values(patches: np.ndarray, spec: AnyResTiles) -> np.ndarray:
    """Patches back as (images, 3, side, side), side = the pixels the patches cover."""
    n, p = spec.patches_per_side, spec.patch_size
    return patches.reshape(-1, n, n, 3, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(-1, 3, n * p, n * p)


# ------------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("several", [False, True], ids=["one image", "one of two images"])
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_views_and_prompt_equal_the_processors(tiny_onevision_loaded, size, several):
    """The processor's pixels (max abs diff 0) and its `<image>` expansion equal our view and layout: one image is
    tiled on the processor's grid, each image of a multi-image prompt is not."""
    spec, tokenizer = tiny_onevision_loaded.preprocessing, tiny_onevision_loaded.tokenizer
    image = _image(*size, seed=size[0])
    processor = reference_processor(tiny_onevision_loaded)
    images = [[image, image]] if several else [image]
    text = "Look: <image><image> there." if several else "Look: <image> there."
    expected = processor(text=[text], images=images, return_tensors="np")
    width, height = size
    grid = spec.grid(width, height, max_tiles=0 if several else None)
    assert (grid.n_tiles == 0) == several
    (view,) = spec.prepare_views(image, grid)
    pixel_values = expected["pixel_values"][0][: 1 if several else None]
    assert np.array_equal(_as_pixel_values(view.pixel_patches, spec), pixel_values)  # bit for bit, tiles in order
    layout = spec.layout(grid, width, height)
    assert layout == [0] and view.n_tokens == spec.n_tokens(grid, width, height)
    expansion = [IMAGE_ID] * view.n_tokens
    ours = tokenizer("Look: ").input_ids + expansion * (2 if several else 1) + tokenizer(" there.").input_ids
    assert expected["input_ids"][0].tolist() == ours


@pytest.mark.parametrize("size", [(640, 480), (1600, 300)], ids=str)
def test_llava_onevision_0_5b_preprocessing(size):
    """The real processor's settings (384 px tiles of 27 patches of 14 px: its last 6 pixels are not encoded, 6 x 6
    pinpoints, anyres_max_9): pixels equal transformers' and the token count its processor's."""
    from transformers import LlavaOnevisionImageProcessorPil

    half = (0.5, 0.5, 0.5)  # llava-onevision-qwen2-*-ov-hf's mean and std; the rest are the processor's defaults
    spec = AnyResTiles(image_mean=half, image_std=half)
    image = _image(*size, seed=1)
    processor = LlavaOnevisionImageProcessorPil(image_mean=list(half), image_std=list(half))
    expected = processor(images=[image], return_tensors="np")["pixel_values"][0]
    grid = spec.grid(*size)
    (view,) = spec.prepare_views(image, grid)
    assert np.array_equal(_as_pixel_values(view.pixel_patches, spec), expected[:, :, :378, :378])
    expected_tokens = {(640, 480): 2929, (1600, 300): 4129}[size]  # its processor's _get_number_of_features
    assert spec.n_tokens(grid, *size) == view.n_tokens == expected_tokens


def test_grid_caps_and_spec_round_trip(tiny_onevision_loaded):
    spec = tiny_onevision_loaded.preprocessing
    assert spec.default_max_tiles == 36 and spec.token_range() == (17, 16 + 182)
    for width, height in SIZES:
        own = spec.grid(width, height)
        assert (own.rows * 32, own.cols * 32) == select_best_resolution((height, width), spec.grid_pinpoints)
        costs = []
        for cap in range(1, 37):
            grid = spec.grid(width, height, cap)
            allowed = [(h, w) for h, w in spec.grid_pinpoints if h * w <= cap * 32 * 32]
            assert 1 <= grid.n_tiles <= cap and (grid == own) == (cap >= own.n_tiles)
            costs.append(spec.n_tokens(grid, width, height))
            best = select_best_resolution((height, width), allowed)  # the processor's pick within the cap ...
            if grid != TileGrid(best[0] // 32, best[1] // 32):  # ... unless it costs more than a larger cap's grid
                assert spec.n_tokens(TileGrid(best[0] // 32, best[1] // 32), width, height) > costs[-1]
        assert costs == sorted(costs)  # a smaller cap never costs more
        assert spec.grid(width, height, 0) == TileGrid(0, 0)
        assert spec.grid(width, height, 99) == spec.grid(width, height)
    assert strategy_from_dict("preprocessing", json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="multiples of tile_size"):
        AnyResTiles(tile_size=32, patch_size=8, grid_pinpoints=((32, 48),))
    with pytest.raises(ValueError, match="anyres_max_N"):
        AnyResTiles.from_preprocessor_config({}, patch_size=14, vision_aspect_ratio="anyres")


def test_the_planner_tiles_a_lone_image_only(f32_vlm):
    """transformers' processor tiles an image when it is the prompt's only one; several images are each encoded as
    one padded square and a newline (17 tokens here)."""
    one = f32_vlm.plan("Hi", [_image(200, 150)])
    assert [(s.view, s.n_tokens) for s in one.spans] == [("anyres", 156)]
    two = f32_vlm.plan("Hi", [_image(200, 150), _image(90, 200)])
    assert [(s.view, s.n_tokens) for s in two.spans] == [("global", 17), ("global", 17)]
    capped = f32_vlm.plan("Hi", [_image(200, 150)], tiles=2)
    assert capped.spans[0].tiling.n_tiles <= 2 and capped.spans[0].n_tokens < 156


# ------------------------------------------------------------------------------------------------- vision graph


def test_vision_graph_matches_transformers_per_grid(tiny_onevision_bundles, tiny_onevision_loaded):
    """The fp32 graph (tower, projector and AnyRes packing) against transformers' `get_image_features` on the
    processor's own pixels, one image per grid; the int8 graph on the same within its looser bound."""
    import torch

    from edgevlm.runtimes.vision import VisionEncoder

    bundle, loaded = tiny_onevision_bundles["Q8_0"], tiny_onevision_loaded
    validation = json.loads((bundle / "edgevlm.json").read_text())["validation"]["vision"]
    assert validation["fp32"]["max_abs_diff"] <= 1e-4 and validation["int8"]["cosine_vs_fp32"] >= 0.99
    spec, processor = loaded.preprocessing, reference_processor(loaded)
    encoders = {file: VisionEncoder(bundle / file, providers=["CPUExecutionProvider"], merge_size=1, patch_positions=PackedTokens())
                for file in ("vision.onnx", "vision-int8.onnx")}  # fmt: skip
    diffs = {}
    for (width, height), several in [(size, False) for size in SIZES] + [((200, 150), True)]:
        image = _image(width, height, seed=width)
        inputs = processor(text=["<image><image>" if several else "<image>"], images=[[image, image]] if several else [image], return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            expected = loaded.model.model.get_image_features(inputs["pixel_values"].flatten(0, 1)[: 2 if several else None], image_sizes=inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]).pooler_output[0].numpy()  # fmt: skip
        grid = spec.grid(width, height, 0 if several else None)
        (view,) = spec.prepare_views(image, grid)
        for file, encoder in encoders.items():
            embeds = encoder.encode(view.pixel_patches, view.grid, view.graph_inputs)
            assert embeds.shape == expected.shape == (view.n_tokens, 256)
            diffs[file, (width, height), (grid.rows, grid.cols)] = float(np.abs(embeds - expected).max())
    print("vision max abs diff per (file, image size, grid):", diffs)
    assert max(d for (file, *_), d in diffs.items() if file == "vision.onnx") <= 1e-4
    assert max(d for (file, *_), d in diffs.items() if file == "vision-int8.onnx") <= 0.05


# ------------------------------------------------------------------------------------------------- bundles


def test_tokenizer_and_gguf_keys(f32_vlm, tiny_onevision_loaded):
    texts = [case.prompt for case in PARITY_CASES] + ["<|im_start|>user\n<image>\n<image>\nÇa coûte 3,50 € ?<|im_end|>", "日本語 🙂"]  # fmt: skip
    for text in texts:
        assert f32_vlm.llm.tokenize(text, add_special=True) == tiny_onevision_loaded.tokenizer(text).input_ids, text
    metadata = read_gguf_metadata(f32_vlm.bundle.file(f32_vlm.manifest.llm.file))
    assert metadata["general.architecture"] == "qwen2" and metadata["tokenizer.ggml.pre"] == "qwen2"
    assert f32_vlm.render_prompt("Hi", 1) == "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.name)
def test_f32_bundle_matches_transformers(f32_vlm, tiny_onevision_loaded, case):
    result = compare_case(f32_vlm, FAMILY, tiny_onevision_loaded, case, n_greedy=24)
    print(case.name, result)
    assert result["max_abs_logit_diff"] <= LOGIT_ATOL["F32"], result
    assert result["greedy_equal"], result
    assert result["greedy_tokens"] == 24


def test_bilinear_downsampling_matters(f32_vlm, tiny_onevision_loaded, monkeypatch):
    """The `anyres_max_9` rule shrinks the one image's tile features bilinearly: with the same token count but
    nearest-neighbour sampling (each token copies its first tap), the logits leave the tolerance."""
    case = PARITY_CASES[0]
    (height, width), spec = case.image_sizes[0], f32_vlm.preprocessing
    grid = spec.grid(width, height)
    assert spec._downsampled(*[n for _, n in spec._unpadded(grid, width, height)]) != tuple(n for _, n in spec._unpadded(grid, width, height))  # fmt: skip
    reference = FAMILY.reference_logits(tiny_onevision_loaded, case.prompt, case.images())
    bilinear = f32_vlm.prompt_logits(case.prompt, case.images())
    packing = type(spec).packing

    def nearest(self, grid, width, height):
        sources, weights = packing(self, grid, width, height)
        return sources, (np.arange(4) == 0).astype(np.float32)[None].repeat(len(weights), 0)

    monkeypatch.setattr(type(spec), "packing", nearest)
    dropped = f32_vlm.prompt_logits(case.prompt, case.images())
    good, bad = float(np.abs(bilinear - reference).max()), float(np.abs(dropped - reference).max())
    print(f"max abs logit diff vs transformers: bilinear {good:.4f}, nearest {bad:.4f}")
    assert good <= LOGIT_ATOL["F32"] < bad


def test_follow_up_reuses_the_cache_and_matches_a_fresh_decode(tiny_onevision_bundles, f32_vlm):
    """KV reuse and the embedding cache (keyed by the view's pixels and its packing) give what a cold start gives."""
    image = _image(200, 150)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(np.asarray(image))}},
                                             {"type": "text", "text": "Describe it."}]}]  # fmt: skip
    first = f32_vlm.chat(messages, max_tokens=6)
    follow = [*messages, {"role": "assistant", "content": first.text}, {"role": "user", "content": "And the colours?"}]
    warm = f32_vlm.chat(follow, max_tokens=8)
    assert warm.timings.n_reused_tokens > 156 and warm.timings.n_encoded_image_tokens == 0  # the image stayed
    with edgevlm.load(tiny_onevision_bundles["F32"], n_ctx=2048, n_threads=1) as cold_vlm:
        assert cold_vlm.chat(follow, max_tokens=8).text == warm.text


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_bundles_generate_and_agree(tiny_onevision_bundles, tiny_onevision_loaded, quant):
    path = tiny_onevision_bundles[quant]
    if quant == "Q4_K_M":
        assert read_gguf_tensor_types(path / "llm-Q4_K_M.gguf")["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    with edgevlm.load(path, n_ctx=2048, n_threads=1, vision_dtype="fp32") as vlm:  # the LLM's quantization only
        agreements = [compare_case(vlm, FAMILY, tiny_onevision_loaded, case, n_greedy=8)["top1_agreement"] for case in PARITY_CASES]  # fmt: skip
        print(f"{quant} top-1 agreement with transformers per case: {[round(a, 3) for a in agreements]}")
        assert min(agreements) >= TOP1_FLOOR[quant]
    with edgevlm.load(path, n_ctx=1024, n_threads=1, vision_dtype="int8") as vlm:
        steps = list(vlm.generate("Describe it.", images=PARITY_CASES[1].images(), max_tokens=4))
        assert steps[-1].finish_reason in ("stop", "length") and steps[-1].timings.n_image_tokens == 2 * 17


def test_manifest_describes_the_family_as_data(tiny_onevision_bundles):
    manifest = json.loads((tiny_onevision_bundles["Q8_0"] / "edgevlm.json").read_text())
    assert manifest["family"] == "llava_onevision" and manifest["llm"]["arch"] == "qwen2"
    preprocessing = manifest["preprocessing"]
    assert (preprocessing["kind"], preprocessing["tile_size"], preprocessing["patch_size"]) == ("tiles-anyres", 32, 8)
    assert preprocessing["max_tiles_area"] == 9 and len(preprocessing["grid_pinpoints"]) == 36
    assert manifest["vision"]["patch_positions"] == "packed-tokens"
    assert manifest["positions"] == {"kind": "linear", "merge_size": 1}
    assert manifest["tokens"] == {"image_pad": "<image>"}


def test_cli_export_run_and_server(tiny_onevision_dir, tiny_onevision_bundles, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "bundle"
    subprocess.run([sys.executable, "-m", "edgevlm.cli", "export", str(tiny_onevision_dir), "-o", str(out), "--f16"],
                   check=True, env=env, timeout=300, capture_output=True)  # fmt: skip
    image = tmp_path / "x.png"
    random_image(200, 300).save(image)
    run = subprocess.run([sys.executable, "-m", "edgevlm.cli", "run", str(out), "--image", str(image), "-p", "Hi",
                          "--max-new-tokens", "3", "--n-ctx", "1024"], env=env, timeout=120, capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    with edgevlm_serve(tiny_onevision_bundles["Q8_0"]) as (base, _):
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(random_frame(3, (40, 70)))}},
                                                          {"type": "text", "text": "What is it?"}]}], "max_tokens": 3}  # fmt: skip
        reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["finish_reason"] in ("stop", "length"), reply
