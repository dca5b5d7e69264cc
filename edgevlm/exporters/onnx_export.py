"""Family-independent ONNX mechanics: export from a declared spec, validate against a reference, derive variants.

A family module declares *what* its graph looks like (an `OnnxExportSpec`: named inputs/outputs, named dynamic
axes, opset, tolerance) and wraps its PyTorch module in export-friendly ops; everything here works for any graph.
Graphs whose weights exceed what one protobuf may hold (2 GB) are saved with their weights in ONE file next to the
graph (`vision.onnx` + `vision.onnx.data`); onnxruntime finds it by that relative name.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm.bundle import external_data_name
from edgevlm.contract.kinds.patch_positions import PatchPositions
from edgevlm.contract.manifest import VisionSpec, VisionVariant
from edgevlm.errors import ExportValidationError

logger = logging.getLogger(__name__)

_INSTALL_HINT = "exporting needs the export extras: pip install 'edgevlm[export]'"
# Weights above this go to an external data file: protobuf refuses 2 GB, and torch's own threshold is the same.
EXTERNAL_DATA_THRESHOLD_BYTES = 1536 * 1024 * 1024


@dataclass(frozen=True)
class OnnxExportSpec:
    """How a module is exported: graph input/output names in order, named dynamic axes, opset and tolerance."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]  # input name -> {axis: axis name}; output axes are derived
    opset: int = 18
    atol: float = 1e-4


@dataclass(frozen=True)
class OnnxAgreement:
    """How closely one graph's first output follows another's over a set of inputs (rows compared as vectors)."""

    max_abs_diff: float
    mean_cosine: float
    min_cosine: float


class CosineValidationError(ExportValidationError):
    """A derived graph (int8, fp16) points away from its fp32 source more than its cosine floor allows."""

    def __init__(self, what: str, mean_cosine: float, floor: float, max_abs_diff: float):
        self.mean_cosine, self.floor = mean_cosine, floor
        self.what, self.max_abs_diff, self.atol = what, max_abs_diff, float("nan")
        Exception.__init__(
            self,
            f"{what}: mean cosine similarity {mean_cosine:.5f} is below the floor {floor} "
            f"(max abs difference {max_abs_diff:.3g}); export without this variant or report the model",
        )


def _require(module_name: str):
    import importlib

    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"{module_name} is missing; {_INSTALL_HINT}") from e


def onnx_data_path(path: str | Path) -> Path:
    """The external data file that belongs to graph `path` when its weights do not fit inside it."""
    path = Path(path)
    return path.with_name(external_data_name(path.name))


def _save_model(model, path: Path, n_weight_bytes: int) -> None:
    """Save an `onnx.ModelProto`, with all weights in one `<name>.data` file when they are large."""
    onnx = _require("onnx")
    data_path = onnx_data_path(path)
    data_path.unlink(missing_ok=True)  # a stale data file would be appended to, or mistaken for this graph's
    external = n_weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES
    onnx.save_model(
        model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
        location=data_path.name, size_threshold=1024,
    )  # fmt: skip


def onnx_file_bytes(path: str | Path) -> int:
    """Size of a graph on disk, its external data file included."""
    path, data_path = Path(path), onnx_data_path(path)
    return path.stat().st_size + (data_path.stat().st_size if data_path.exists() else 0)


# torch.onnx logs a warning per torchvision op it cannot register; vision towers here never use torchvision ops
_TORCH_ONNX_REGISTRY_LOG = logging.getLogger("torch.onnx._internal.exporter._registration")


