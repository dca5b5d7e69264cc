"""What an export will write and need, estimated from the config and the checkpoint's headers before any weight loads:
`edgevlm export --dry-run` prints it, and `export` refuses to start without the disk space.

The figures are calibrated on Qwen3-VL-2B and Qwen2.5-VL-7B shapes exported on a 2-core host: memory is the peak
of the largest process (the export's own or onnxruntime's int8 quantizer in its child process), about three copies
of the fp32 tower (the tower and onnxruntime's session while validating, the quantizer's graph copies) or of the
largest language-model tensor in float32 (read, converted, written), over what Python and the libraries hold.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EdgeVLMError
from .onnx_export import VISION_FILES

# Bytes per weight of each GGUF type (K-quants mix types: Q4_K_M keeps some tensors in Q6_K).
GGUF_BYTES_PER_WEIGHT = {"F32": 4.0, "F16": 2.0, "Q8_0": 34 / 32, "Q4_K_M": 0.65}
# Bytes per vision weight of each graph: int8 keeps convolutions, norms and biases in float.
ONNX_BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "int8": 1.05}
# Copies of the fp32 tower, or of the largest LLM tensor in fp32, a process holds at its peak (measured: 2B tower
# 3.72 GiB validating = 0.46 + 2 x 1.63 GB; 7B int8 quantizer ~8.5 GB for a 2.71 GB tower; 7B GGUF writing
# 8.56 GiB with 2.18 GB token embeddings), and what Python, torch and onnxruntime hold besides.
COPIES_AT_PEAK = 3
BASE_BYTES = 2**30


class InsufficientResourcesError(EdgeVLMError):
    """The host lacks the disk space (or memory) an export needs."""


@dataclass(frozen=True)
class ExportEstimate:
    """An export's estimated output and needs, in bytes."""

    n_vision_params: int
    n_llm_params: int
    files: dict[str, int]  # bundle file -> size
    disk_peak: int  # the most the export has on disk at once: the bundle's files plus staging files
    memory_peak: int  # the export process's peak resident memory
    largest_llm_tensor: int  # in float32, converted one at a time


@dataclass(frozen=True)
class HostResources:
    disk_free: int  # on the output's filesystem
    memory_available: int | None  # None where the OS does not say


def estimate_export(family: Any, model_dir: Path, quantization: str, vision_dtypes: tuple[str, ...]) -> ExportEstimate:
    """Estimate an export of `model_dir` by `family` from its config alone (the model is built on the meta device)."""
    import transformers

    from .checkpoint import empty_model

    model = empty_model(getattr(transformers, family.architectures[0]), model_dir)
    vision_prefixes = tuple(f"{part}." for part in family.vision_parts)
    n_vision = n_llm = largest = 0
    for name, parameter in model.named_parameters():  # tied tensors once
        if name.startswith(vision_prefixes):
            n_vision += parameter.numel()
        else:
            n_llm += parameter.numel()
            largest = max(largest, parameter.numel())
    llm_file = f"llm-{quantization}.gguf"
    files = {VISION_FILES[d]: int(ONNX_BYTES_PER_WEIGHT[d] * n_vision) for d in vision_dtypes}
    files[llm_file] = int(GGUF_BYTES_PER_WEIGHT[quantization] * n_llm)
    # the vision stage: the fp32 graph (kept to validate the others, even when not shipped) and, for int8, the
    # fused fp32 graph it is quantized from
    vision_stage = files.get(VISION_FILES["int8"], 0) + 4 * n_vision * (1 + ("int8" in vision_dtypes))
    vision_stage += sum(size for name, size in files.items() if name not in (llm_file, VISION_FILES["int8"], VISION_FILES["fp32"]))  # fmt: skip
    vision_files = sum(size for name, size in files.items() if name != llm_file)
    staging = 0 if quantization in ("F32", "F16") else int(GGUF_BYTES_PER_WEIGHT["F16"] * n_llm)
    return ExportEstimate(
        n_vision_params=n_vision,
        n_llm_params=n_llm,
        files=files,
        disk_peak=max(vision_stage, vision_files + staging + files[llm_file]),
        memory_peak=BASE_BYTES + COPIES_AT_PEAK * 4 * max(n_vision, largest),
        largest_llm_tensor=4 * largest,
    )


def host_resources(out_dir: Path) -> HostResources:
    """Free disk space where `out_dir` will be, and the memory the OS says is available."""
    existing = Path(out_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    return HostResources(disk_free=shutil.disk_usage(existing).free, memory_available=_memory_available())


def _memory_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def shortfalls(estimate: ExportEstimate, host: HostResources, out_dir: Path) -> list[str]:
    """What the host lacks for the export, one sentence each (empty when it fits)."""
    gb = 1e9
    problems = []
    if estimate.disk_peak > host.disk_free:
        problems.append(
            f"the export needs about {estimate.disk_peak / gb:.1f} GB on the disk of {out_dir} at its peak (the bundle "
            f"plus staging files) and {host.disk_free / gb:.1f} GB is free; free some space or choose another -o"
        )
    if host.memory_available is not None and estimate.memory_peak > host.memory_available:
        problems.append(
            f"the export needs about {estimate.memory_peak / 2**30:.1f} GiB of memory at its peak and "
            f"{host.memory_available / 2**30:.1f} GiB is available; close other programs first"
        )
    return problems


def check_disk(estimate: ExportEstimate, host: HostResources, out_dir: Path) -> None:
    """Refuse an export the output's disk cannot hold (memory is only estimated: the OS may find more)."""
    if estimate.disk_peak > host.disk_free:
        raise InsufficientResourcesError(shortfalls(estimate, host, out_dir)[0])
