"""Image loading (edgevlm.images: errors, RGB conversion) and the `dynamic-patches` preprocessing, checked against
transformers."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edgevlm.contract.kinds.preprocessing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    DynamicPatches,
    PreparedImage,
    preprocess,
    smart_resize,
)
from edgevlm.errors import ImageError
from edgevlm.images import load_image

transformers = pytest.importorskip("transformers")
from transformers import Qwen2VLImageProcessorPil
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

ATOL = 1e-5
SIZES = [  # (height, width)
    (1, 1),
    (10, 10),
    (28, 28),
    (20, 1000),
    (1000, 20),
    (3000, 2000),  # max_pixels binds
    (333, 517),
    (57, 111),
    (5, 900),  # aspect 180: min_pixels binds on a thin strip
]


def _reference(processor: Qwen2VLImageProcessorPil, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
    out = processor(image, return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def _assert_matches(prepared: PreparedImage, reference: tuple[np.ndarray, tuple[int, int, int]]) -> None:
    pixels, grid = reference
    assert prepared.grid == grid
    assert prepared.pixel_patches.dtype == np.float32
    assert prepared.pixel_patches.shape == pixels.shape
    assert float(np.max(np.abs(prepared.pixel_patches - pixels))) <= ATOL


@pytest.fixture(scope="module")
def default_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil()


# --------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_preprocess_matches_transformers_defaults(default_processor, height, width):
    image = random_image(height, width, seed=height + width)
    prepared = preprocess(load_image(image), DynamicPatches())
    _assert_matches(prepared, _reference(default_processor, image))
    assert prepared.n_tokens == prepared.grid[1] * prepared.grid[2] // 4


@pytest.mark.parametrize(("height", "width"), [(100, 100), (800, 1200), (37, 501), (1000, 20)])
def test_preprocess_matches_transformers_custom_pixels(height, width):
    min_pixels, max_pixels = 128 * 28 * 28, 256 * 28 * 28
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    spec = DynamicPatches(min_pixels=min_pixels, max_pixels=max_pixels)
    image = random_image(height, width, seed=3)
    prepared = preprocess(image, spec)
    _assert_matches(prepared, _reference(processor, image))
    assert 128 <= prepared.n_tokens <= 256


def test_preprocess_matches_transformers_other_geometry_and_normalization():
    half = (0.5, 0.5, 0.5)
    kwargs = dict(patch_size=16, merge_size=2, temporal_patch_size=1, image_mean=half, image_std=half)
    processor = Qwen2VLImageProcessorPil(**kwargs)
    spec = DynamicPatches(**kwargs)
    image = random_image(301, 199, seed=9)
    prepared = preprocess(image, spec)
    assert prepared.pixel_patches.shape[1] == 3 * 1 * 16 * 16
    _assert_matches(prepared, _reference(processor, image))


def test_preprocess_from_real_qwen2_vl_config_matches_transformers():
    # Qwen2-VL-2B-Instruct's preprocessor_config.json: its max_pixels is far above the class default.
    cfg = {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }
    spec = DynamicPatches.from_preprocessor_config(cfg)
    assert (spec.min_pixels, spec.max_pixels) == (3136, 12845056)
    hf_kwargs = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")}
    image = random_image(700, 500, seed=5)
    _assert_matches(preprocess(image, spec), _reference(Qwen2VLImageProcessorPil(**hf_kwargs), image))


def test_resized_size_overrides_smart_resize():
    spec = DynamicPatches()
    image = random_image(300, 400, seed=1)
    chosen = smart_resize(300, 400, spec.factor, spec.min_pixels, spec.max_pixels)
    default = preprocess(image, spec)
    same = preprocess(image, spec, resized_size=chosen)
    np.testing.assert_array_equal(default.pixel_patches, same.pixel_patches)
    small = preprocess(image, spec, resized_size=(56, 112))
    assert small.grid == (1, 4, 8)
    assert small.n_tokens == 8
    assert small.pixel_patches.shape == (32, 1176)


@pytest.mark.parametrize("bad", [(50, 56), (56, 0), (-28, 56), (56,), (28.0, 56)])
def test_resized_size_must_be_multiples_of_factor(bad):
    with pytest.raises(ValueError, match="resized_size"):
        preprocess(random_image(40, 40), DynamicPatches(), resized_size=bad)


def test_prepared_image_checks_grid_against_rows():
    with pytest.raises(ValueError, match="does not match grid"):
        PreparedImage(pixel_patches=np.zeros((5, 1176), np.float32), grid=(1, 2, 2), merge_size=2)


# --------------------------------------------------------------------------------------------- smart_resize


@settings(max_examples=400, deadline=None)
@given(
    height=st.integers(1, 6000),
    width=st.integers(1, 6000),
    factor=st.sampled_from([28, 32]),
    pixel_bounds=st.sampled_from([(56 * 56, 28 * 28 * 1280), (3136, 12845056), (128 * 28 * 28, 256 * 28 * 28)]),
)
def test_smart_resize_equals_transformers(height, width, factor, pixel_bounds):
    min_pixels, max_pixels = pixel_bounds
    try:
        expected = hf_smart_resize(height, width, factor, min_pixels, max_pixels)
    except ValueError:
        with pytest.raises(ImageError, match="aspect ratio"):
            smart_resize(height, width, factor, min_pixels, max_pixels)
        assert max(height, width) / min(height, width) > 200
        return
    assert smart_resize(height, width, factor, min_pixels, max_pixels) == expected


def test_smart_resize_aspect_ratio_limit_is_a_clear_value_error():
    assert smart_resize(5, 1000) == hf_smart_resize(5, 1000)  # exactly 200 is allowed
    with pytest.raises(ValueError, match=r"aspect ratio 201\.0.*limit of 200.*Crop"):
        smart_resize(5, 1005)
    with pytest.raises(ImageError, match="no pixels"):
        smart_resize(0, 10)


# --------------------------------------------------------------------------------------------- spec


def test_spec_round_trips_through_json():
    spec = DynamicPatches(min_pixels=1000, max_pixels=200_000)
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["kind"] == "dynamic-patches"
    assert DynamicPatches.from_dict(data) == spec
    assert DynamicPatches().image_mean == tuple(transformers.image_utils.OPENAI_CLIP_MEAN) == OPENAI_CLIP_MEAN
    assert DynamicPatches().image_std == tuple(transformers.image_utils.OPENAI_CLIP_STD) == OPENAI_CLIP_STD
    assert DynamicPatches().factor == 28


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"patch_sise": 14}, r"patch_sise=14"),
        ({"kind": "llava"}, r"kind='llava'"),
        ({"patch_size": 0}, r"patch_size=0"),
        ({"merge_size": 2.0}, r"merge_size=2\.0"),
        ({"min_pixels": True}, r"min_pixels=True"),
        ({"min_pixels": 5000, "max_pixels": 4000}, r"min_pixels=5000.*max_pixels=4000"),
        ({"image_mean": [0.5, 0.5]}, r"image_mean=\[0\.5, 0\.5\]"),
        ({"image_std": [0.5, 0.0, 0.5]}, r"image_std=\(0\.5, 0\.0, 0\.5\)"),
        ({"rescale_factor": "1/255"}, r"rescale_factor='1/255'"),
    ],
)
def test_spec_from_dict_rejects_bad_input(data, message):
    with pytest.raises(ValueError, match=message):
        DynamicPatches.from_dict(data)


@pytest.mark.parametrize(
    "cfg",
    [
        {"size": {"shortest_edge": 1000, "longest_edge": 9000}},
        {"min_pixels": 1000, "max_pixels": 9000},
        {"size": {"shortest_edge": 5, "longest_edge": 6}, "min_pixels": 1000, "max_pixels": 9000},  # top level wins
    ],
)
def test_spec_from_preprocessor_config_pixel_spellings_like_transformers(cfg):
    spec = DynamicPatches.from_preprocessor_config(cfg)
    assert (spec.min_pixels, spec.max_pixels) == (1000, 9000)
    hf_size = Qwen2VLImageProcessorPil(**cfg).size
    assert (hf_size["shortest_edge"], hf_size["longest_edge"]) == (1000, 9000)


def test_spec_from_preprocessor_config_reads_older_size_spelling():
    # Some older configs spell size as {"min_pixels", "max_pixels"}; transformers 5 no longer reads that.
    spec = DynamicPatches.from_preprocessor_config({"size": {"min_pixels": 1000, "max_pixels": 9000}})
    assert (spec.min_pixels, spec.max_pixels) == (1000, 9000)


@pytest.mark.parametrize("cfg", [{"resample": 2}, {"do_normalize": False}, {"size": [1, 2]}])
def test_spec_from_preprocessor_config_refuses_what_it_cannot_reproduce(cfg):
    with pytest.raises(ValueError, match=next(iter(cfg))):
        DynamicPatches.from_preprocessor_config(cfg)


# --------------------------------------------------------------------------------------------- RGB conversion


def _alpha_images() -> dict[str, Image.Image]:
    rgba = np.dstack([np.asarray(random_image(30, 40, seed=2)), np.tile(np.arange(0, 240, 6, dtype=np.uint8), (30, 1))])
    palette = Image.fromarray(rgba[:, :, :3]).quantize(16)
    palette.info["transparency"] = 3
    return {
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "LA": Image.fromarray(rgba[:, :, [0, 3]], "LA"),
        "P+transparency": palette,
        "P": Image.fromarray(rgba[:, :, :3]).quantize(16),
        "L": Image.fromarray(rgba[:, :, 1]),
        "CMYK": Image.fromarray(rgba[:, :, :3]).convert("CMYK"),
        "1": Image.fromarray(rgba[:, :, 2]).convert("1"),
    }


@pytest.mark.parametrize("mode", list(_alpha_images()))
def test_modes_convert_like_transformers(default_processor, mode):
    image = _alpha_images()[mode]
    loaded = load_image(image)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), hf_convert_to_rgb(image, return_numpy=True))
    _assert_matches(preprocess(image, DynamicPatches()), _reference(default_processor, image))


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.all(np.asarray(load_image(clear)) == 255)


def test_arrays_load_as_rgb():
    frame = np.asarray(random_image(12, 16, seed=4))
    np.testing.assert_array_equal(np.asarray(load_image(frame)), frame)
    np.testing.assert_array_equal(np.asarray(load_image(frame[:, ::-1])), frame[:, ::-1])  # non-contiguous view
    gray = frame[:, :, 0]
    expected = np.repeat(gray[:, :, None], 3, axis=-1)
    np.testing.assert_array_equal(np.asarray(load_image(gray)), expected)
    np.testing.assert_array_equal(np.asarray(load_image(gray[:, :, None])), expected)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((3, 4, 4, 3), np.uint8),
        np.zeros((4, 4, 3), np.float32),
        np.zeros((0, 4, 3), np.uint8),
        np.zeros(12, np.uint8),
    ],
)
def test_bad_arrays_are_refused(array):
    with pytest.raises(ImageError, match=r"HxWx3.*uint8.*got shape"):
        load_image(array)


# --------------------------------------------------------------------------------------------- files


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_load_from_path_and_bytes(tmp_path):
    image = random_image(21, 33, seed=6)
    path = tmp_path / "x.png"
    path.write_bytes(_encoded(image, "PNG"))
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes())):
        loaded = load_image(source)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))


def test_exif_orientation_is_applied_like_transformers_load_image(tmp_path):
    image = random_image(20, 40, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_encoded(image, "JPEG", exif=exif))
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    reference = transformers.image_utils.load_image(str(path))
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(reference))


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"not found: .*nope\.jpg"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="URL"):
        load_image("https://example.com/cat.jpg")


def test_directory(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_empty_file_and_empty_bytes(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)"):
        load_image(path)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"hello, this is text")
    path = tmp_path / "notes.jpg"
    path.write_text("not really a jpeg")
    with pytest.raises(ImageError, match=r"notes\.jpg: it is not an image Pillow recognizes\. Pass"):
        load_image(path)
    with pytest.raises(ImageError, match="Cannot load an image from a int"):
        load_image(42)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    data = _encoded(random_image(64, 64, seed=8), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError, match="truncated"):
        load_image(path)


def test_pillow_pixel_limit_stays_a_ceiling_above_edgevlm_caps(monkeypatch, tmp_path):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    small_bomb = _encoded(random_image(30, 40), "PNG")  # 1200 pixels: above the limit, below Pillow's 2x error
    big_bomb = _encoded(random_image(100, 100), "PNG")  # Pillow itself raises DecompressionBombError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match=r"40x30 = 1,200 pixels, above Pillow's process-wide limit PIL.Image.MAX_IMAGE_PIXELS = 1,000"):  # fmt: skip
            load_image(small_bomb)
        with pytest.raises(ImageError, match=r"10000 pixels.*raise PIL.Image.MAX_IMAGE_PIXELS and the cap"):
            load_image(big_bomb)


def test_loaded_file_survives_closing(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(_encoded(random_image(30, 30), "JPEG"))
    image = load_image(path)
    assert preprocess(image, DynamicPatches()).grid == (1, 4, 4)


# --------------------------------------------------------------------------------------------- runtime rule


def test_import_does_not_pull_torch():
    code = "import edgevlm.images, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
