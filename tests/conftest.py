"""Shared fixtures: tiny random Qwen2-VL models built from configs (no network), cached per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL model directory with the real Qwen2 tokenizer (built in ~15 s)."""
    from edgevlm.exporters.synthetic import build_qwen2_vl

    return build_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"), seed=0)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A noise image with smooth gradients, so resizing changes it in ways a wrong resize would show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], axis=-1)
    noise = rng.integers(-40, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
