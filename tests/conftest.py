"""Shared fixtures: tiny random models of each family built from configs (no network) and bundles exported from them,
built once per test session."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

# Every machine runs the suite with the same hardware profile (auto would pick cpu-lowmem under 12 GiB of RAM, with
# other limits and a quantized KV cache); tests of auto-detection itself remove this.
os.environ.setdefault("EDGEVLM_PROFILE", "cpu")

import edgevlm
from edgevlm.exporters.verify import sample_image as random_image  # noqa: F401  (tests import it from here)
from edgevlm.integrity import CACHE_DIR_ENV


@pytest.fixture(scope="session", autouse=True)
def verified_files_cache(tmp_path_factory) -> Path:
    """The record of bundle files `edgevlm.load` has hashed: one per session (each file hashed once), never the
    user's ~/.cache. Subprocesses inherit it."""
    os.environ.setdefault(CACHE_DIR_ENV, str(tmp_path_factory.mktemp("edgevlm-cache")))
    return Path(os.environ[CACHE_DIR_ENV])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def edgevlm_serve(bundle: Path, *flags: str, startup_s: float = 90) -> Iterator[tuple[str, subprocess.Popen]]:
    """`edgevlm serve BUNDLE FLAGS` in a child process on a free loopback port (1 thread, n_ctx 1024), up and
    answering /health; yields (base URL, process) and terminates it afterwards."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "edgevlm.cli", "serve", str(bundle), "--port", str(port), "--n-ctx", "1024",
               "--threads", "1", *flags]  # fmt: skip
    log = tempfile.TemporaryFile("w+")  # a pipe nobody reads would block the server once full
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"edgevlm serve exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "edgevlm serve did not come up"
                time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def random_frame(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A random (height, width, 3) uint8 camera frame."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def png_data_url(array: np.ndarray) -> str:
    """`array` as a PNG in a `data:` URL, as OpenAI-style clients send images."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL model directory with the real Qwen2 tokenizer (built in ~15 s)."""
    from edgevlm.exporters.qwen2_vl import FAMILY

    return FAMILY.build_tiny(tmp_path_factory.mktemp("tiny-qwen2-vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2vl_loaded(tiny_qwen2vl_dir):
    """The tiny model loaded by the exporter family (transformers model, tokenizer, preprocessing)."""
    from edgevlm.exporters.qwen2_vl import FAMILY

    return FAMILY.load(tiny_qwen2vl_dir)


@pytest.fixture(scope="session")
def tiny_bundles(tiny_qwen2vl_dir, tmp_path_factory) -> dict[str, Path]:
    """Bundles of the tiny model: F32 LLM + fp32 vision, and Q8_0 / Q4_K_M LLMs with fp32 and int8 vision."""
    from edgevlm.exporters import export

    root = tmp_path_factory.mktemp("bundles")
    return {
        "F32": export(str(tiny_qwen2vl_dir), root / "f32", quantization="F32"),
        "Q8_0": export(str(tiny_qwen2vl_dir), root / "q8", quantization="Q8_0", vision_dtypes=("fp32", "int8")),
        "Q4_K_M": export(str(tiny_qwen2vl_dir), root / "q4", quantization="Q4_K_M", vision_dtypes=("fp32", "int8")),
    }


@pytest.fixture(scope="module")
def vlm(tiny_bundles):
    """The tiny F32 Qwen2-VL bundle, loaded once per test module (1 thread: fast even on a busy machine)."""
    with edgevlm.load(tiny_bundles["F32"], n_ctx=2048, n_threads=1) as model:
        yield model


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny random LLaVA-1.5 model directory with a SentencePiece tokenizer trained offline (a few seconds)."""
    from edgevlm.exporters.llava import FAMILY

    return FAMILY.build_tiny(tmp_path_factory.mktemp("tiny-llava"), seed=0)


@pytest.fixture(scope="session")
def tiny_llava_loaded(tiny_llava_dir):
    from edgevlm.exporters.llava import FAMILY

    return FAMILY.load(tiny_llava_dir)


@pytest.fixture(scope="session")
def tiny_llava_bundles(tiny_llava_dir, tmp_path_factory) -> dict[str, Path]:
    """Bundles of the tiny LLaVA: F32 and F16 LLMs + fp32 vision, and a Q4_K_M LLM with fp32 and int8 vision."""
    from edgevlm.exporters import export

    root = tmp_path_factory.mktemp("llava-bundles")
    return {
        "F32": export(str(tiny_llava_dir), root / "f32", quantization="F32"),
        "F16": export(str(tiny_llava_dir), root / "f16", quantization="F16"),
        "Q4_K_M": export(str(tiny_llava_dir), root / "q4", quantization="Q4_K_M", vision_dtypes=("fp32", "int8")),
    }


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory) -> Path:
    """A tiny random Gemma 3 model directory with a SentencePiece tokenizer trained offline (a few seconds)."""
    from edgevlm.exporters.gemma3 import FAMILY

    return FAMILY.build_tiny(tmp_path_factory.mktemp("tiny-gemma3"), seed=0)


@pytest.fixture(scope="session")
def tiny_gemma3_loaded(tiny_gemma3_dir):
    from edgevlm.exporters.gemma3 import FAMILY

    return FAMILY.load(tiny_gemma3_dir)


@pytest.fixture(scope="session")
def tiny_gemma3_bundles(tiny_gemma3_dir, tmp_path_factory) -> dict[str, Path]:
    """Bundles of the tiny Gemma 3: F32 + fp32 vision, Q8_0 and Q4_K_M LLMs with fp32 and int8 vision."""
    from edgevlm.exporters import export

    root = tmp_path_factory.mktemp("gemma3-bundles")
    return {
        "F32": export(str(tiny_gemma3_dir), root / "f32", quantization="F32"),
        "Q8_0": export(str(tiny_gemma3_dir), root / "q8", quantization="Q8_0", vision_dtypes=("fp32", "int8")),
        "Q4_K_M": export(str(tiny_gemma3_dir), root / "q4", quantization="Q4_K_M", vision_dtypes=("fp32", "int8")),
    }


@pytest.fixture(scope="session")
def tiny_internvl_dir(tmp_path_factory) -> Path:
    """A tiny random InternVL3 model directory with Qwen2's tokenizer and InternVL's added tokens (about 20 s)."""
    from edgevlm.exporters.internvl import FAMILY

    return FAMILY.build_tiny(tmp_path_factory.mktemp("tiny-internvl"), seed=0)


@pytest.fixture(scope="session")
def tiny_internvl_loaded(tiny_internvl_dir):
    from edgevlm.exporters.internvl import FAMILY

    return FAMILY.load(tiny_internvl_dir)


@pytest.fixture(scope="session")
def tiny_internvl_bundles(tiny_internvl_dir, tmp_path_factory) -> dict[str, Path]:
    """Bundles of the tiny InternVL3: F32 + fp32 vision, Q8_0 and Q4_K_M LLMs with fp32 and int8 vision."""
    from edgevlm.exporters import export

    root = tmp_path_factory.mktemp("internvl-bundles")
    return {
        "F32": export(str(tiny_internvl_dir), root / "f32", quantization="F32"),
        "Q8_0": export(str(tiny_internvl_dir), root / "q8", quantization="Q8_0", vision_dtypes=("fp32", "int8")),
        "Q4_K_M": export(str(tiny_internvl_dir), root / "q4", quantization="Q4_K_M", vision_dtypes=("fp32", "int8")),
    }


@pytest.fixture(scope="session")
def tiny_onevision_dir(tmp_path_factory) -> Path:
    """A tiny random LLaVA-OneVision model directory (32 px tiles, the real Qwen2 vocabulary)."""
    from edgevlm.exporters.llava_onevision import FAMILY

    return FAMILY.build_tiny(tmp_path_factory.mktemp("tiny-onevision"), seed=0)


@pytest.fixture(scope="session")
def tiny_onevision_loaded(tiny_onevision_dir):
    from edgevlm.exporters.llava_onevision import FAMILY

    return FAMILY.load(tiny_onevision_dir)


@pytest.fixture(scope="session")
def tiny_onevision_bundles(tiny_onevision_dir, tmp_path_factory) -> dict[str, Path]:
    """Bundles of the tiny LLaVA-OneVision: F32 + fp32 vision, Q8_0 and Q4_K_M LLMs with fp32 and int8 vision."""
    from edgevlm.exporters import export

    root = tmp_path_factory.mktemp("onevision-bundles")
    return {
        "F32": export(str(tiny_onevision_dir), root / "f32", quantization="F32"),
        "Q8_0": export(str(tiny_onevision_dir), root / "q8", quantization="Q8_0", vision_dtypes=("fp32", "int8")),
        "Q4_K_M": export(str(tiny_onevision_dir), root / "q4", quantization="Q4_K_M", vision_dtypes=("fp32", "int8")),
    }


@pytest.fixture(scope="session")
def tiny_smolvlm_dir(tmp_path_factory) -> Path:
    """A tiny random SmolVLM2 model directory with a byte-level BPE tokenizer trained offline (a few seconds)."""
    from edgevlm.exporters.smolvlm import FAMILY

    return FAMILY.build_tiny(tmp_path_factory.mktemp("tiny-smolvlm"), seed=0)


@pytest.fixture(scope="session")
def tiny_smolvlm_loaded(tiny_smolvlm_dir):
    from edgevlm.exporters.smolvlm import FAMILY

    return FAMILY.load(tiny_smolvlm_dir)


@pytest.fixture(scope="session")
def tiny_smolvlm_bundles(tiny_smolvlm_dir, tmp_path_factory) -> dict[str, Path]:
    """Bundles of the tiny SmolVLM2: F32 + fp32 vision, Q8_0 and Q4_K_M LLMs with fp32 and int8 vision."""
    from edgevlm.exporters import export

    root = tmp_path_factory.mktemp("smolvlm-bundles")
    return {
        "F32": export(str(tiny_smolvlm_dir), root / "f32", quantization="F32"),
        "Q8_0": export(str(tiny_smolvlm_dir), root / "q8", quantization="Q8_0", vision_dtypes=("fp32", "int8")),
        "Q4_K_M": export(str(tiny_smolvlm_dir), root / "q4", quantization="Q4_K_M", vision_dtypes=("fp32", "int8")),
    }
