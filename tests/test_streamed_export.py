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
    assert torch.all(model.model.language_model.norm.weight == 1) and model.lm_head.weight.float().std() > 0.04
    with torch.device("meta"):
        meta = Qwen2_5_VLForConditionalGeneration(model.config)
    write_random_shards(meta, tmp_path, seed=0, init_std=0.05, dtype=torch.bfloat16, shard_bytes=2**20)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2  # shards split at shard_bytes
