"""Export streams the checkpoint (issue 24): the language model goes from the safetensors shards to the GGUF one
tensor at a time and only the vision tower and projector are loaded, with the result a fully loaded model gives,
byte for byte, for every family."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from edgevlm.exporters import families
from edgevlm.exporters.checkpoint import model_weights


@pytest.fixture(scope="module", params=sorted(families()))
def tiny(request, tmp_path_factory):
    family = families()[request.param]
    return family, family.build_tiny(tmp_path_factory.mktemp(f"tiny-{request.param}"), seed=0)


def test_streamed_gguf_is_byte_identical_to_one_written_from_the_loaded_model(tiny, tmp_path, monkeypatch):
    family, model_dir = tiny
    streamed = family.export_llm(family.load(model_dir, vision_only=True), tmp_path / "streamed.gguf", "f16")
    # the writer as it was: fed by the state_dict of the model from_pretrained loads whole
    module = inspect.getmodule(type(family).export_llm)
    monkeypatch.setattr(module, "checkpoint_weights", lambda model, _model_dir: model_weights(model))
    loaded = family.export_llm(family.load(model_dir), tmp_path / "loaded.gguf", "f16")
    assert streamed == loaded
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "loaded.gguf").read_bytes()


def test_vision_only_load_has_the_vision_weights_and_no_language_model(tiny):
    family, model_dir = tiny
    full, vision_only = family.load(model_dir).model, family.load(model_dir, vision_only=True).model
    assert vision_only.get_input_embeddings().weight.is_meta  # the language model was never allocated
    reference = {**dict(full.named_parameters()), **dict(full.named_buffers())}
    materialized = {name: t for name, t in [*vision_only.named_parameters(), *vision_only.named_buffers()] if not t.is_meta}  # fmt: skip
    assert len(materialized) > 10
    for name, tensor in materialized.items():  # buffers the checkpoint lacks (rotary frequencies) included
        assert tensor.dtype == reference[name].dtype and torch.equal(tensor, reference[name]), name
    vision_parameters = {name for name, _ in full.named_parameters() if "vision" in name or "visual" in name}
    assert vision_parameters and vision_parameters <= set(materialized)


def test_a_checkpoint_without_safetensors_is_refused_by_name(tmp_path):
    from edgevlm.errors import UnsupportedModelError
    from edgevlm.exporters.checkpoint import Checkpoint

    with pytest.raises(UnsupportedModelError, match="model.safetensors"):
        Checkpoint(Path(tmp_path))


def test_a_model_written_tensor_by_tensor_loads_whole_in_transformers(tmp_path):
    """The 7B benchmark model's builder (never built with weights) writes shards transformers loads completely."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from edgevlm.exporters.qwen2_5_vl.synthetic import build_qwen2_5_vl
    from edgevlm.exporters.qwen_synthetic import write_random_shards

    model_dir = build_qwen2_5_vl(tmp_path / "model", streamed=True, dtype="bfloat16")
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16 and len(list(model_dir.glob("model-*-of-*.safetensors"))) == 1
    assert model.config.architectures == ["Qwen2_5_VLForConditionalGeneration"]  # what export picks the family by
    assert torch.all(model.model.language_model.norm.weight == 1) and model.lm_head.weight.float().std() > 0.04
    with torch.device("meta"):
        meta = Qwen2_5_VLForConditionalGeneration(model.config)
    write_random_shards(meta, tmp_path, seed=0, init_std=0.05, dtype=torch.bfloat16, shard_bytes=2**20)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2  # shards split at shard_bytes


def test_dry_run_prints_the_plan_without_loading_or_writing(tiny, tmp_path):
    import subprocess
    import sys

    family, model_dir = tiny
    out = tmp_path / "bundle"
    flags = ["-o", str(out), "--vision-dtype", "fp32", "--vision-dtype", "int8", "--dry-run"]
    command = [sys.executable, "-m", "edgevlm.cli", "export", str(model_dir), *flags]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    for expected in ("vision.onnx", "vision-int8.onnx", "llm-Q4_K_M.gguf", "memory at the peak", "disk at the peak", family.name):  # fmt: skip
        assert expected in run.stdout
    assert not out.exists()


def test_export_refuses_a_disk_too_small_before_loading(tiny, tmp_path, monkeypatch):
    from edgevlm.exporters import bundle_export
    from edgevlm.exporters.estimate import HostResources, InsufficientResourcesError

    family, model_dir = tiny
    monkeypatch.setattr(bundle_export, "host_resources", lambda out_dir: HostResources(disk_free=10**6, memory_available=None))  # fmt: skip
    monkeypatch.setattr(type(family), "load", lambda *a, **k: pytest.fail("loaded the model before checking the disk"))  # fmt: skip
    with pytest.raises(InsufficientResourcesError, match=r"needs about .* GB on the disk .* 0\.0 GB is free"):
        bundle_export.export(str(model_dir), tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_estimate_matches_the_checkpoint_sizes(tiny):
    """The estimate counts parameters from the config alone: the same counts as the checkpoint's tensors."""
    from edgevlm.exporters.checkpoint import Checkpoint
    from edgevlm.exporters.estimate import estimate_export

    family, model_dir = tiny
    estimate = estimate_export(family, model_dir, "F16", ("fp32",))
    checkpoint = Checkpoint(model_dir)
    stored = sum(checkpoint.tensor(name).numel() for name in checkpoint.files)
    assert estimate.n_vision_params + estimate.n_llm_params == stored
    assert estimate.files["llm-F16.gguf"] == 2 * estimate.n_llm_params and estimate.disk_peak >= sum(estimate.files.values())  # fmt: skip
