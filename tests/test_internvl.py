"""InternVL3 end to end: the tiling (grid, tiles, thumbnail, prompt) against transformers' `InternVLProcessor`, the
vision graph per view and exported bundles against transformers on the same (tiny, random) weights; the CLI and the
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
from edgevlm.contract.kinds.patch_positions import NoPatchPositions
from edgevlm.contract.kinds.tiles_internvl import TilesInternVL
from edgevlm.contract.kinds.tiling import TileGrid
from edgevlm.exporters.gguf import read_gguf_metadata, read_gguf_tensor_types
from edgevlm.exporters.internvl import FAMILY, internvl_processor
from edgevlm.exporters.verify import LOGIT_ATOL, PARITY_CASES, compare_case

pytest.importorskip("transformers")

# Per-position top-1 agreement with transformers over the prompts of PARITY_CASES, fp32 vision; quantization flips a
# random model's top-1 where its margins are small. Measured (one image, two images, text only): Q8_0 0.91 / 0.96 /
# 0.84, Q4_K_M 0.70 / 0.63 / 0.52. The tiny model's text-only prompt has near ties (F32 agrees at 0.96 there), so the
# floors are below Qwen2-VL's 0.9 / 0.6 (Q4_K_M's is Qwen3-VL's).
TOP1_FLOOR = {"Q8_0": 0.8, "Q4_K_M": 0.45}
N_TOKENS = 16  # per view of the tiny model: 64 px tiles, 8 px patches, 8x8 patches pixel-shuffled 2x2
TILE, PATCH = 64, 8
# (height, width): square (one view; four tiles by the tie rule), wide, very wide, very tall, odd, a photo, tiny
SIZES = [(64, 64), (200, 200), (100, 300), (150, 2000), (2000, 150), (131, 97), (480, 640), (10, 10)]


@pytest.fixture(scope="module")
def f32_vlm(tiny_internvl_bundles):
    vlm = edgevlm.load(tiny_internvl_bundles["F32"], n_ctx=2048, n_threads=1)
    yield vlm
    vlm.close()


def view_pixels(prepared) -> np.ndarray:
    """A view's row-major patches back as the processor's (3, tile, tile) pixel_values."""
    grid = TILE // PATCH
    return prepared.pixel_patches.reshape(grid, grid, 3, PATCH, PATCH).transpose(2, 0, 3, 1, 4).reshape(3, TILE, TILE)


def layout_ids(spec: TilesInternVL, tokenizer, grid: TileGrid, width: int, height: int, image_id: int) -> list[int]:
    """The ids the runtime puts in the placeholder's place: the layout's text tokenized, each view index expanded to
    its tokens (as image-token ids, as the processor writes them)."""
    views = spec.views(grid, width, height)
    ids: list[int] = []
    for part in spec.layout(grid, width, height):
        ids += tokenizer(part, add_special_tokens=False).input_ids if isinstance(part, str) else [image_id] * views[part].n_tokens  # fmt: skip
    return ids


# ------------------------------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_tiles_and_prompt_equal_the_processors(size, tiny_internvl_loaded):
    """For each cap on the tiles (none, the processor's own max_patches = cap below), the views' pixels are the
    processor's bit for bit and the layout gives its input_ids."""
    spec, tokenizer = tiny_internvl_loaded.preprocessing, tiny_internvl_loaded.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    height, width = size
    image = random_image(height, width, seed=width)
    for cap in (None, 4, 2, 1):
        processor = internvl_processor(tokenizer, spec, **({} if cap is None else {"max_patches": cap}))
        expected = processor(text="Look: <IMG_CONTEXT>\nWhat?", images=[image], return_tensors="np")
        grid = spec.grid(width, height, cap)
        views = spec.prepare_views(image, grid)
        assert len(views) == len(spec.views(grid, width, height)) == expected["pixel_values"].shape[0], (cap, grid)
        assert all(view.n_tokens == N_TOKENS for view in views)
        pixels = np.stack([view_pixels(view) for view in views])
        assert np.array_equal(pixels, expected["pixel_values"]), (cap, grid)  # bit for bit
        ours = tokenizer("Look: ").input_ids + layout_ids(spec, tokenizer, grid, width, height, image_id) + tokenizer("\nWhat?").input_ids  # fmt: skip
        assert ours == expected["input_ids"][0].tolist(), (cap, grid)


def test_grids_follow_the_processors_rule(tiny_internvl_loaded):
    spec = tiny_internvl_loaded.preprocessing
    assert spec.grid(300, 100) == TileGrid(1, 3) and spec.grid(2000, 150) == TileGrid(1, 6)
    assert spec.grid(150, 2000) == TileGrid(6, 1) and spec.grid(150, 2000, max_tiles=3) == TileGrid(3, 1)
    # a tie between 1x1 and 2x2 goes to 2x2 once the image's area is above half of 2x2 tiles' (2 * 64² px)
    assert spec.grid(90, 90) == TileGrid(0, 0) and spec.grid(91, 91) == TileGrid(2, 2)
    assert spec.grid(300, 100, max_tiles=1) == spec.grid(300, 100, max_tiles=0) == TileGrid(0, 0)
    assert spec.grid(300, 100, max_tiles=50) == spec.grid(300, 100)  # never above max_patches
    views = spec.views(TileGrid(2, 3), 640, 480)
    assert [(v.view, v.row, v.col) for v in views] == [("tile", r, c) for r in range(2) for c in range(3)] + [("global", None, None)]  # fmt: skip
    assert spec.layout(TileGrid(2, 3), 640, 480) == ["<img>", 0, 1, 2, 3, 4, 5, 6, "</img>"]
    assert spec.token_range() == (N_TOKENS, 7 * N_TOKENS)
    with pytest.raises(ValueError, match="max_tiles"):
        spec.grid(300, 100, max_tiles=-1)


def test_internvl3_1b_preprocessing_is_256_tokens_per_448_px_tile():
    # InternVL3-1B-hf's preprocessor_config.json (GotOcr2ImageProcessor; InternVLProcessor turns crop_to_patches on)
    config = {"crop_size": None, "crop_to_patches": False, "do_center_crop": None, "do_convert_rgb": True,
              "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
              "image_processor_type": "GotOcr2ImageProcessorFast", "image_std": [0.229, 0.224, 0.225],
              "max_patches": 12, "min_patches": 1, "processor_class": "InternVLProcessor", "resample": 3,
              "rescale_factor": 0.00392156862745098, "size": {"height": 448, "width": 448}}  # fmt: skip
    spec = TilesInternVL.from_preprocessor_config(config, patch_size=14, merge_size=2)
    assert (spec.tile_tokens, spec.default_max_tiles, spec.token_range()) == (256, 12, (256, 13 * 256))
    assert spec.grid(1920, 1080) == TileGrid(2, 4) and spec.grid(800, 600) == TileGrid(3, 4)
    assert TilesInternVL.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="resample"):
        TilesInternVL.from_preprocessor_config({**config, "resample": 2}, patch_size=14, merge_size=2)
    for bad in ({"max_patches": 10_000}, {"min_patches": 13}, {"tile_size": 450}, {"image_start": ""}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TilesInternVL.from_dict({**spec.to_dict(), **bad})


# ------------------------------------------------------------------------------------------------- vision graph


def test_vision_graph_matches_transformers_per_view(tiny_internvl_bundles, tiny_internvl_loaded):
    import torch

    from edgevlm.runtimes.vision import VisionEncoder

    bundle = tiny_internvl_bundles["Q4_K_M"]
    validation = json.loads((bundle / "edgevlm.json").read_text())["validation"]["vision"]
    assert validation["fp32"]["max_abs_diff"] <= 1e-4 and validation["int8"]["cosine_vs_fp32"] >= 0.99
    model, spec = tiny_internvl_loaded.model, tiny_internvl_loaded.preprocessing
    encoders = {}
    for file in ("vision.onnx", "vision-int8.onnx"):
        encoders[file] = VisionEncoder(bundle / file, providers=["CPUExecutionProvider"], merge_size=spec.merge_size, patch_positions=NoPatchPositions())  # fmt: skip
    worst: dict[str, float] = {}
    for i, (height, width) in enumerate([(224, 308), (150, 2000), (64, 64)]):
        image = random_image(height, width, seed=i)
        inputs = FAMILY.reference_inputs(tiny_internvl_loaded, "Hi", [image])
        with torch.no_grad():
            expected = model.model.get_image_features(inputs["pixel_values"]).pooler_output.numpy()  # (views, 16, 256)
        views = spec.prepare_views(image, spec.grid(width, height))
        assert len(views) == expected.shape[0]
        for file, atol in (("vision.onnx", 1e-4), ("vision-int8.onnx", 0.1)):
            for view, reference in zip(views, expected, strict=True):
                embeds = encoders[file].encode(view.pixel_patches, view.grid)
                assert embeds.shape == reference.shape == (N_TOKENS, 256)
                diff = float(np.abs(embeds - reference).max())
                assert diff <= atol, (file, (width, height), diff)
                worst[f"{file} {width}x{height}"] = max(worst.get(f"{file} {width}x{height}", 0.0), diff)
    print("vision graph vs transformers, max abs diff per image (all its views):", {k: f"{v:.2e}" for k, v in worst.items()})  # fmt: skip


# ------------------------------------------------------------------------------------------------- bundles


def test_tokenizer_and_gguf_keys(f32_vlm, tiny_internvl_loaded):
    tokenizer = tiny_internvl_loaded.tokenizer
    texts = [case.prompt for case in PARITY_CASES] + ["<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nÇa coûte 3,50 € ?\tTab  two<|im_end|>", "日本語 🙂 <box>1</box>"]  # fmt: skip
    for text in texts:
        assert f32_vlm.llm.tokenize(text) == tokenizer(text, add_special_tokens=False).input_ids, text
    metadata = read_gguf_metadata(f32_vlm.bundle.file(f32_vlm.manifest.llm.file))
    assert metadata["general.architecture"] == "qwen2" and metadata["tokenizer.ggml.pre"] == "qwen2"
    assert metadata["qwen2.rope.freq_base"] == 1e6
    assert f32_vlm.llm.is_end_of_generation(f32_vlm.llm.tokenize("<|im_end|>")[0])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert f32_vlm.render_prompt("Hi", 1) == expected == "<|im_start|>user\n<IMG_CONTEXT>\nHi<|im_end|>\n<|im_start|>assistant\n"  # fmt: skip


def test_manifest_describes_the_family_as_data(tiny_internvl_bundles):
    manifest = json.loads((tiny_internvl_bundles["Q8_0"] / "edgevlm.json").read_text())
    assert manifest["family"] == "internvl" and manifest["llm"]["arch"] == "qwen2"
    preprocessing = manifest["preprocessing"]
    assert preprocessing["kind"] == "tiles-internvl"
    assert (preprocessing["tile_size"], preprocessing["patch_size"], preprocessing["merge_size"]) == (TILE, PATCH, 2)
    assert (preprocessing["min_patches"], preprocessing["max_patches"]) == (1, 6)
    assert (preprocessing["image_start"], preprocessing["image_end"]) == ("<img>", "</img>")
    assert manifest["positions"] == {"kind": "linear", "merge_size": 2}
    assert manifest["tokens"] == {"image_pad": "<IMG_CONTEXT>"}
    assert manifest["vision"]["patch_positions"] == "none"


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.name)
def test_f32_bundle_matches_transformers(f32_vlm, tiny_internvl_loaded, case):
    result = compare_case(f32_vlm, FAMILY, tiny_internvl_loaded, case, n_greedy=24)
    print(case.name, result)
    assert result["max_abs_logit_diff"] <= LOGIT_ATOL["F32"], result
    assert result["greedy_equal"] and result["greedy_tokens"] == 24, result


