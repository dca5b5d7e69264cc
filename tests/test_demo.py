"""The packaged demo VLM: scenes, its tokenizer in llama.cpp, accuracy of its bundles, and `edgevlm demo`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edgevlm.demo import MODEL_DIR, demo_bundle
from edgevlm.demo.evaluate import bundle_answers, held_out_scenes, reference_answers, score
from edgevlm.demo.scenes import COLORS, QUESTION_TYPES, SHAPES, scene, shape_map

N_SCENES = 100
REFERENCE_MIN_ACCURACY = 0.90  # the floor; measured: 0.96 on these 100 scenes (0.967 on 300)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A cache with the demo model's F16 and Q4_K_M bundles (fp32 + int8 vision), as `edgevlm demo` makes them."""
    pytest.importorskip("torch")
    cache = tmp_path_factory.mktemp("edgevlm-cache")
    for quantization in ("F16", "Q4_K_M"):
        demo_bundle(quantization, cache)
    return cache


def _bundle(cache, quantization):
    return demo_bundle(quantization, cache)[0]


ANSWERS = {"shape": set(SHAPES), "color": set(COLORS), "count": {"1", "2", "3"}, "position": {"left", "right"}}


def test_scenes_are_seeded_and_answerable():
    for i in range(40):
        s = scene(i, "test")
        again = scene(i, "test")
        assert (s.question, s.answer) == (again.question, again.answer)
        assert np.array_equal(np.asarray(s.image), np.asarray(again.image))
        assert s.answer in ANSWERS[s.question_type]
        assert all(112 <= side <= 224 for side in s.image.size)
    assert np.asarray(scene(0, "train").image).shape != np.asarray(scene(0, "test").image).shape or not np.array_equal(
        np.asarray(scene(0, "train").image), np.asarray(scene(0, "test").image)
    )
    with pytest.raises(ValueError, match="question type"):
        scene(0, "test", "size")


def test_shape_map_marks_the_drawn_shapes():
    """The trainer's per-token targets come from `shape_map`: its pixels must be where each shape was drawn."""
    for i in range(20):
        s = scene(i, "train")
        shapes = shape_map(s, s.image.size)
        pixels = np.asarray(s.image).astype(float)
        for k, shape in enumerate(s.shapes):
            inside = pixels[shapes == 1 + k]
            assert len(inside) > 0.5 * shape.radius**2  # the shape's area, not a few edge pixels
            assert np.abs(np.median(inside, axis=0) - COLORS[shape.color]).max() <= 21, (i, shape)


