"""`edgevlm export`: resolve a model, export its vision graph and language model, write and check the bundle."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..budget import DEFAULT_MAX_IMAGE_TOKENS, BudgetLimits, model_token_range
from ..bundle import Bundle, BundleWriter, check_output_dir
from ..contract.kinds.tiling import Preprocessing, TiledPreprocessing
from ..contract.manifest import VISION_DTYPES, LLMSpec, Manifest
from ..errors import BudgetError, EdgeVLMError, UnsupportedModelError
from ..progress import stage
from .discovery import PACKAGED_MODELS, aliases, family_for
from .estimate import ExportEstimate, HostResources, check_disk, estimate_export, host_resources, shortfalls
from .gguf import quantize_gguf
from .onnx_export import release_memory

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("Q4_K_M", "Q8_0", "F16", "F32")
# files a VLM export needs from a hub repository (not the optimizer states, not other formats)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def resolve_model(model: str) -> tuple[Path, str, str | None]:
    """A local directory for `model` (alias, hub id or path): (directory, source name, revision)."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local, str(local.absolute()), None
    if model in PACKAGED_MODELS:
        package, folder = PACKAGED_MODELS[model]
        return Path(importlib.import_module(package).__file__).parent / folder, f"edgevlm-{model}", __version__
    if "/" not in model and model not in aliases():
        raise UnsupportedModelError(
            f"unknown model {model!r}: not a directory, a hub id (org/name) or an alias. "
            f"Known aliases: {', '.join(sorted({**aliases(), **PACKAGED_MODELS}))}."
        )
    repo_id = aliases().get(model, model)
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated model: all end the same way for the user
        raise EdgeVLMError(
            f"could not get {repo_id} from the Hugging Face hub or its local cache ({type(e).__name__}: {e}). "
            "Without a network, pass a local model directory or an id already in the cache."
        ) from e
    return path, repo_id, path.name


def default_output(source: str, quantization: str) -> Path:
    return Path.cwd() / f"{Path(source).name.lower()}-{quantization}"


@dataclass(frozen=True)
class ExportPlan:
    """What an export will read and write, and whether the host can take it: known before any weight loads."""

    model_dir: Path
    source: str
    revision: str | None
    out_dir: Path
    architecture: str
    family_name: str
    quantization: str
    vision_dtypes: tuple[str, ...]
    estimate: ExportEstimate
    host: HostResources

    def shortfalls(self) -> list[str]:
        """What the host lacks, one sentence each; empty when the export fits."""
        return shortfalls(self.estimate, self.host, self.out_dir)