def test_the_thumbnail_goes_after_the_tiles(f32_vlm, tiny_internvl_loaded, monkeypatch):
    """InternVL's layout puts the thumbnail last (SmolVLM2 and AnyRes put their global view first): with the same
    views and tokens in the other order, the logits move far beyond the tolerance."""
    case = PARITY_CASES[0]
    reference = FAMILY.reference_logits(tiny_internvl_loaded, case.prompt, case.images())
    ours = f32_vlm.prompt_logits(case.prompt, case.images())
    layout = TilesInternVL.layout

    def thumbnail_first(spec, grid, width, height):
        start, *views, end = layout(spec, grid, width, height)
        return [start, views[-1], *views[:-1], end]

    monkeypatch.setattr(TilesInternVL, "layout", thumbnail_first)
    swapped = f32_vlm.prompt_logits(case.prompt, case.images())
    good, dropped = float(np.abs(ours - reference).max()), float(np.abs(swapped - reference).max())
    print(f"max abs logit diff vs transformers: thumbnail last {good:.4f}, thumbnail first {dropped:.4f}")
    assert good <= LOGIT_ATOL["F32"] < dropped / 5


def test_a_tile_cap_is_the_processors_max_patches(tiny_internvl_bundles, tiny_internvl_loaded):
    """With `max_tiles` = 2 a wide image gets the grid (and logits) of the processor with max_patches = 2."""
    import torch

    image = random_image(100, 300, seed=3)  # 1x3 tiles + thumbnail uncapped; 1x2 + thumbnail with 2
    prompt, loaded = "What is it?", tiny_internvl_loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = internvl_processor(loaded.tokenizer, loaded.preprocessing, max_patches=2)(text=text, images=[image], return_tensors="pt")  # fmt: skip
    assert inputs["pixel_values"].shape[0] == 3
    with torch.no_grad():
        reference = loaded.model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits[0].numpy()
    with edgevlm.load(tiny_internvl_bundles["F32"], n_ctx=1024, n_threads=1, max_tiles=2) as vlm:
        plan = vlm.plan(prompt, [image])
        assert [span.tile.view for span in plan.spans] == ["tile", "tile", "global"]
        assert plan.spans[0].tiling == TileGrid(1, 2) and plan.spans[0].limited_by == "max_tiles"
        ours = vlm.prompt_logits(prompt, [image])
    assert ours.shape == reference.shape
    assert float(np.abs(ours - reference).max()) <= LOGIT_ATOL["F32"]
    with edgevlm.load(tiny_internvl_bundles["F32"], n_ctx=1024, n_threads=1) as vlm:
        # a token limit picks the largest cap that fits: 3 views (48 tokens) fit 50, 4 views do not
        assert len(vlm.plan(prompt, [image], max_image_tokens=50).spans) == 3
        assert len(vlm.plan(prompt, [image], max_image_tokens=20).spans) == 1  # the image as one view


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_bundles_generate_and_agree(tiny_internvl_bundles, tiny_internvl_loaded, quant):
    path = tiny_internvl_bundles[quant]
    if quant == "Q4_K_M":
        assert read_gguf_tensor_types(path / "llm-Q4_K_M.gguf")["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    with edgevlm.load(path, n_ctx=2048, n_threads=1, vision_dtype="fp32") as vlm:  # the LLM's quantization only
        agreements = [compare_case(vlm, FAMILY, tiny_internvl_loaded, case, n_greedy=8)["top1_agreement"] for case in PARITY_CASES]  # fmt: skip
        print(f"{quant} top-1 agreement with transformers per case: {[round(a, 3) for a in agreements]}")
        assert min(agreements) >= TOP1_FLOOR[quant]
    with edgevlm.load(path, n_ctx=1024, n_threads=1, vision_dtype="int8") as vlm:
        steps = list(vlm.generate("Describe it.", images=PARITY_CASES[1].images(), max_tokens=4))
        assert steps[-1].finish_reason in ("stop", "length")
        assert steps[-1].timings.n_image_tokens == (7 + 4) * N_TOKENS  # 6 tiles + thumbnail, 3 tiles + thumbnail


def test_cli_export_run_and_server(tiny_internvl_dir, tiny_internvl_bundles, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "bundle"
    # --f32: with F16 weights the tiny model's greedy continuation of the one-image case meets a near tie after 16
    # tokens (logits within 0.0103 of transformers')
    subprocess.run([sys.executable, "-m", "edgevlm.cli", "export", str(tiny_internvl_dir), "-o", str(out), "--f32", "--verify"],
                   check=True, env=env, timeout=300, capture_output=True)  # fmt: skip
    image = tmp_path / "x.png"
    random_image(200, 300).save(image)
    run = subprocess.run([sys.executable, "-m", "edgevlm.cli", "run", str(out), "--image", str(image), "-p", "Hi",
                          "--max-new-tokens", "3", "--n-ctx", "1024"], env=env, timeout=120, capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    with edgevlm_serve(tiny_internvl_bundles["Q8_0"]) as (base, _):
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(random_frame(3, (40, 170)))}},
                                                          {"type": "text", "text": "What is it?"}]}], "max_tokens": 3}  # fmt: skip
        reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["finish_reason"] in ("stop", "length"), reply
        assert reply["usage"]["prompt_tokens"] > 3 * N_TOKENS, reply  # 40x170: 4 tiles + thumbnail
