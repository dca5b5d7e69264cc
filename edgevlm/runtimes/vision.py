"""Device side of the vision encoder: an onnxruntime session (never torch).

A graph encodes ONE image (`edgevlm.contract.graph` names its inputs and output); the manifest's `vision.patch_positions`
strategy says what it takes besides the pixels (`edgevlm.contract.kinds.patch_positions`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..contract.graph import IMAGE_EMBEDS, PIXEL_PATCHES
from ..contract.kinds.patch_positions import Grid2D, PatchPositions, check_grid

logger = logging.getLogger(__name__)


def return_freed_memory() -> bool:
    """Give the C heap's free pages back to the OS; whether glibc's `malloc_trim` released any (False elsewhere).

    Loading a graph parses it and copies its weights; what onnxruntime frees afterwards stays resident in glibc's
    heaps, by an amount that varies run to run. Trimmed after loading, `edgevlm run` on the 2B bundle peaked at
    1.94-1.95 GiB in 6 runs, against 2.08-2.21 GiB in 8 runs untrimmed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # a libc without it (musl)
        return False
    return bool(trim(0))


# A 4x4 MatMulInteger (ONNX, 119 bytes) of u8 255s by s8 127s: each pair of products (64,770) overflows int16
_INT8_PROBE = (
    b"\x08\x08\x12\x07edgevlm:d\n\x18\n\x01a\n\x01w\x12\x01y\"\rMatMulInteger\x12\x01p*\x1b\x08\x04\x08\x04\x10\x03B"
    b"\x01wJ\x10" + b"\x7f" * 16 + b"Z\x13\n\x01a\x12\x0e\n\x0c\x08\x02\x12\x08\n\x02\x08\x04\n\x02\x08\x04b\x13\n\x01y\x12"
    b"\x0e\n\x0c\x08\x06\x12\x08\n\x02\x08\x04\n\x02\x08\x04B\x04\n\x00\x10\r"
)  # fmt: skip


@functools.cache
def int8_pairs_saturate() -> bool:
    """Whether onnxruntime's u8 x s8 int8 kernels add pairs of products in int16 on this CPU, saturating past 32767
    (`vpmaddubsw`: x86 without VNNI or AMX), found by running one MatMulInteger whose pairs overflow int16. The int8
    vision graph is a little less exact there (tiny tower: worst token cosine 0.99795 instead of 0.99982; the 2B
    shapes 0.99874 instead of 0.99916, as the export validates them)."""
    import onnxruntime as ort

    session = ort.InferenceSession(_INT8_PROBE, providers=["CPUExecutionProvider"])
    sums = session.run(None, {"a": np.full((4, 4), 255, np.uint8)})[0]
    return bool(sums[0, 0] != 4 * 255 * 127)


