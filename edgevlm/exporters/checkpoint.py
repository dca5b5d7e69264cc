"""A checkpoint read one tensor at a time: export never holds what it is not converting.

`Checkpoint` reads a model directory's safetensors shards by tensor name; a tensor keeps its shard mapped only while it
lives, so the pages it touched are released with it. `load_model` builds a transformers model without allocating
its weights (on the meta device) and loads only the parts export runs in PyTorch (the vision tower and projector);
`checkpoint_weights` gives the rest to the GGUF writers tensor by tensor, in the model's own `state_dict` order and
dtype, so the GGUF is byte for byte the one written from a fully loaded model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# A callable returning a fresh iterator of (model state_dict key, tensor), in state_dict order: what a GGUF writer
# converts. With shapes_only=True the tensors may be meta tensors (nothing read). `model_weights` of a loaded model,
# or `checkpoint_weights` streamed from the shards.
WeightSource = Callable[[bool], Iterator[tuple[str, "torch.Tensor"]]]


class Checkpoint:
    """The safetensors shards of a model directory, by tensor name (`model.safetensors` or an index of shards)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.model_dir / file for name, file in weight_map.items()}
        elif (self.model_dir / SINGLE_FILE).is_file():
            with safe_open(self.model_dir / SINGLE_FILE, framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), self.model_dir / SINGLE_FILE)
        else:
            raise UnsupportedModelError(
                f"{self.model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}: edgevlm exports safetensors "
                "checkpoints (convert a .bin checkpoint with transformers' save_pretrained first)"
            )

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, as stored: a view of its shard's mapping, whose pages are read when used and released with
        the tensor."""
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)

    def first_float_dtype(self) -> torch.dtype:
        """The dtype of the first floating tensor (what transformers' dtype="auto" falls back to)."""
        from safetensors import safe_open

        for name, file in self.files.items():
            with safe_open(file, framework="pt") as f:
                dtype = f.get_slice(name).get_dtype()
            if dtype in ("F64", "F32", "F16", "BF16"):
                return _SAFETENSORS_DTYPES[dtype]()
        raise UnsupportedModelError(f"{self.model_dir}'s checkpoint has no floating-point tensor")


def _torch_dtype(name: str) -> Callable[[], Any]:
    def get() -> Any:
        import torch

        return getattr(torch, name)

    return get


_SAFETENSORS_DTYPES = {"F64": _torch_dtype("float64"), "F32": _torch_dtype("float32"), "F16": _torch_dtype("float16"), "BF16": _torch_dtype("bfloat16")}  # fmt: skip


def load_model(model_class: Any, model_dir: Path, vision_parts: tuple[str, ...], *, vision_only: bool) -> Any:
    """`model_class` from `model_dir` in eval mode, its `vision_parts` (module paths) in float32 and the rest in the
    checkpoint's dtype, as `from_pretrained(dtype="auto")`. With `vision_only`, the rest stays on the meta device
    (no memory): only the vision parts are read from the shards."""
    import torch

    if not vision_only:
        model = model_class.from_pretrained(model_dir, dtype="auto").eval()
        for path in vision_parts:
            model.get_submodule(path).to(torch.float32)
        return model
    model = empty_model(model_class, model_dir)
    checkpoint = Checkpoint(model_dir)
    model_keys = _model_keys(model, checkpoint)
    dtype = next(model.parameters()).dtype
    for path in vision_parts:
        part = model.get_submodule(path)
        part.to_empty(device="cpu").to(torch.float32)
        _initialize_buffers(part, model)
        expected = {f"{path}.{key}" for key in part.state_dict()}
        state = {model_keys[name]: name for name in model_keys if model_keys[name] in expected}
        missing = sorted(expected - set(state))
        if missing:
            raise UnsupportedModelError(f"{model_dir}'s checkpoint lacks {len(missing)} tensors of {path}, e.g. {missing[:3]}")  # fmt: skip
        # as from_pretrained: the checkpoint's tensor in the model's dtype, then the part's float32
        part.load_state_dict(
            {key[len(path) + 1 :]: checkpoint.tensor(name).to(dtype) for key, name in state.items()}, strict=True
        )
    return model.eval()


def vision_release(model: Any, vision_parts: tuple[str, ...], *, vision_only: bool) -> Callable[[], None] | None:
    """For a model loaded for export only (`vision_only`), what moves its vision parts to the meta device, freeing
    their weights once the graphs are exported; None for a full load (the reference keeps its weights)."""
    if not vision_only:
        return None

    def release() -> None:
        for path in vision_parts:
            model.get_submodule(path).to("meta")

    return release


def empty_model(model_class: Any, model_dir: Path) -> Any:
    """`model_class` built from `model_dir`'s config on the meta device (no weights allocated), in the dtype
    `from_pretrained(dtype="auto")` would give it, its embeddings tied as the config says."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    dtype = getattr(config, "dtype", None) or Checkpoint(model_dir).first_float_dtype()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=dtype)
    model.tie_weights()
    model.name_or_path = str(model_dir)  # as from_pretrained: writers name the GGUF after it
    return model


def model_weights(model: Any) -> WeightSource:
    """The weights of a model in memory (its `state_dict`, tied tensors under each name)."""
    return lambda shapes_only: iter(model.state_dict().items())


def checkpoint_weights(model: Any, model_dir: Path) -> WeightSource:
    """The weights `model_weights(model)` would give once loaded, read one at a time from `model_dir`'s shards:
    the same keys in the same order, each in the model's dtype. A key the checkpoint lacks is read under the name
    of the tensor tied to it (an output layer tied to the token embeddings)."""
    checkpoint = Checkpoint(model_dir)
    by_model_key = {model_key: name for name, model_key in _model_keys(model, checkpoint).items()}
    tied = _tied_sources(model)

    def weights(shapes_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
        for key, meta in model.state_dict().items():
            source = by_model_key.get(key) or by_model_key.get(tied.get(key, ""))
            if source is None:
                raise UnsupportedModelError(f"{model_dir}'s checkpoint has no tensor for {key}")
            yield key, meta.to("meta") if shapes_only else checkpoint.tensor(source).to(meta.dtype)

    return weights


def _model_keys(model: Any, checkpoint: Checkpoint) -> dict[str, str]:
    """Checkpoint tensor name -> the model's state_dict key, by transformers' own renaming of older checkpoints."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    if len(renamings) != len(transforms):
        raise UnsupportedModelError(f"{type(model).__name__} checkpoints need weight conversions beyond renaming: edgevlm reads them as stored")  # fmt: skip
    expected = model.state_dict()
    keys = {}
    for name in checkpoint.files:
        key, _ = rename_source_key(name, renamings, [], model.base_model_prefix, expected)
        if key in expected:
            keys[name] = key
    return keys


def _tied_sources(model: Any) -> dict[str, str]:
    """state_dict key -> the key of the tensor it shares (the first name the tensor has in the state_dict)."""
    first: dict[int, str] = {}
    tied = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner = first.setdefault(id(tensor), key)
        if owner != key:
            tied[key] = owner
    return tied


def _initialize_buffers(part: Any, model: Any) -> None:
    """Recompute the buffers the checkpoint does not store (rotary frequencies, position ids) in `part` just moved
    off the meta device, by transformers' own initialisation of each module (its innermost pretrained model's)."""
    from transformers import PreTrainedModel

    def walk(module: Any, owner: Any) -> None:
        owner = module if isinstance(module, PreTrainedModel) else owner
        owner._init_weights(module)
        for child in module.children():
            walk(child, owner)

    walk(part, model)