def export_onnx(module, spec: OnnxExportSpec, sample_inputs: tuple, path: str | Path) -> None:
    """Export `module` (called as `module(*sample_inputs)`) to `path` as the graph `spec` declares.

    Uses the dynamo exporter; shapes along the named dynamic axes stay symbolic, so one graph serves every size.
    Weights over 1.5 GB are written to `<path>.data` (one file), otherwise they are inside the graph.
    """
    torch = _require("torch")
    if len(sample_inputs) != len(spec.input_names):
        raise ValueError(f"{len(sample_inputs)} sample inputs for {len(spec.input_names)} inputs {spec.input_names}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    with torch.no_grad(), warnings.catch_warnings(), _without_log_records(_TORCH_ONNX_REGISTRY_LOG, "torchvision is not installed"):  # fmt: skip
        # torch notes that inputs sharing a dim keep one name, and a pytree deprecation; neither is actionable here.
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(
            module, tuple(sample_inputs), f=None, input_names=list(spec.input_names),
            output_names=list(spec.output_names), opset_version=spec.opset,
            dynamic_shapes=_dynamic_shapes(spec), dynamo=True, verbose=False,
        )  # fmt: skip
    onnx_data_path(path).unlink(missing_ok=True)
    program.save(str(path), external_data=n_weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES)
    logger.info("exported %s (%.1f MB)", path, onnx_file_bytes(path) / 1e6)


def _dynamic_shapes(spec: OnnxExportSpec) -> tuple[dict, ...]:
    """The spec's named axes as torch.export dims, positionally; axes sharing a name share one dim."""
    import torch

    dims = {name: torch.export.Dim(name) for axes in spec.dynamic_axes.values() for name in axes.values()}
    return tuple(
        {axis: dims[name] for axis, name in spec.dynamic_axes.get(input_name, {}).items()}
        for input_name in spec.input_names
    )


def _session(path: str | Path):
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # validate what devices run
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(session, inputs: Sequence) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if len(inputs) != len(names):
        raise ValueError(f"{len(inputs)} inputs for a graph with {len(names)} inputs {names}")
    return {name: _to_numpy(x) for name, x in zip(names, inputs)}


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def validate_onnx(
    path: str | Path,
    reference: Callable,
    input_sets: Sequence[tuple],
    atol: float,
    what: str,
) -> float:
    """Run graph `path` and `reference(*inputs)` on every input set; return the largest abs difference of all outputs.

    `reference` is the PyTorch module that was exported or any callable that should agree with it (e.g. the
    original Hugging Face forward). Raises `ExportValidationError` when a shape differs or the difference > `atol`.
    """
    torch = _require("torch")
    session = _session(path)
    worst = 0.0
    for inputs in input_sets:
        with torch.no_grad():
            expected = reference(*inputs)
        expected = [expected] if hasattr(expected, "shape") else list(expected)
        actual = session.run(None, _feeds(session, inputs))
        for output, want, got in zip(session.get_outputs(), expected, actual):
            want = _to_numpy(want)
            if want.shape != got.shape:
                raise ExportValidationError(
                    f"{what}: output {output.name} has shape {got.shape}, the reference {want.shape}",
                    float("inf"), atol,
                )  # fmt: skip
            diff = float(np.max(np.abs(want.astype(np.float64) - got))) if want.size else 0.0
            logger.debug("%s: %s shape %s max abs diff %.3g", what, output.name, got.shape, diff)
            worst = max(worst, diff)
    if not worst <= atol:  # NaN fails too
        raise ExportValidationError(what, worst, atol)
    logger.info("%s: max abs diff %.3g over %d input sets (atol %.3g)", what, worst, len(input_sets), atol)
    return worst


def compare_onnx(candidate_path: str | Path, reference_path: str | Path, input_sets: Sequence[tuple]) -> OnnxAgreement:
    """Run two graphs with the same inputs; compare their first outputs row by row (max abs diff and cosines).
    One session at a time: a 7B model's fp32 tower and its int8 variant together took 7.6 GB."""
    worst, cosines = 0.0, []
    for got, want in zip(_first_outputs(candidate_path, input_sets), _first_outputs(reference_path, input_sets)):
        got, want = got.astype(np.float64), want.astype(np.float64)
        got, want = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
        worst = max(worst, float(np.max(np.abs(got - want))))
        norms = np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1)
        cosines.append(np.sum(got * want, axis=-1) / np.maximum(norms, 1e-30))
    cosines = np.concatenate(cosines)
    return OnnxAgreement(worst, float(cosines.mean()), float(cosines.min()))