def default_providers() -> list[str]:
    """CUDA when onnxruntime has it, then CPU. TensorRT needs per-device options, so profiles ask for it explicitly."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _make_cache_dirs(providers: list) -> None:
    """TensorRT writes its engine and timing caches into folders that must exist."""
    for provider in providers:
        if isinstance(provider, (tuple, list)) and len(provider) == 2:
            for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
                if key in provider[1]:
                    Path(provider[1][key]).mkdir(parents=True, exist_ok=True)


class VisionEncoder:
    """Turns an image's pixel patches into the embeddings the language model receives, with onnxruntime."""

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        providers: list | None = None,
        intra_op_threads: int | None = None,
        allow_spinning: bool = False,
        merge_size: int = 2,
        patch_positions: PatchPositions = Grid2D(),
    ):
        """Open the graph `onnx_path` (its `.data` file, if any, next to it); `patch_positions` is the manifest's
        strategy for the graph's inputs besides the pixels.

        `intra_op_threads` None lets onnxruntime use every core; `allow_spinning` False makes idle worker threads
        sleep instead of busy-waiting, which a device that also runs the language model needs.
        """
        import onnxruntime as ort

        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"vision graph {onnx_path} does not exist; is the bundle complete?")
        if intra_op_threads is not None and intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be at least 1 (or None for all cores), got {intra_op_threads}")
        if merge_size < 1:
            raise ValueError(f"merge_size must be at least 1, got {merge_size}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # the memory pattern planner about doubles peak memory from the second same-size image (2.6 vs 1.27 GiB
        # measured on the 2B tower) with no speed gain; a camera sends exactly such frames
        options.enable_mem_pattern = False
        # nor does onnxruntime's CPU arena pay off: it keeps the activations of the largest image seen (0.2 GiB more
        # resident on the 2B tower, sometimes held twice) for no measurable speed (2.18 vs 2.14 s, 448x448, int8)
        options.enable_cpu_mem_arena = False
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        _make_cache_dirs(providers or [])
        self.vision_session = ort.InferenceSession(
            str(onnx_path), options, providers=providers if providers is not None else default_providers()
        )
        self._providers = self.vision_session.get_providers()
        self.merge_size = merge_size
        self.patch_positions = patch_positions
        inputs = {i.name: i for i in self.vision_session.get_inputs()}
        if set(inputs) != set(patch_positions.graph_inputs):
            raise ValueError(
                f"{onnx_path} has inputs {sorted(inputs)}, expected {list(patch_positions.graph_inputs)}; "
                "is this a vision graph exported by edgevlm?"
            )
        self.patch_dim = inputs[PIXEL_PATCHES].shape[1]  # C*T*P*P, e.g. 1176 for Qwen2-VL
        return_freed_memory()
        logger.info("vision graph %s on %s", onnx_path, self.providers)

    def close(self) -> None:
        """Release the onnxruntime session (its weights and buffers); `encode` may not be called afterwards."""
        self.vision_session = None

    @property
    def providers(self) -> list[str]:
        """Execution providers the session really runs on (onnxruntime drops ones it cannot use)."""
        return self._providers

    def encode(self, pixel_patches: np.ndarray, grid: tuple[int, int, int], image_inputs: Mapping[str, np.ndarray] | None = None) -> np.ndarray:  # fmt: skip
        """Embeddings (t*h*w / merge², hidden) float32 of one image's (or video's) patches on grid (t, h, w);
        `image_inputs`: the graph's inputs the image brings (`PreparedImage.graph_inputs`; AnyRes packs its tokens
        by them, so the rows are as many as they say).

        Frames of a video attend only within themselves (as in Qwen2-VL), so they are encoded one by one.
        """
        t, h, w = check_grid(grid, self.merge_size)
        pixel_patches = np.asarray(pixel_patches)
        if pixel_patches.ndim != 2:
            raise ValueError(f"pixel_patches must be 2-D (n_patches, {self.patch_dim}), got {pixel_patches.shape}")
        if pixel_patches.shape[0] != t * h * w:
            raise ValueError(
                f"pixel_patches has {pixel_patches.shape[0]} patches but grid {(t, h, w)} needs t*h*w = {t * h * w}"
            )
        if isinstance(self.patch_dim, int) and pixel_patches.shape[1] != self.patch_dim:
            raise ValueError(
                f"pixel_patches rows have {pixel_patches.shape[1]} values but the vision graph takes {self.patch_dim}"
                " (channels * temporal_patch_size * patch_size²); was the image preprocessed for another model?"
            )
        pixel_patches = np.ascontiguousarray(pixel_patches, dtype=np.float32)
        extra = {**self.patch_positions.extra_inputs((1, h, w), self.merge_size), **(image_inputs or {})}
        frames = np.split(pixel_patches, t) if t > 1 else [pixel_patches]
        embeds = [self.vision_session.run([IMAGE_EMBEDS], {PIXEL_PATCHES: frame, **extra})[0] for frame in frames]
        return embeds[0] if t == 1 else np.concatenate(embeds, axis=0)
