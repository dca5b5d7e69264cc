"""Qwen2-VL (Qwen2VLForConditionalGeneration): the first Qwen-VL family; what it shares with its successors is in
`edgevlm.exporters.qwen_family`."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..qwen_family import QwenVLFamily


class Qwen2VLFamily(QwenVLFamily):
    name = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)
    aliases = MappingProxyType({"qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct", "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct"})

    def tower_sizes(self, vision_config: Any) -> dict:
        return {
            "embed_dim": int(vision_config.embed_dim),
            "depth": int(vision_config.depth),
            "num_heads": int(vision_config.num_heads),
            "mlp_ratio": float(vision_config.mlp_ratio),
        }

    def build_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        from .synthetic import build_qwen2_vl

        return build_qwen2_vl(out_dir, seed=seed)


FAMILY = Qwen2VLFamily()
