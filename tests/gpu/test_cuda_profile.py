"""GPU smoke test: a bundle loaded with the `cuda` profile runs its vision graph on CUDA and offloads the LLM's layers.

Skipped unless onnxruntime has CUDAExecutionProvider (onnxruntime-gpu) and llama-cpp-python was built with GPU
offload (see the README's CUDA section).
"""

from __future__ import annotations

import logging
import re

import llama_cpp
import onnxruntime as ort
import pytest

import edgevlm
from edgevlm.exporters.verify import sample_image

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers() or not llama_cpp.llama_supports_gpu_offload(),
        reason="needs onnxruntime-gpu with CUDAExecutionProvider and llama-cpp-python built with GPU offload",
    ),
]


def test_cuda_profile_runs_vision_on_cuda_and_offloads_the_llm(tiny_bundles, caplog):
    with caplog.at_level(logging.INFO, logger="edgevlm.llama_cpp"):
        vlm = edgevlm.load(tiny_bundles["Q8_0"], profile="cuda")
    try:
        assert vlm.settings.notes == ()  # nothing fell back
        assert vlm.vision.providers[0] == "CUDAExecutionProvider"
        offloaded = re.search(r"offloaded (\d+)/(\d+) layers to GPU", caplog.text)
        assert offloaded, "llama.cpp did not report offloading"
        assert int(offloaded.group(1)) == int(offloaded.group(2)) > 0
        steps = list(vlm.generate("What is it?", images=[sample_image(224, 308)], max_tokens=4))
        assert steps[-1].finish_reason in ("stop", "length") and steps[-1].timings.n_image_tokens == 88
    finally:
        vlm.close()
