"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): what differs from Qwen2-VL on the export side.

Everything the runtime sees is Qwen2-VL's: the same image processor (`dynamic-patches` preprocessing), the same vision
graph inputs (window attention is computed inside the graph, see `qwen_vit.WindowAttention`), the same
`qwen2vl` GGUF (llama.cpp's converter maps this architecture to it) and the same M-RoPE positions for images
(transformers' `get_rope_index` scales time by `second_per_grid_ts` for videos only). What differs is the
vision tower's shape, so this family only changes which grids validate the graph and how the tower is sized.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..qwen_family import QwenVLFamily


class Qwen2_5_VLFamily(QwenVLFamily):
    name = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    aliases = MappingProxyType({"qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct"})  # fmt: skip

    def validation_grids(self, vision_config: Any) -> tuple[tuple[int, int, int], ...]:
        """A grid inside one window, one a window and a half wide and more than two high (edge windows cut by the
        image), and one exactly three windows wide."""
        from ..qwen_vit import WindowAttention

        side, merge = WindowAttention.of(vision_config).side, int(vision_config.spatial_merge_size)
        return ((1, 2 * merge, 3 * merge), (1, 2 * side + merge, side + 2 * merge), (1, side, 3 * side))

    def tower_sizes(self, vision_config: Any) -> dict:
        hidden = int(vision_config.hidden_size)
        return {
            "embed_dim": hidden,
            "depth": int(vision_config.depth),
            "num_heads": int(vision_config.num_heads),
            # the estimate counts a two-matrix MLP; the gated MLP's three matrices do the work of one 1.5x wider
            "mlp_ratio": 1.5 * int(vision_config.intermediate_size) / hidden,
        }

    def build_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        from .synthetic import build_qwen2_5_vl

        return build_qwen2_5_vl(out_dir, seed=seed)


FAMILY = Qwen2_5_VLFamily()
