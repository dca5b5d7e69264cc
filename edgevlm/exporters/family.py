"""What every exporter family provides (`Family`) and what its `load` returns (`Loaded`), with what all families
share: the transformers reference that parity checks compare a bundle against, and where a checkpoint keeps its chat
template.

A family lives in `edgevlm/exporters/<family>/`; its `__init__.py` declares it as `FAMILY`, an instance of a class
that subclasses `Family`. Looking a family up must stay cheap (`edgevlm export --help` lists them all): its methods
import torch, transformers and onnx, not its module.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from ..contract.kinds.positions import Positions
    from ..contract.kinds.tiling import Preprocessing
    from ..contract.manifest import TokenSpec, VisionSpec


@dataclass
class Loaded:
    """A checkpoint loaded for export, and the reference that parity checks run."""

    model_dir: Path
    model: Any  # the transformers model in eval mode: vision tower (+ projector) fp32, language model as checkpointed
    # (or on the meta device: `Family.load(..., vision_only=True)`)
    tokenizer: Any
    preprocessing: Preprocessing
    chat_template: str | None
    # frees the vision tower's weights once its graphs are exported (loads for export only: `vision_only`)
    release_vision: Callable[[], None] | None = None


class Family(Protocol):
    """What `edgevlm export` and the parity checks use of a family. A family class subclasses it: the methods marked
    abstract are its own; the transformers reference (`reference_logits`, `reference_greedy`) is shared, built on the
    family's `reference_inputs`."""

    name: str  # the manifest's `family`; tests/test_<name>.py is the family's parity suite
    architectures: tuple[str, ...]  # config.json "architectures" entries the family exports
    aliases: Mapping[str, str]  # short names users type -> hub ids
    vision_parts: tuple[str, ...]  # module paths export runs in PyTorch (tower, projector); the rest is the LLM

    @abstractmethod
    def build_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        """Write a tiny random-weight model directory of this family to `out_dir`: what tests export and check."""

    @abstractmethod
    def load(self, model_dir: Path, *, vision_only: bool = False) -> Loaded:
        """Load a checkpoint for export; refuses one whose settings the bundle would not reproduce. With
        `vision_only`, only the vision tower and projector get weights (the language model stays on the meta device
        and `export_llm` streams it from the shards): enough to export, not to run the reference."""

    @abstractmethod
    def export_vision(self, loaded: Loaded, out_dir: Path, dtypes: tuple[str, ...]) -> VisionSpec:
        """Write the vision graph in each of `dtypes` to `out_dir`, validated; the manifest's vision section."""

    @abstractmethod
    def export_llm(self, loaded: Loaded, path: Path, dtype: str) -> dict:
        """Write the language model as a GGUF of `dtype` (f32 / f16) to `path`; the manifest's LLM facts."""

    @abstractmethod
    def tokens(self, loaded: Loaded) -> TokenSpec:
        """The manifest's special tokens."""

    @abstractmethod
    def positions(self, loaded: Loaded) -> Positions:
        """The manifest's position strategy."""

    @abstractmethod
    def reference_inputs(self, loaded: Loaded, prompt: str, images: list[Any]) -> dict:
        """transformers' own inputs for one user turn (its chat template and image processor)."""

    def reference_logits(self, loaded: Loaded, prompt: str, images: list[Any]) -> np.ndarray:
        """transformers' logits at every position of one user turn, as float32 numpy."""
        import torch

        with torch.no_grad():
            return loaded.model(**self.reference_inputs(loaded, prompt, images)).logits[0].float().numpy()

    def reference_greedy(self, loaded: Loaded, prompt: str, images: list[Any], n_tokens: int) -> list[int]:
        """The ids transformers' greedy decoding appends to one user turn."""
        import torch

        inputs = self.reference_inputs(loaded, prompt, images)
        with torch.no_grad():
            out = loaded.model.generate(**inputs, max_new_tokens=n_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :].tolist()


def find_chat_template(tokenizer: Any, model_dir: str | Path | None) -> str | None:
    """The chat template: the tokenizer's, else `chat_template.jinja` / `chat_template.json` in `model_dir`."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        return template
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = Path(model_dir) / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
    return None
