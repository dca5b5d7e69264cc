"""Qwen2-VL vision encoder as ONNX: parity with transformers through the device runtime, variants, errors, imports."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edgevlm.contract.kinds.patch_positions import grid_patch_positions
from edgevlm.exporters import onnx_export
from edgevlm.exporters.qwen_vit import export_qwen2_vl_vision, find_visual
from edgevlm.runtimes.vision import VisionEncoder, int8_pairs_saturate, return_freed_memory

# Grids not used at export (the export samples (1,4,6), (1,8,8), (1,2,16)) prove the patch axis is not baked in:
# square, wide, tall, one merged row (h = 2), a single token, and an odd number of merged rows/columns.
PARITY_GRIDS = [(1, 8, 8), (1, 2, 16), (1, 6, 10), (1, 14, 4), (1, 2, 2), (1, 10, 6), (1, 32, 32)]
# int8 (dynamic, per-channel weights) on the tiny model: mean cosine 0.99987, worst token 0.99982 where onnxruntime's
# int8 kernels sum in int32 (VNNI, AMX, ARM): the floors leave ~10x margin on 1 - cosine. x86 CPUs without VNNI add
# pairs of u8 x s8 products in int16 and saturate (`vpmaddubsw`): mean 0.99939, worst token 0.99795, measured under
# `qemu-x86_64 -cpu Haswell` only; their floors leave ~3x. The test reads which kernel this CPU's onnxruntime runs.
SATURATING = int8_pairs_saturate()
INT8_MEAN_COSINE = 0.998 if SATURATING else 0.999
INT8_MIN_COSINE = 0.995 if SATURATING else 0.998
# fp16 weights and compute: ~0.9999998; a real fp16 rounding regression (e.g. rotary angles in fp16) shows at 1e-5.
FP16_MEAN_COSINE = 0.99999


@pytest.fixture(scope="module")
def visual(tiny_qwen2vl_dir):
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2vl_dir, dtype=torch.float32).eval()
    return find_visual(model)


@pytest.fixture(scope="module")
def exported(visual, tmp_path_factory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("vision")
    report = export_qwen2_vl_vision(visual, out_dir, dtypes=("fp32", "int8", "fp16"))
    return out_dir, report


def _patches(grid, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((grid[0] * grid[1] * grid[2], 1176)).astype(np.float32)


def _hf_embeds(visual, patches: np.ndarray, grid) -> np.ndarray:
    with torch.no_grad():
        return visual(torch.from_numpy(patches), grid_thw=torch.tensor([grid])).pooler_output.numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("grid", [(1, 4, 6), (2, 4, 6), (1, 2, 16), (3, 6, 2), (1, 12, 8)])
@pytest.mark.parametrize("merge_size", [1, 2])
def test_patch_positions_equal_transformers(grid, merge_size):
    from transformers.vision_utils import get_vision_position_ids

    expected = get_vision_position_ids(torch.tensor([grid]), merge_size).numpy()
    positions = grid_patch_positions(grid, merge_size)
    assert positions.dtype == np.int64
    np.testing.assert_array_equal(positions, expected)


def test_export_report_is_validated_and_json(exported):
    out_dir, report = exported
    assert json.loads(json.dumps(report)) == report
    assert report["fp32"]["file"] == "vision.onnx" and report["fp32"]["max_abs_diff"] <= 1e-4
    assert report["fp32"]["grids"] == [[1, 4, 6], [1, 8, 8], [1, 2, 16]]
    for dtype, file in (("int8", "vision-int8.onnx"), ("fp16", "vision-fp16.onnx")):
        assert report[dtype]["file"] == file and (out_dir / file).is_file()
    assert report["int8"]["cosine_vs_fp32"] >= INT8_MEAN_COSINE
    assert report["fp16"]["cosine_vs_fp32"] >= FP16_MEAN_COSINE
    graph = onnx.load(str(out_dir / "vision.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"pixel_patches": ["n_patches", 1176], "patch_positions": ["n_patches", 2]}


@pytest.mark.parametrize("grid", PARITY_GRIDS)
def test_fp32_runtime_matches_transformers(visual, exported, grid):
    encoder = VisionEncoder(exported[0] / "vision.onnx", intra_op_threads=1)
    patches = _patches(grid, seed=sum(grid))
    embeds = encoder.encode(patches, grid)
    expected = _hf_embeds(visual, patches, grid)
    assert embeds.dtype == np.float32 and embeds.shape == expected.shape == (grid[1] * grid[2] // 4, 256)
    assert np.abs(embeds - expected).max() <= 1e-4


def test_video_frames_attend_within_themselves(visual, exported):
    grid = (2, 4, 6)  # transformers gives each frame its own attention segment; the runtime encodes frame by frame
    patches = _patches(grid, seed=7)
    embeds = VisionEncoder(exported[0] / "vision.onnx", intra_op_threads=1).encode(patches, grid)
    assert np.abs(embeds - _hf_embeds(visual, patches, grid)).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["int8", "fp16"])
def test_variants_agree_with_fp32(exported, dtype):
    out_dir, _ = exported
    reference = VisionEncoder(out_dir / "vision.onnx", intra_op_threads=1)
    variant = VisionEncoder(out_dir / f"vision-{dtype}.onnx", intra_op_threads=1)
    for grid in [(1, 6, 10), (1, 2, 16), (1, 20, 20)]:
        patches = _patches(grid, seed=3)
        got, want = variant.encode(patches, grid), reference.encode(patches, grid)
        assert got.dtype == np.float32 and got.shape == want.shape
        cosines = _cosines(got.astype(np.float64), want.astype(np.float64))
        if dtype == "int8":
            assert cosines.mean() >= INT8_MEAN_COSINE and cosines.min() >= INT8_MIN_COSINE, cosines
        else:
            assert cosines.mean() >= FP16_MEAN_COSINE, cosines


def test_int8_is_the_fused_cpu_graph_with_a_float_patch_embedding(exported):
    """The patch embedding is a MatMul on raw pixels (not onnxruntime's slow 5-D Conv) and stays float in int8."""
    graph = onnx.load(str(exported[0] / "vision-int8.onnx")).graph
    pixel_readers = [node.op_type for node in graph.node if "pixel_patches" in node.input]
    assert pixel_readers == ["MatMul"]
    ops = [node.op_type for node in graph.node]
    assert "Conv" not in ops
    # query, key, value, proj, fc1, fc2 per block: the attention's three inputs come from three MatMuls, not a Split
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") >= 6 * 2 and "Split" not in ops
    # the CPU variant runs attention in onnxruntime's fused kernel; the portable graphs keep standard ONNX ops
    assert ops.count("MultiHeadAttention") == 2 and "Softmax" not in ops  # one per block of the tiny tower
    assert ops.count("RotaryEmbedding") == 2 * 2 and "Neg" not in ops  # query and key of each block
    for portable in ("vision.onnx", "vision-fp16.onnx"):
        assert "MultiHeadAttention" not in {node.op_type for node in onnx.load(str(exported[0] / portable)).graph.node}


def test_fp16_keeps_rotary_angles_float32(exported):
    """Angles of far-away patches (~64 rad) lose ~0.016 rad in fp16; the fp16 graph must keep them float32."""
    model = onnx.load(str(exported[0] / "vision-fp16.onnx"))
    cos_node = next(node for node in model.graph.node if node.op_type == "Cos")
    model.graph.output.append(onnx.helper.make_tensor_value_info(cos_node.output[0], onnx.TensorProto.FLOAT, None))
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    grid = (1, 64, 64)
    positions = grid_patch_positions(grid, 2)
    cos_table = session.run([cos_node.output[0]], {"pixel_patches": _patches(grid), "patch_positions": positions})[0]
    inv_freq = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)  # tiny model: head_dim 16, axial rope over head_dim / 2
    angles = (positions[..., None] * inv_freq).reshape(len(positions), -1)
    expected = np.cos(np.concatenate([angles, angles], axis=-1))
    assert np.abs(cos_table.reshape(expected.shape) - expected).max() < 1e-5