def _first_outputs(path: str | Path, input_sets: Sequence[tuple]) -> list[np.ndarray]:
    session = _session(path)
    return [session.run(None, _feeds(session, inputs))[0] for inputs in input_sets]


def check_agreement(agreement: OnnxAgreement, cosine_floor: float, what: str) -> None:
    """Raise `CosineValidationError` when a derived graph's mean cosine is below `cosine_floor`."""
    if not agreement.mean_cosine >= cosine_floor:
        raise CosineValidationError(what, agreement.mean_cosine, cosine_floor, agreement.max_abs_diff)


def quantize_int8(fp32_path: str | Path, out_path: str | Path, external_data: bool | None = None) -> None:
    """Dynamic int8 quantization of the weight MatMuls (per output channel); everything else stays float.
    `external_data`: weights in `<out>.data` (default: when a quarter of the fp32 graph is over the threshold).

    Only MatMuls with a constant weight are quantized: attention's activation-by-activation MatMuls and the patch
    embedding on raw pixels stay float, which keeps the accuracy loss to the weights' rounding. Activations are
    quantized per call.
    """
    quantization = _require("onnxruntime.quantization")
    onnx = _require("onnx")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    onnx_data_path(out_path).unlink(missing_ok=True)
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    graph_inputs = {i.name for i in graph.input}
    float_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and graph_inputs & set(n.input)]
    with _without_log_records(logging.getLogger(), "consider to run pre-processing"):  # advice for static quantization
        quantization.quantize_dynamic(
            fp32_path, out_path, op_types_to_quantize=["MatMul"], per_channel=True,
            weight_type=quantization.QuantType.QInt8,
            # int8 weights are a quarter of fp32 ones; only a huge graph still needs external data.
            use_external_data_format=onnx_file_bytes(fp32_path) / 4 > EXTERNAL_DATA_THRESHOLD_BYTES if external_data is None else external_data,
            extra_options={"MatMulConstBOnly": True}, nodes_to_exclude=float_matmuls,
        )  # fmt: skip
    logger.info("quantized %s -> %s (%.1f MB)", fp32_path, out_path, onnx_file_bytes(out_path) / 1e6)