def plan_export(
    model: str,
    output: str | os.PathLike | None = None,
    *,
    quantization: str = "Q4_K_M",
    vision_dtypes: tuple[str, ...] = ("fp32",),
    force: bool = False,
    max_image_tokens: int | None = None,
) -> ExportPlan:
    """Check the arguments and estimate the export (`edgevlm export --dry-run`): what it will write, its peak memory
    and disk, and the host's; from the config alone (the model is built on the meta device)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    bad = [d for d in vision_dtypes if d not in VISION_DTYPES]
    if bad or not vision_dtypes:
        raise ValueError(f"vision dtypes {bad or '(none)'} invalid; choose from {', '.join(VISION_DTYPES)}")
    BudgetLimits(max_image_tokens=max_image_tokens)  # refuses a bad value before anything loads
    if output is not None:
        check_output_dir(Path(output), force)

    model_dir, source, revision = resolve_model(model)
    out_dir = Path(output) if output is not None else default_output(source, quantization)
    check_output_dir(out_dir, force)
    architecture = _architecture(model_dir)
    family = family_for(architecture)
    estimate = estimate_export(family, model_dir, quantization, vision_dtypes)
    return ExportPlan(model_dir, source, revision, out_dir, architecture, family.name, quantization, vision_dtypes, estimate, host_resources(out_dir))  # fmt: skip


def export(
    model: str,
    output: str | os.PathLike | None = None,
    *,
    quantization: str = "Q4_K_M",
    vision_dtypes: tuple[str, ...] = ("fp32",),
    force: bool = False,
    verify: bool = False,
    max_image_tokens: int | None = None,
) -> Path:
    """Export `model` to a bundle directory and return its path. Arguments, and the free disk space against the
    export's estimate, are checked before anything loads.

    `max_image_tokens` is the bundle's default cap per image (its manifest `budget` section); None writes
    `DEFAULT_MAX_IMAGE_TOKENS`, or the model's own maximum if that is lower.
    """
    plan = plan_export(model, output, quantization=quantization, vision_dtypes=vision_dtypes, force=force, max_image_tokens=max_image_tokens)  # fmt: skip
    check_disk(plan.estimate, plan.host, plan.out_dir)
    for problem in plan.shortfalls():
        logger.warning("%s", problem)
    model_dir, source, revision, out_dir, architecture = plan.model_dir, plan.source, plan.revision, plan.out_dir, plan.architecture  # fmt: skip
    family = family_for(architecture)

    with stage(f"loading {source} (vision tower and projector; the language model is streamed)"):
        loaded = family.load(model_dir, vision_only=True)
    budget = _bundle_budget(loaded.preprocessing, max_image_tokens)  # checked before the long export steps
    with BundleWriter(out_dir, force=force) as writer:
        with stage(f"exporting the vision encoder ({', '.join(vision_dtypes)})"):
            vision = family.export_vision(loaded, writer.tmp_dir, vision_dtypes)
        llm_file = f"llm-{quantization}.gguf"
        if quantization in ("F32", "F16"):
            with stage(f"writing the language model as {quantization} GGUF"):
                llm_info = family.export_llm(loaded, writer.path(llm_file), quantization.lower())
        else:
            staging = writer.path("llm-F16.gguf.staging")
            with stage("writing the language model as F16 GGUF"):
                llm_info = family.export_llm(loaded, staging, "f16")
            release_memory()  # the converted tensors' heap, while llama.cpp's quantizer runs beside this process
            with stage(f"quantizing the language model to {quantization} (llama.cpp)"):
                quantize_gguf(staging, writer.path(llm_file), quantization)
            staging.unlink()
        manifest = Manifest(
            family=family.name,
            source={"model": source, "revision": revision, "architecture": architecture},
            preprocessing=loaded.preprocessing,
            vision=vision,
            llm=LLMSpec(
                file=llm_file,
                quantization=quantization,
                arch=llm_info["arch"],
                n_ctx_train=llm_info["n_ctx_train"],
                embedding_length=llm_info["embedding_length"],
                text_normalization=llm_info.get("text_normalization"),
                image_attention=llm_info.get("image_attention", "causal"),
            ),
            tokens=family.tokens(loaded),
            positions=family.positions(loaded),
            validation={"vision": {d: v.validation for d, v in vision.variants.items()}},
            budget=budget,
            edgevlm_version=__version__,
        )
        if verify:
            from ..llama_backend import deliver_interrupts
            from .verify import verify_bundle

            del loaded  # the reference loads the whole model
            with stage("verifying the bundle against transformers"), deliver_interrupts():  # Ctrl-C in llama.cpp
                report = verify_bundle(Bundle(writer.tmp_dir, manifest), family, family.load(model_dir))
            manifest = dataclasses.replace(manifest, validation={**manifest.validation, "end_to_end": report})
        return writer.commit(manifest)


def _bundle_budget(preprocessing: Preprocessing, max_image_tokens: int | None) -> BudgetLimits:
    model_min, model_max = model_token_range(preprocessing)
    if max_image_tokens is None and isinstance(preprocessing, TiledPreprocessing):
        return BudgetLimits()  # the processor's own grid; tiles cost memory one at a time
    if max_image_tokens is None:
        return BudgetLimits(max_image_tokens=min(DEFAULT_MAX_IMAGE_TOKENS, model_max))
    if max_image_tokens < model_min:
        raise BudgetError(f"max_image_tokens={max_image_tokens} is below this model's minimum of {model_min} tokens per image; use at least {model_min}")  # fmt: skip
    return BudgetLimits(max_image_tokens=max_image_tokens)


def _architecture(model_dir: Path) -> str:
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeVLMError(f"{config_path} is missing or unreadable ({e}); is {model_dir} a Hugging Face model?") from e
    architectures = config.get("architectures") or []
    if not architectures:
        raise UnsupportedModelError(f"{config_path} names no architecture; cannot tell which exporter to use.")
    return architectures[0]
