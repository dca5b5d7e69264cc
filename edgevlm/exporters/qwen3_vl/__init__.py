"""Qwen3-VL (Qwen3VLForConditionalGeneration): what differs from Qwen2-VL on the export side.

- Vision: 16-px patches (32 px per merged token), learned position embeddings bilinearly resampled to each image's
  grid (computed inside the graph from the patch positions, so the graph's inputs stay Qwen2-VL's), and DeepStack:
  the states of the layers `deepstack_visual_indexes`, each through its own merger, go to the language model beside
  the main tokens (`vision.Qwen3VLVisionForExport`).
- Language model: Qwen3 (q/k norms, its own head size) as llama.cpp's `qwen3vl` GGUF, which takes each image row
  n_embd x (1 + DeepStack sets) wide and adds set i to the hidden states after layer i (`llm`).
- Positions: Qwen2-VL's (t, row, col) and text advance, with llama.cpp's interleaved M-RoPE reading a fourth slot
  that must carry the time position (`mrope-3d-interleaved`).
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

from ...contract.kinds.positions import MRope3DInterleaved
from ..family import Loaded
from ..qwen_family import QwenVLFamily
from .llm import QWEN3VL_FORMAT


class Qwen3VLFamily(QwenVLFamily):
    name = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)
    aliases = MappingProxyType({f"qwen3-vl-{size}": f"Qwen/Qwen3-VL-{size.upper()}-Instruct" for size in ("2b", "4b", "8b")})  # fmt: skip
    llm_format = QWEN3VL_FORMAT

    def vision_wrapper(self) -> type:
        from .vision import Qwen3VLVisionForExport

        return Qwen3VLVisionForExport

    def validation_grids(self, vision_config: Any) -> tuple[tuple[int, int, int], ...]:
        """One row of merged tokens, odd token counts both ways, and a grid larger than the learned position grid
        (whose embeddings are then resampled up) beside smaller ones (resampled down)."""
        side = int(int(vision_config.num_position_embeddings) ** 0.5)
        merge = int(vision_config.spatial_merge_size)
        tall = merge * (side // merge + 1)  # more rows of patches than the learned grid has
        return ((1, merge, 7 * merge), (1, 3 * merge, 5 * merge), (1, tall, 3 * merge))

    def tower_sizes(self, vision_config: Any) -> dict:
        hidden = int(vision_config.hidden_size)
        return {
            "embed_dim": hidden,
            "depth": int(vision_config.depth),
            "num_heads": int(vision_config.num_heads),
            "mlp_ratio": int(vision_config.intermediate_size) / hidden,
        }

    def positions(self, loaded: Loaded) -> MRope3DInterleaved:
        return MRope3DInterleaved(merge_size=loaded.preprocessing.merge_size)

    def build_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        from .synthetic import build_qwen3_vl

        return build_qwen3_vl(out_dir, seed=seed)


FAMILY = Qwen3VLFamily()