@contextmanager
def _without_log_records(target: logging.Logger, text: str) -> Iterator[None]:
    """Drop `target`'s log records containing `text` inside the block (a dependency's advice that does not apply)."""

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def _index_derived_nodes(graph) -> list[str]:
    """Nodes computed from integer graph inputs (and constants) only, never from a float input.

    These build position tables (rotary angles from patch coordinates): fp16 cannot hold an angle of 100 radians
    to better than 0.03, so they stay float32 while the heavy float path goes to fp16.
    """
    onnx = _require("onnx")
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    from_float = {i.name for i in graph.input if i.type.tensor_type.elem_type in float_types}
    from_int = {i.name for i in graph.input} - from_float
    names = []
    for node in graph.node:  # nodes are topologically sorted in a valid graph
        if any(x in from_float for x in node.input):
            from_float.update(node.output)
        elif any(x in from_int for x in node.input):
            from_int.update(node.output)
            names.append(node.name)
    return names


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> None:
    """fp16 weights and compute with float32 graph inputs and outputs (for GPUs; CPUs gain little from it).

    Position tables computed from integer inputs stay float32 (see `_index_derived_nodes`). onnxruntime's
    `OnnxModel` path is used rather than `float16.convert_float_to_float16` alone: the latter wraps every kept
    node in fp32->fp16->fp32 casts, which rounds the angles between kept nodes and undoes the point of keeping them.
    """
    onnx = _require("onnx")
    onnx_model = _require("onnxruntime.transformers.onnx_model")
    fp32_path = Path(fp32_path)
    model = onnx_model.OnnxModel(onnx.load(str(fp32_path)))  # loads the external data too
    blocked = _index_derived_nodes(model.model.graph)
    model.convert_float_to_float16(keep_io_types=True, node_block_list=blocked or None)
    _save_model(model.model, Path(out_path), n_weight_bytes=onnx_file_bytes(fp32_path) // 2)
    logger.info("converted %s -> %s to fp16 (%d index nodes kept float32)", fp32_path, out_path, len(blocked))


# The precisions a vision graph ships in, and their file names in a bundle.
VISION_FILES = {"fp32": "vision.onnx", "int8": "vision-int8.onnx", "fp16": "vision-fp16.onnx"}
# Mean per-token cosine vs fp32 a variant must reach. Measured with random weights: fp16 0.9999998 (tiny and
# 2B shapes), int8 0.9999 (tiny) and 0.9994 (2B, 448x448). Trained weights have outliers, so int8 gets room;
# below these floors the variant is broken, not rounded.
VARIANT_COSINE_FLOORS = {"int8": 0.99, "fp16": 0.9999}


def check_vision_dtypes(dtypes: Sequence[str]) -> None:
    unknown = [d for d in dtypes if d not in VISION_FILES]
    if unknown or not dtypes:
        raise ValueError(f"unknown vision dtypes {unknown or list(dtypes)}; choose from {list(VISION_FILES)}")


def export_vision_variants(
    make_module: Callable[[bool], object],
    spec: OnnxExportSpec,
    reference: Callable,
    input_sets: Sequence[tuple],
    out_dir: str | Path,
    dtypes: Sequence[str],
    *,
    fp32_report: Mapping[str, object] | None = None,
    progress: Callable[[str], None] | None = None,
    release_torch: Callable[[], None] | None = None,
) -> dict:
    """Write a vision graph in every precision of `dtypes` to `out_dir`, each one validated; return the manifest
    entry per dtype.

    `make_module(fused_attention)` gives the PyTorch module to export: fp32 (`fused_attention` False) is checked
    against `reference` (the Hugging Face forward) on every input set within `spec.atol`; fp16 is converted from
    it; int8, the CPU variant, is exported again with `fused_attention` True (onnxruntime's attention kernel) and
    quantized. Variants are checked against fp32 (`VARIANT_COSINE_FLOORS`). `fp32_report` adds entries to fp32's
    record (e.g. the validation grids). If "fp32" is not in `dtypes`, its file is removed at the end.
    `release_torch` is called once PyTorch is done (before the variants are made from the graphs), to free the
    tower's weights for the quantizer; memory freed between steps goes back to the OS.
    """
    check_vision_dtypes(dtypes)
    say = progress or (lambda step: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = out_dir / VISION_FILES["fp32"]

    say("exporting the vision encoder to ONNX")
    export_onnx(make_module(False), spec, input_sets[0], fp32_path)
    release_memory()
    say("validating the ONNX vision encoder against PyTorch")
    max_abs_diff = validate_onnx(fp32_path, reference, input_sets, spec.atol, f"{fp32_path.name} vs PyTorch")
    release_memory()
    report: dict = {"fp32": {"file": fp32_path.name, "max_abs_diff": max_abs_diff, "atol": spec.atol, **(fp32_report or {})}}  # fmt: skip
    # int8 is the CPU variant: onnxruntime only, so its attention can be onnxruntime's fused kernel (another export)
    fused_path = out_dir / "vision-fused-fp32.onnx"
    try:
        if "int8" in dtypes:
            say("exporting the fused-attention vision encoder (for int8)")
            export_onnx(make_module(True), spec, input_sets[0], fused_path)
        if release_torch is not None:
            release_torch()
        release_memory()
        for dtype in (d for d in VISION_FILES if d != "fp32" and d in dtypes):
            path = out_dir / VISION_FILES[dtype]
            say(f"making the {dtype} vision encoder")
            if dtype == "fp16":
                convert_fp16(fp32_path, path)
            else:
                external = (
                    onnx_file_bytes(fused_path) / 4 > EXTERNAL_DATA_THRESHOLD_BYTES
                )  # decided here, not in the child
                in_child_process(quantize_int8, fused_path, path, external)
                remove_onnx(fused_path)
            release_memory()
            report[dtype] = _variant_report(path, fp32_path, input_sets, VARIANT_COSINE_FLOORS[dtype])
    finally:
        remove_onnx(fused_path)
    if "fp32" not in dtypes:
        remove_onnx(fp32_path)
        del report["fp32"]
    return report


def _variant_report(path: Path, fp32_path: Path, input_sets: Sequence[tuple], cosine_floor: float) -> dict:
    agreement = compare_onnx(path, fp32_path, input_sets)
    check_agreement(agreement, cosine_floor, f"{path.name} vs {fp32_path.name}")
    report = {
        "file": path.name,
        "max_abs_diff_vs_fp32": agreement.max_abs_diff,
        "cosine_vs_fp32": agreement.mean_cosine,
        "min_cosine_vs_fp32": agreement.min_cosine,
    }
    logger.info("%s: %s", path.name, report)
    return report


def in_child_process(function: Callable, *args: object) -> object:
    """`function(*args)` in a fresh Python process (its exceptions re-raised here): onnxruntime's quantizer holds
    several copies of the graph at once (5 GB for a 1.6 GB tower), which then leave with the process instead of
    adding to the export's own peak."""
    import multiprocessing

    # leaving the block, by an interruption too, terminates the child at once
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def release_memory() -> None:
    """Collect garbage and give freed heap memory back to the OS (glibc keeps it otherwise: after a 2B tower's
    export, 2.3 GB of the process's 4.7 GB resident were free heap)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc is not None and hasattr(ctypes.CDLL(libc), "malloc_trim"):  # glibc only
        ctypes.CDLL(libc).malloc_trim(0)


def vision_variants(report: Mapping[str, Mapping[str, object]]) -> dict[str, VisionVariant]:
    """The manifest's vision variants from `export_vision_variants`' report."""
    return {
        dtype: VisionVariant(file=str(entry["file"]), dtype=dtype, validation={k: v for k, v in entry.items() if k != "file"})
        for dtype, entry in report.items()
    }  # fmt: skip


def vit_vision_spec(report: Mapping[str, Mapping[str, object]], dtypes: Sequence[str], config: Any,
                    patch_positions: PatchPositions, depth: int | None = None) -> VisionSpec:  # fmt: skip
    """The manifest's vision section of a ViT tower exported as `report` (`export_vision_variants`): the tower's sizes
    from `config` (a model config with `vision_config` and `text_config`); `depth`: the layers the graph runs, when
    it stops before the last (a feature layer)."""
    vision, text = config.vision_config, config.text_config
    return VisionSpec(
        variants=vision_variants(report), default=dtypes[0], embedding_dim=int(text.hidden_size),
        patch_positions=patch_positions, embed_dim=int(vision.hidden_size),
        depth=int(vision.num_hidden_layers) if depth is None else depth, num_heads=int(vision.num_attention_heads),
        mlp_ratio=vision.intermediate_size / vision.hidden_size,
    )  # fmt: skip


def remove_onnx(path: str | Path) -> None:
    """Delete a graph and its external data file, if any."""
    Path(path).unlink(missing_ok=True)
    onnx_data_path(path).unlink(missing_ok=True)


__all__ = [
    "VARIANT_COSINE_FLOORS",
    "VISION_FILES",
    "CosineValidationError",
    "OnnxAgreement",
    "OnnxExportSpec",
    "check_agreement",
    "check_vision_dtypes",
    "compare_onnx",
    "convert_fp16",
    "export_onnx",
    "export_vision_variants",
    "in_child_process",
    "onnx_data_path",
    "onnx_file_bytes",
    "quantize_int8",
    "release_memory",
    "remove_onnx",
    "validate_onnx",
]  # fmt: skip
