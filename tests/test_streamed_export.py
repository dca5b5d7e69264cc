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