def test_large_graph_layout_external_data(visual, tmp_path, monkeypatch):
    """Graphs over 1.5 GB keep their weights in ONE `<name>.data` file; every step must handle that layout."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    report = export_qwen2_vl_vision(visual, tmp_path, dtypes=("fp32", "int8", "fp16"), grids=((1, 2, 4), (1, 4, 4)))
    assert report["fp32"]["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "vision-fp16.onnx", "vision-fp16.onnx.data", "vision-int8.onnx", "vision-int8.onnx.data", "vision.onnx",
        "vision.onnx.data",
    ]  # fmt: skip
    embeds = VisionEncoder(tmp_path / "vision-int8.onnx").encode(_patches((1, 4, 4)), (1, 4, 4))
    assert embeds.shape == (4, 256)


def test_export_without_fp32_keeps_only_the_variant(visual, tmp_path):
    report = export_qwen2_vl_vision(visual, tmp_path, dtypes=("int8",), grids=((1, 2, 4), (1, 4, 4)))
    assert list(report) == ["int8"]
    assert [p.name for p in tmp_path.iterdir()] == ["vision-int8.onnx"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtypes": ("int4",)}, "unknown vision dtypes ['int4']"),
        ({"grids": ((1, 3, 4), (1, 4, 4))}, "multiples of 2"),
        ({"grids": ((2, 4, 4), (1, 4, 4))}, "must be (1, h, w)"),
        ({"grids": ((1, 4, 4),)}, "at least 2 grids"),
        ({"grids": ((1, 4, 4), (1, 4, 4))}, "at least 2 grids"),
    ],
)
def test_export_refuses_bad_arguments_before_work(visual, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        export_qwen2_vl_vision(visual, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_export_refuses_half_precision_weights(tiny_qwen2vl_dir, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2vl_dir, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype=torch.float32"):
        export_qwen2_vl_vision(model, tmp_path / "out")


@pytest.mark.parametrize(
    "patches_shape, grid, message",
    [
        ((20, 1176), (1, 4, 6), "has 20 patches but grid (1, 4, 6) needs t*h*w = 24"),
        ((24, 588), (1, 4, 6), "have 588 values but the vision graph takes 1176"),
        ((24 * 1176,), (1, 4, 6), "must be 2-D"),
        ((15, 1176), (1, 3, 5), "multiples of the merge size 2"),
        ((0, 1176), (1, 0, 4), "three positive integers"),
    ],
)
def test_encode_reports_wrong_shapes(exported, patches_shape, grid, message):
    encoder = VisionEncoder(exported[0] / "vision.onnx", intra_op_threads=1)
    with pytest.raises(ValueError) as error:
        encoder.encode(np.zeros(patches_shape, np.float32), grid)
    assert message in str(error.value)


def test_session_options_and_providers(exported):
    encoder = VisionEncoder(exported[0] / "vision.onnx", providers=["CPUExecutionProvider"], intra_op_threads=2)
    assert encoder.providers == ["CPUExecutionProvider"]
    options = encoder.vision_session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert not options.enable_cpu_mem_arena and not options.enable_mem_pattern  # activations freed after each image
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VisionEncoder(exported[0] / "missing.onnx")


def test_runtime_runs_without_torch(exported):
    code = (
        "import sys, numpy as np\n"
        "from edgevlm.runtimes.vision import VisionEncoder\n"
        f"encoder = VisionEncoder({str(exported[0] / 'vision-int8.onnx')!r})\n"
        "embeds = encoder.encode(np.zeros((24, 1176), np.float32), (1, 4, 6))\n"
        "assert embeds.shape == (6, 256), embeds.shape\n"
        "leaked = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]\n"
        "assert not leaked, leaked\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _has_malloc_trim() -> bool:
    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "malloc_trim")


@pytest.mark.skipif(not _has_malloc_trim(), reason="needs glibc's malloc_trim")
def test_freed_heap_pages_go_back_to_the_os():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 1024  # below glibc's mmap threshold: these blocks live in the heap
    blocks = [libc.malloc(size) for _ in range(256)]
    guard = libc.malloc(size)  # keeps the freed blocks below the heap's top, where free() alone leaves them resident
    for block in blocks:
        ctypes.memset(block, 1, size)
        libc.free(block)
    try:
        assert return_freed_memory() is True
    finally:
        libc.free(guard)