def test_training_targets_describe_the_scene():
    """The trainer's per-token targets (what its vision tower learns before the answers) must say what each scene
    shows: which kind has which color, on which side the other shape lies, where the shapes' centers are."""
    pytest.importorskip("torch")
    from edgevlm.demo.train import image_processor, subject, token_targets

    names = list(COLORS)
    scenes = [scene(i, "train", question_type) for i in range(10) for question_type in QUESTION_TYPES]
    grids = image_processor()(images=[s.image for s in scenes], return_tensors="pt")["image_grid_thw"]
    targets = token_targets(scenes, grids)
    sizes = (grids.prod(-1) // 4).tolist()
    per_scene = zip(*(targets[k].split(sizes) for k in ("kind_color", "side", "center")), strict=True)
    for s, (kind_color, side, center) in zip(scenes, per_scene, strict=True):
        pairs = {(SHAPES[(c - 1) // len(names)], names[(c - 1) % len(names)]) for c in kind_color.tolist() if c}
        assert pairs and pairs <= {(shape.kind, shape.color) for shape in s.shapes}, s
        assert 1 <= center.sum() <= len(s.shapes)
        assert ((side == -100) == (kind_color > 0)).all() == (len(s.shapes) != 2)
        if s.question_type == "position":
            named = s.shapes[subject(s)]
            class_ = 1 + SHAPES.index(named.kind) * len(names) + names.index(named.color)
            sides = set(side[kind_color == class_].tolist())
            # the other shape lies right of a subject on the left
            assert sides == {1 + ("right", "left").index(s.answer)}, s


def test_attention_targets_point_where_the_answer_is():
    """The answers stage leads two attention heads, at the token before the answer, to the question's words that
    name a shape and to the image tokens the answer is read from: the named shape's, the one shape's, or for a
    count the shapes' centers next to <|vision_start|>."""
    torch = pytest.importorskip("torch")
    from edgevlm.demo.train import Batcher, attention_targets, build_tokenizer, covering, image_processor, subject

    tokenizer = build_tokenizer()
    batcher = Batcher(tokenizer, image_processor())
    scenes = [scene(i, "train", question_type) for i in range(6) for question_type in QUESTION_TYPES]
    inputs = batcher(scenes)
    query, words, image = attention_targets(scenes, inputs, tokenizer)
    for b, (s, grid) in enumerate(zip(scenes, inputs["image_grid_thw"].tolist(), strict=True)):
        ids = inputs["input_ids"][b]
        assert inputs["labels"][b, query[b]] == -100 and inputs["labels"][b, query[b] + 1] != -100
        assert image[b].sum().item() == pytest.approx(1.0)
        image_positions = (ids == batcher.image_pad_id).nonzero()[:, 0]
        if s.question_type == "count":
            assert words[b].sum() == 0
            vision_start = int(image_positions[0]) - 1
            assert tokenizer.convert_ids_to_tokens(int(ids[vision_start])) == "<|vision_start|>"
            # the head's share on <|vision_start|> tells the count (no two centers share a token in these scenes)
            assert image[b, vision_start].item() == pytest.approx(1 / (1 + len(s.shapes)))
            led = [image_positions.tolist().index(p) for p in image[b].nonzero()[:, 0].tolist() if p != vision_start]
            assert {covering(s, grid, cover=1e-6)[i] for i in led} == set(range(len(s.shapes)))  # one per shape, on it
            continue
        index = 0 if s.question_type == "shape" else subject(s)
        on_shape = image_positions[torch.from_numpy(covering(s, grid) == index)]
        assert set(image[b].nonzero()[:, 0].tolist()) == set(on_shape.tolist())
        if s.question_type == "shape":
            assert words[b].sum() == 0
            continue
        named = s.shapes[index]
        assert tokenizer.decode(ids[words[b] > 0]).split() == ([named.kind] if s.question_type == "color" else [named.color, named.kind])  # fmt: skip
        assert words[b].sum().item() == pytest.approx(1.0)


def test_checkpoint_is_small_and_has_qwen2_vl_special_tokens():
    from transformers import AutoTokenizer

    from edgevlm.exporters.qwen2vl_gguf import special_token_ids

    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 25 * 2**20
    config = json.loads((MODEL_DIR / "config.json").read_text())
    ids = special_token_ids(AutoTokenizer.from_pretrained(MODEL_DIR))
    assert ids["image_pad"] == config["image_token_id"] and ids["vision_start"] == config["vision_start_token_id"]
    assert config["text_config"]["hidden_size"] % 256 == 0 and config["text_config"]["intermediate_size"] % 256 == 0


def test_llama_cpp_tokenizes_like_the_hf_tokenizer(demo_cache):
    from transformers import AutoTokenizer

    import edgevlm

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    texts = [s.question for s in held_out_scenes(40)] + ["What is 12 + 7?\n\nÉtoile, 星, 🙂 and  two  spaces"]
    texts.append(tokenizer.apply_chat_template([{"role": "user", "content": texts[0]}], tokenize=False, add_generation_prompt=True))  # fmt: skip
    vlm = edgevlm.load(_bundle(demo_cache, "F16"), n_ctx=512)
    try:
        for text in texts:
            assert vlm.llm.tokenize(text) == tokenizer(text).input_ids, text
    finally:
        vlm.close()


@pytest.mark.slow  # 7 s here, after the session fixture's two exports (about 25 s)
def test_bundles_answer_as_well_as_the_reference(demo_cache):
    scenes = held_out_scenes(N_SCENES)
    reference = score(reference_answers(MODEL_DIR, scenes), scenes)
    f16 = score(bundle_answers(_bundle(demo_cache, "F16"), scenes, "fp32"), scenes)
    q4 = score(bundle_answers(_bundle(demo_cache, "Q4_K_M"), scenes, "int8"), scenes)
    assert reference.accuracy >= REFERENCE_MIN_ACCURACY, reference
    assert f16.accuracy >= reference.accuracy - 0.01, (f16, reference)
    assert q4.accuracy >= reference.accuracy - 0.03, (q4, reference)


@pytest.mark.parametrize("question_type", QUESTION_TYPES)
def test_edgevlm_demo_answers_the_scene_it_drew(demo_cache, monkeypatch, capsys, question_type):
    from edgevlm.cli import main

    monkeypatch.setenv("EDGEVLM_CACHE", str(demo_cache))
    assert main(["demo", "--seed", "7", "--question-type", question_type]) == 0
    out, err = capsys.readouterr()
    assert "exporting the demo model" not in err  # only said when it exports
    fields = dict(re.findall(r"^(\w+): +(.*)$", out, flags=re.MULTILINE))
    drawn = scene(7, "demo", question_type)
    assert np.array_equal(np.asarray(Image.open(fields["image"]).convert("RGB")), np.asarray(drawn.image))
    assert fields["question"] == drawn.question
    expected, verdict = fields["expected"].split()
    assert expected == drawn.answer
    assert fields["answer"] in ANSWERS[question_type], out  # it answers the kind of question it was asked
    assert verdict == ("(correct)" if fields["answer"] == drawn.answer else "(wrong)")
    assert "exported" not in fields["bundle"]  # the fixture's bundle was reused, not exported again


def test_demo_with_a_cached_bundle_needs_no_torch(demo_cache):
    code = (
        "import sys; from pathlib import Path; from edgevlm.demo import run_demo\n"
        f"result = run_demo('Q4_K_M', seed=1, question_type='position', vision_dtype='int8', cache=Path({str(demo_cache)!r}))\n"
        "assert result.export_s == 0 and result.answer in {'left', 'right'}, result\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_resolves_the_demo_alias():
    from edgevlm.exporters.bundle_export import resolve_model

    model_dir, source, _ = resolve_model("demo")
    assert model_dir == MODEL_DIR and source == "edgevlm-demo"


def test_edgevlm_demo_says_when_it_exports_the_first_time(tmp_path):
    no_torch = tmp_path / "no-torch"
    (no_torch / "torch").mkdir(parents=True)
    (no_torch / "torch" / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    env = {**os.environ, "EDGEVLM_CACHE": str(tmp_path / "empty-cache"), "PYTHONPATH": os.pathsep.join([str(no_torch), *sys.path])}  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "edgevlm.cli", "demo"], env=env, check=False, capture_output=True, text=True)  # fmt: skip
    assert "edgevlm demo: exporting the demo model once (~30 s)" in result.stderr
    assert result.returncode == 2 and "exporting it needs torch" in result.stderr  # the export is what came next


def test_edgevlm_bench_warns_when_the_model_gives_fewer_image_tokens_than_asked(demo_cache):
    bundle = _bundle(demo_cache, "Q4_K_M")  # the demo model's pixel limit caps an image at 36 tokens
    command = [sys.executable, "-m", "edgevlm.cli", "bench", str(bundle), "--image-tokens", "16,64", "--runs", "1",
               "--no-baseline", "--max-tokens", "2", "--threads", "1"]  # fmt: skip
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| 16 | 112x112 |" in result.stdout and "| 36 (asked 64) | 224x224 |" in result.stdout
    assert "edgevlm bench: warning: asked for 64 image tokens, the model encoded 36" in result.stderr
    assert "asked for 16" not in result.stderr
