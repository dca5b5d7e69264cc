"""Token-budget planning: properties of the pure planner (hypothesis), agreement with the ONNX graph, the API and CLI."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import random_image
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import edgevlm
from edgevlm.budget import (
    BudgetLimits,
    Crop,
    ImageRequest,
    count_spans,
    fit_resize,
    model_token_range,
    plan_images,
    resolve_limits,
    tile_grid,
)  # fmt: skip
from edgevlm.bundle import MANIFEST_NAME, Bundle
from edgevlm.contract.kinds.preprocessing import MAX_ASPECT_RATIO, DynamicPatches, FixedResize, preprocess, smart_resize
from edgevlm.errors import BudgetError, ContextOverflowError, ImageError
from edgevlm.images import image_size, load_image

# Qwen2-VL-2B-Instruct's published pixel limits (up to 16384 tokens per image) and transformers' default (1280).
QWEN2_VL_2B = DynamicPatches(min_pixels=3136, max_pixels=12845056)
SPECS = [QWEN2_VL_2B, DynamicPatches()]
MAX_SIDE = 20000


@st.composite
def image_sizes(draw, max_ratio: float = MAX_ASPECT_RATIO) -> tuple[int, int]:
    """(width, height) from 1x1 to 20000x20000 with aspect ratio at most `max_ratio`, log-uniform-ish sides."""
    short = draw(st.one_of(st.integers(1, 64), st.integers(1, MAX_SIDE)))
    long = draw(st.integers(short, min(MAX_SIDE, math.floor(short * max_ratio))))
    return (long, short) if draw(st.booleans()) else (short, long)


@st.composite
def token_limits(draw, spec: DynamicPatches) -> BudgetLimits:
    model_min, model_max = model_token_range(spec)
    high = draw(st.none() | st.integers(model_min, 20000))
    low = draw(st.none() | st.integers(1, min(model_max, high or model_max)))
    budget = draw(st.none() | st.integers(1, 40000))
    return BudgetLimits(max_image_tokens=high, min_image_tokens=low, image_budget=budget)


@st.composite
def image_requests(draw) -> ImageRequest:
    width, height = draw(image_sizes())
    crop = None
    if draw(st.booleans()):
        x0, x1 = sorted(draw(st.tuples(st.floats(0, 1), st.floats(0, 1))))
        y0, y1 = sorted(draw(st.tuples(st.floats(0, 1), st.floats(0, 1))))
        assume(x1 - x0 > 1e-3 and y1 - y0 > 1e-3)
        crop = Crop(x0, y0, x1, y1, relative=True)
        box = crop.pixel_box(width, height)
        w, h = box[2] - box[0], box[3] - box[1]
        assume(max(w, h) / min(w, h) <= MAX_ASPECT_RATIO)
    return ImageRequest(width, height, crop=crop, tiles=draw(st.sampled_from([0, 0, 1, 2, 4, 6])))


PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------- properties


@PROPERTY_SETTINGS
@given(data=st.data(), spec=st.sampled_from(SPECS))
def test_one_image_stays_within_its_limits_and_the_model_geometry(data, spec):
    width, height = data.draw(image_sizes())
    limits = data.draw(token_limits(spec))
    low = max(limits.min_image_tokens or 0, model_token_range(spec)[0])
    high = min(x for x in (limits.max_image_tokens, limits.image_budget, math.inf) if x is not None)
    if low > high:  # only the image budget can fall below the floor; max < min is refused when limits are made
        with pytest.raises(BudgetError, match=rf"1 x {low} = {low} tokens.*image_budget >= {low}"):
            plan_images([ImageRequest(width, height)], spec, limits)
        return
    plan = plan_images([ImageRequest(width, height)], spec, limits)
    (span,) = plan.spans
    assert low <= span.n_tokens <= high
    assert span.resized_size[0] % spec.factor == 0 and span.resized_size[1] % spec.factor == 0
    assert span.grid[1] % spec.merge_size == 0 and span.grid[2] % spec.merge_size == 0
    assert span.n_tokens == span.grid[1] * span.grid[2] // spec.merge_size**2
    assert plan == plan_images([ImageRequest(width, height)], spec, limits)  # deterministic
    native = smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
    native_tokens = (native[0] // spec.factor) * (native[1] // spec.factor)
    if low <= native_tokens <= high:
        assert span.resized_size == native and span.limited_by is None


@PROPERTY_SETTINGS
@given(size=image_sizes(), spec=st.sampled_from(SPECS))
def test_without_limits_the_plan_is_the_model_resize(size, spec):
    width, height = size
    (span,) = plan_images([ImageRequest(width, height)], spec).spans
    assert span.resized_size == smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
    assert span.limited_by is None and span.box == (0, 0, width, height)


@PROPERTY_SETTINGS
@given(
    data=st.data(),
    requests=st.lists(image_requests(), max_size=4),
    n_ctx=st.none() | st.integers(256, 32768),
    n_prompt=st.integers(0, 600),
    max_new=st.integers(0, 2048),
)
def test_several_images_share_the_budget_and_leave_room_in_the_context(data, requests, n_ctx, n_prompt, max_new):
    spec = QWEN2_VL_2B
    limits = data.draw(token_limits(spec))
    n_spans = count_spans(requests, spec)
    low = max(limits.min_image_tokens or 0, model_token_range(spec)[0])
    room = None if n_ctx is None else n_ctx - n_prompt - max_new
    caps = [c for c in (limits.image_budget, room) if c is not None]
    if n_spans and caps and n_spans * low > min(caps):  # without images there is nothing to refuse here
        error = ContextOverflowError if room is not None and min(caps) == room else BudgetError
        with pytest.raises(error, match=rf"{n_spans} x {low} = {n_spans * low} tokens"):
            plan_images(requests, spec, limits, n_ctx=n_ctx, n_prompt_tokens=n_prompt, max_new_tokens=max_new)
        return
    plan = plan_images(requests, spec, limits, n_ctx=n_ctx, n_prompt_tokens=n_prompt, max_new_tokens=max_new)
    assert len(plan.spans) == n_spans
    if caps and n_spans:
        assert plan.n_image_tokens <= min(caps)
    if n_ctx is not None and n_spans:
        assert n_prompt + plan.n_image_tokens + max_new <= n_ctx
    for span in plan.spans:
        assert low <= span.n_tokens <= (limits.max_image_tokens or math.inf)
        assert span.grid[1] % spec.merge_size == 0 and span.grid[2] % spec.merge_size == 0
        left, top, right, bottom = span.box
        request = requests[span.image_index]
        assert 0 <= left < right <= request.width and 0 <= top < bottom <= request.height


@st.composite
def too_thin_sizes(draw) -> tuple[int, int]:
    short = draw(st.integers(1, (MAX_SIDE - 1) // MAX_ASPECT_RATIO))
    long = draw(st.integers(short * MAX_ASPECT_RATIO + 1, MAX_SIDE))
    return (long, short) if draw(st.booleans()) else (short, long)


@settings(max_examples=100, deadline=None)
@given(size=too_thin_sizes(), spec=st.sampled_from(SPECS))
def test_beyond_the_aspect_ratio_limit_is_a_clear_error(size, spec):
    width, height = size
    with pytest.raises(ImageError, match=r"aspect ratio .* above Qwen2-VL's limit of 200.*Crop it"):
        plan_images([ImageRequest(width, height)], spec, BudgetLimits(max_image_tokens=256))


def test_a_strip_at_the_aspect_limit_is_clamped_to_the_token_cap():
    # smart_resize keeps one row of tokens and overshoots any cap for such strips; the plan stays within it
    assert smart_resize(100, 20000, 28, 3136, 64 * 784) == (28, 113 * 28)
    assert fit_resize(100, 20000, QWEN2_VL_2B, 4, 64) == (28, 64 * 28)
    assert fit_resize(20000, 100, QWEN2_VL_2B, 4, 64) == (64 * 28, 28)


# --------------------------------------------------------------------------------------------------- examples


def test_a_12_megapixel_photo():
    photo = [ImageRequest(4032, 3024)]
    assert plan_images(photo, QWEN2_VL_2B).spans[0].n_tokens == 15552  # the ">15,000 tokens"
    for cap, tokens in ((64, 63), (256, 252), (1024, 1008), (4096, 4088)):
        (span,) = plan_images(photo, QWEN2_VL_2B, BudgetLimits(max_image_tokens=cap)).spans
        assert span.n_tokens == tokens and span.limited_by == "max_image_tokens"
        height, width = span.resized_size
        assert abs(width / height - 4 / 3) < 0.05


def test_area_shares_with_floors():
    spec = QWEN2_VL_2B
    big, small = ImageRequest(4032, 3024), ImageRequest(640, 480)
    plan = plan_images([big, small], spec, BudgetLimits(image_budget=1000, min_image_tokens=64))
    assert plan.n_image_tokens <= 1000
    big_tokens, small_tokens = (span.n_tokens for span in plan.spans)
    assert small_tokens >= 64  # its area share (about 25) is below the floor
    assert big_tokens > 800 and {s.limited_by for s in plan.spans} == {"image_budget"}
    # budget not binding: each keeps its own plan
    plan = plan_images([small, small], spec, BudgetLimits(image_budget=10000))
    assert [s.n_tokens for s in plan.spans] == [391, 391] and plan.spans[0].limited_by is None


def test_limits_resolve_by_precedence_and_name_their_layer():
    limits = resolve_limits(
        request=BudgetLimits(max_image_tokens=128),
        cli=BudgetLimits(max_image_tokens=256, image_budget=2000),
        profile=BudgetLimits(image_budget=1000, min_image_tokens=16),
        bundle=BudgetLimits(max_image_tokens=1024, min_image_tokens=8),
    )
    assert (limits.max_image_tokens, limits.image_budget, limits.min_image_tokens) == (128, 2000, 16)
    assert limits.describe("image_budget") == "image_budget=2000 (cli)"
    assert limits.describe("min_image_tokens") == "min_image_tokens=16 (profile)"
    assert resolve_limits(bundle=BudgetLimits(max_image_tokens=1024)).describe("max_image_tokens") == "max_image_tokens=1024 (bundle)"  # fmt: skip
    # a minimum lifts a lower layer's maximum, and is refused against its own layer's or a higher one's
    lifted = resolve_limits(request=BudgetLimits(min_image_tokens=2000), profile=BudgetLimits(max_image_tokens=256))
    assert (lifted.min_image_tokens, lifted.max_image_tokens) == (2000, 2000)
    assert lifted.describe("max_image_tokens") == "max_image_tokens=2000 (request)"
    with pytest.raises(BudgetError, match=r"min_image_tokens=2000 \(from profile\) is above max_image_tokens=1024 \(from cli\)"):  # fmt: skip
        resolve_limits(cli=BudgetLimits(max_image_tokens=1024), profile=BudgetLimits(min_image_tokens=2000))
    with pytest.raises(BudgetError, match=r"min_image_tokens=300 is above max_image_tokens=200"):  # one layer
        resolve_limits(request=BudgetLimits(min_image_tokens=300, max_image_tokens=200))
    for bad in (0, -5, 1.5, True, "64"):
        with pytest.raises(BudgetError, match="positive whole number"):
            BudgetLimits(max_image_tokens=bad)


def test_limits_against_the_model_and_budget_errors_name_the_numbers():
    spec = DynamicPatches()  # at most 1280 tokens per image
    photo = ImageRequest(4032, 3024)
    with pytest.raises(BudgetError, match=r"min_image_tokens=2000 \(cli\) is above this model's maximum of 1280"):
        plan_images([photo], spec, resolve_limits(cli=BudgetLimits(min_image_tokens=2000)))
    with pytest.raises(BudgetError, match=r"max_image_tokens=2 \(request\) is below this model's minimum of 4"):
        plan_images([photo], spec, BudgetLimits(max_image_tokens=2))
    with pytest.raises(ContextOverflowError) as error:
        plan_images([photo, photo], spec, resolve_limits(cli=BudgetLimits(min_image_tokens=1000)),
                    n_ctx=2048, n_prompt_tokens=30, max_new_tokens=256)  # fmt: skip
    message = str(error.value)
    for part in ("2 x 1000 = 2000 tokens", "min_image_tokens=1000 (cli)", "2048 - 30 prompt tokens - 256 max_tokens = 1762",  # fmt: skip
                 "max_tokens <= 18", "n_ctx >= 2286", "min_image_tokens <= 881"):  # fmt: skip
        assert part in message, message
    with pytest.raises(BudgetError, match=r"5 image span\(s\) need at least 5 x 4 = 20 tokens .* image_budget=10 \(bundle\).* image_budget >= 20"):  # fmt: skip
        plan_images([ImageRequest(4032, 3024, tiles=4)], spec, resolve_limits(bundle=BudgetLimits(image_budget=10)))


def test_crops():
    assert Crop.parse("0.25,0.5,0.75,1").pixel_box(400, 300) == (100, 150, 300, 300)
    assert Crop.parse("0,0,1,1").relative  # all in [0, 1]: fractions
    assert Crop.parse("10,20,110,220").pixel_box(100, 1000) == (10, 20, 100, 220)  # clipped to the image
    for text, message in (("1,2,3", "expected left,top,right,bottom"), ("5,5,2,9", "right must be > left")):
        with pytest.raises(BudgetError, match=message):
            Crop.parse(text)
    with pytest.raises(BudgetError, match="lies outside the 100x100 image"):
        Crop(200, 200, 300, 300).pixel_box(100, 100)
    (span,) = plan_images([ImageRequest(4032, 3024, crop=Crop(1000, 1000, 1448, 1336))], QWEN2_VL_2B).spans
    assert span.view == "crop" and span.box == (1000, 1000, 1448, 1336)
    assert span.resized_size == smart_resize(336, 448, 28, 3136, 12845056)  # full resolution when it fits


def test_tiles():
    assert tile_grid(4032, 3024, 4, 28) == (2, 2)
    assert tile_grid(4032, 3024, 3, 28) == (1, 3)
    assert tile_grid(3024, 4032, 3, 28) == (3, 1)
    assert tile_grid(40, 40, 4, 28) == (1, 1)  # tiles smaller than one token are not made
    plan = plan_images([ImageRequest(4032, 3024, tiles=4)], QWEN2_VL_2B, BudgetLimits(max_image_tokens=1024, image_budget=3000))  # fmt: skip
    assert [s.view for s in plan.spans] == ["global", "tile", "tile", "tile", "tile"]
    assert plan.spans[0].box == (0, 0, 4032, 3024)
    assert [s.box for s in plan.spans[1:]] == [(0, 0, 2016, 1512), (2016, 0, 4032, 1512), (0, 1512, 2016, 3024), (2016, 1512, 4032, 3024)]  # fmt: skip
    assert plan.n_image_tokens <= 3000
    # one tile would be the image itself: no global view is added
    assert [s.view for s in plan_images([ImageRequest(40, 40, tiles=4)], QWEN2_VL_2B).spans] == ["full"]


def test_estimates_grow_with_tokens():
    from edgevlm.budget import VisionTowerSize

    tower = VisionTowerSize(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4, patch_dim=1176, merge_size=2, out_dim=1536)  # fmt: skip
    plans = [plan_images([ImageRequest(4032, 3024)], QWEN2_VL_2B, BudgetLimits(max_image_tokens=cap), tower=tower) for cap in (256, 1024)]  # fmt: skip
    small, large = (p.spans[0] for p in plans)
    assert large.activation_bytes > 10 * small.activation_bytes  # attention: quadratic in tokens
    assert 2 * 16 * large.n_patches**2 * 4 < large.activation_bytes < 8 * 16 * large.n_patches**2 * 4
    assert plans[1].encode_seconds(100.0) == pytest.approx(large.encode_flops / 100e9)


def test_image_size_reads_headers_like_load_image(tmp_path):
    from PIL import Image

    photo = Image.new("RGB", (400, 300), (10, 20, 30))
    exif = photo.getexif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees to show
    path = tmp_path / "sideways.jpg"
    photo.save(path, exif=exif)
    assert image_size(path) == load_image(path).size == (300, 400)
    assert image_size(np.zeros((5, 7, 3), np.uint8)) == (7, 5)
    with pytest.raises(ImageError, match="not found"):
        image_size(tmp_path / "missing.jpg")


# --------------------------------------------------------------------------------------------------- the graph


ONNX_CASES = [
    ("tiny", ImageRequest(1, 1), BudgetLimits()),
    ("thin", ImageRequest(13, 700), BudgetLimits(max_image_tokens=32)),
    ("strip at the limit", ImageRequest(5600, 28), BudgetLimits(max_image_tokens=40)),
    ("photo 64", ImageRequest(1008, 756), BudgetLimits(max_image_tokens=64)),
    ("photo 256", ImageRequest(1008, 756), BudgetLimits(max_image_tokens=256)),
    ("upscaled", ImageRequest(60, 45), BudgetLimits(min_image_tokens=30)),
    ("crop pixels", ImageRequest(1008, 756, crop=Crop(100, 50, 500, 350)), BudgetLimits(max_image_tokens=48)),
    ("crop relative", ImageRequest(1008, 756, crop=Crop(0.5, 0, 1, 0.5, relative=True)), BudgetLimits()),
    ("tiles 4", ImageRequest(1008, 756, tiles=4), BudgetLimits(max_image_tokens=100, image_budget=300)),
    ("tiles 3 tall", ImageRequest(300, 900, tiles=3), BudgetLimits(max_image_tokens=60)),
]


@pytest.fixture(scope="module")
def tiny_vision(tiny_bundles):
    from edgevlm.runtimes.vision import VisionEncoder

    bundle = Bundle.open(tiny_bundles["F32"])
    spec = bundle.manifest.preprocessing
    return spec, VisionEncoder(bundle.file("vision.onnx"), intra_op_threads=2, merge_size=spec.merge_size)


@pytest.mark.parametrize(("request_", "limits"), [c[1:] for c in ONNX_CASES], ids=[c[0] for c in ONNX_CASES])
def test_planned_tokens_equal_the_embeddings_the_graph_returns(tiny_vision, request_, limits):
    spec, encoder = tiny_vision
    image = random_image(request_.height, request_.width)
    plan = plan_images([request_], spec, limits)
    for span in plan.spans:
        prepared = preprocess(image.crop(span.box), spec, resized_size=span.resized_size)
        assert prepared.grid == span.grid
        embeddings = encoder.encode(prepared.pixel_patches, prepared.grid)
        assert embeddings.shape[0] == span.n_tokens == prepared.n_tokens


# --------------------------------------------------------------------------------------------------- API and CLI


@pytest.fixture(scope="module")
def tiny_vlm(tiny_bundles):
    vlm = edgevlm.load(tiny_bundles["F32"], n_ctx=2048, max_image_tokens=200)
    yield vlm
    vlm.close()


def test_generate_follows_the_plan_and_request_limits_win(tiny_vlm):
    photo = random_image(756, 1008)
    plan = tiny_vlm.plan("Describe it.", [photo], max_tokens=4)
    assert plan.limits.describe("max_image_tokens") == "max_image_tokens=200 (cli)"  # load() argument beats the bundle's 1024
    steps = list(tiny_vlm.generate("Describe it.", [photo], max_tokens=4))
    assert steps[-1].timings.n_image_tokens == plan.n_image_tokens == 192
    steps = list(tiny_vlm.generate("Describe it.", [photo], max_tokens=4, max_image_tokens=64))
    assert steps[-1].timings.n_image_tokens == 63  # the request beats the load() argument


def test_tiles_and_crops_become_image_spans(tiny_vlm):
    photo = random_image(756, 1008)
    plan = tiny_vlm.plan("Read the sign.", [photo], tiles=4, image_budget=400, max_tokens=4)
    assert len(plan.spans) == 5 and plan.n_image_tokens <= 400
    rendered = tiny_vlm.render_prompt("Read the sign.", len(plan.spans))
    assert rendered.count("<|vision_start|><|image_pad|><|vision_end|>") == 5
    steps = list(tiny_vlm.generate("Read the sign.", [photo], tiles=4, image_budget=400, max_tokens=4))
    assert steps[-1].timings.n_image_tokens == plan.n_image_tokens
    crop = Crop(0.25, 0.25, 0.5, 0.5, relative=True)
    steps = list(tiny_vlm.generate("Read the sign.", [photo], crop=crop, max_tokens=4))
    assert steps[-1].timings.n_image_tokens == tiny_vlm.plan("Read the sign.", [photo], crop=crop).n_image_tokens == 63


def test_contradicting_limits_fail_before_loading(tiny_bundles, monkeypatch):
    from edgevlm.runtimes import pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the limits were checked")

    monkeypatch.setattr(pipeline, "VisionEncoder", no_loading)
    monkeypatch.setattr(pipeline, "LlamaLM", no_loading)
    with pytest.raises(BudgetError, match=r"min_image_tokens=600 is above max_image_tokens=500"):
        edgevlm.load(tiny_bundles["F32"], min_image_tokens=600, max_image_tokens=500)
    # a minimum lifts the profile's and the bundle's default maximum, up to the model's own
    with pytest.raises(BudgetError, match=r"min_image_tokens=2000 \(cli\) is above this model's maximum of 1280"):
        edgevlm.load(tiny_bundles["F32"], min_image_tokens=2000)
    with pytest.raises(BudgetError, match=r"min_image_tokens=1500 \(cli\) is above this model's maximum of 1280"):
        edgevlm.load(tiny_bundles["F32"], min_image_tokens=1500, max_image_tokens=1500)
    with pytest.raises(BudgetError, match="positive whole number"):
        edgevlm.load(tiny_bundles["F32"], image_budget=0)


def test_images_shrink_to_leave_room_for_the_answer(tiny_bundles):
    vlm = edgevlm.load(tiny_bundles["F32"], n_ctx=256)  # llama.cpp's smallest context
    try:
        photo = random_image(600, 800)  # 609 tokens at the model's own size
        steps = list(vlm.generate("Describe it.", [photo], max_tokens=100))
        timings = steps[-1].timings
        assert timings.n_prompt_tokens + 100 <= 256  # text and image tokens
        assert timings.n_image_tokens > 100
        # more than the context holds beside the image: accepted as with text alone, the image at its fewest tokens
        timings = list(vlm.generate("Describe it.", [photo], max_tokens=250, temperature=0))[-1].timings
        assert timings.n_image_tokens == 4
    finally:
        vlm.close()


def test_manifest_budget_section_and_tower_sizes(tiny_bundles, tmp_path):
    manifest = json.loads((tiny_bundles["F32"] / MANIFEST_NAME).read_text())
    assert manifest["budget"] == {"max_image_tokens": 1024, "min_image_tokens": None, "image_budget": None}
    vision = manifest["vision"]
    assert (vision["embed_dim"], vision["depth"], vision["num_heads"], vision["mlp_ratio"]) == (64, 2, 4, 4.0)
    # a manifest from before the budget section and tower sizes still loads, with the default limits
    old = shutil.copytree(tiny_bundles["F32"], tmp_path / "old")
    del manifest["budget"]
    for key in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
        del manifest["vision"][key]
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    bundle = Bundle.open(old)
    assert bundle.manifest.budget == BudgetLimits(max_image_tokens=1024)
    assert bundle.manifest.vision.embed_dim is None
    manifest["budget"] = {"max_image_tokens": 512, "max_tokens": 3}
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(edgevlm.BundleError, match="unknown key.*max_tokens"):
        Bundle.open(old)


def _edgevlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgevlm.cli", *args], capture_output=True, text=True, timeout=300)


def test_plan_command_needs_no_model(tiny_bundles, tmp_path):
    photo = tmp_path / "photo.jpg"
    random_image(3024, 4032).save(photo)
    code = (
        "import sys\nfrom edgevlm.cli import main\n"
        f"rc = main(['plan', {str(tiny_bundles['Q4_K_M'])!r}, '--image', {str(photo)!r}, '--max-image-tokens', '256', '--tiles', '4'])\n"  # fmt: skip
        # the hardware profile's auto-detection asks onnxruntime and llama.cpp what they support; no session or model
        "loaded = sorted(m for m in ('edgevlm.runtimes.pipeline', 'edgevlm.runtimes.vision', 'torch') if m in sys.modules)\n"
        "assert rc == 0 and not loaded, (rc, loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "4032x3024" in out and "global" in out and out.count("tile ") == 4
    assert "max_image_tokens=256 (cli)" in out and "est. memory" in out and "GFLOP/s" in out

    result = _edgevlm("plan", str(tiny_bundles["Q4_K_M"]), "--image", str(photo), "--image", str(photo),
                      "--min-image-tokens", "1000", "--n-ctx", "2048")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "2 x 1000 = 2000 tokens" in result.stderr and "n_ctx >= 2256" in result.stderr


def test_run_command_budget_flags(tiny_bundles, tmp_path):
    photo = tmp_path / "photo.png"
    random_image(300, 400).save(photo)
    result = _edgevlm("run", str(tiny_bundles["Q4_K_M"]), "--image", str(photo), "-p", "What is this?",
                      "--max-new-tokens", "2", "--stats", "--max-image-tokens", "64")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "image tokens 63" in result.stderr  # 154 at the model's own size
    result = _edgevlm("run", str(tiny_bundles["Q4_K_M"]), "--image", str(photo), "-p", "hi", "--crop", "1,2,3")
    assert result.returncode == 2 and "left,top,right,bottom" in result.stderr
    result = _edgevlm("plan", str(tiny_bundles["Q4_K_M"]), "--image", str(photo), "--tiles", "0")
    assert result.returncode == 2 and "K >= 1" in result.stderr


# ------------------------------------------------------------------------------------------- pan-and-scan (Gemma 3)

GEMMA_3 = {"crop_size": 896, "shortest_edge": 896, "patch_size": 14, "merge_size": 4, "resize": "square",
           "resample": "bilinear", "tiling": "pan-and-scan"}  # fmt: skip


@pytest.mark.parametrize(("spec_keys", "tiles"), [({}, 1), ({"pan_and_scan_max_crops": 1}, 4)])
def test_one_pan_and_scan_crop_is_no_tiling(spec_keys, tiles):
    """A single crop would be the region itself: encoded once, as the grid tiling does, not twice (512 tokens)."""
    plan = plan_images([ImageRequest(1600, 800, tiles=tiles)], FixedResize(**GEMMA_3, **spec_keys), BudgetLimits())
    assert [(span.view, span.box) for span in plan.spans] == [("full", (0, 0, 1600, 800))]


def test_pan_and_scan_plans_no_empty_crop():
    """ceil(9 / 4) = 3-pixel crops leave nothing for a fourth: it is dropped, not planned as a 0-pixel image."""
    plan = plan_images([ImageRequest(9, 2, tiles=4)], FixedResize(**GEMMA_3, pan_and_scan_min_crop_size=1), BudgetLimits())  # fmt: skip
    assert [span.box for span in plan.spans if span.view == "tile"] == [(0, 0, 3, 2), (3, 0, 6, 2), (6, 0, 9, 2)]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("resample", [], "resample=[]: expected one of bicubic, bilinear"),
    ("tiling", {"a": 1}, "tiling={'a': 1}: expected one of grid, pan-and-scan"),
    ("resize", None, "resize=None: expected one of shortest-edge, square"),
    ("pan_and_scan_max_crops", 10**6, "pan_and_scan_max_crops=1000000: expected at most 64"),
])  # fmt: skip
def test_fixed_resize_settings_of_the_wrong_kind_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FixedResize(**GEMMA_3 | {key: value})
