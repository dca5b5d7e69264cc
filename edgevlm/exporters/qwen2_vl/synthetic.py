"""Qwen2-VL model directories built from configs: tiny random ones for tests, and Qwen2-VL-2B's published sizes
with random weights for benchmarks."""

from __future__ import annotations

from pathlib import Path

from ..qwen_synthetic import QWEN2_VL_TINY, Qwen2VLShape, qwen2_text_config, qwen2_tokenizer, write_model_dir

# Published sizes of Qwen/Qwen2-VL-2B-Instruct.
QWEN2_VL_2B = Qwen2VLShape(
    vision_depth=32, vision_embed_dim=1280, vision_heads=16, hidden_size=1536, intermediate_size=8960,
    layers=28, heads=12, kv_heads=2, mrope_section=[16, 24, 24],
)  # fmt: skip


def qwen2_vl_config(shape: Qwen2VLShape):
    """A transformers `Qwen2VLConfig` with the given sizes and Qwen2-VL's other published settings."""
    from transformers import Qwen2VLConfig

    vision = dict(
        depth=shape.vision_depth,
        embed_dim=shape.vision_embed_dim,
        num_heads=shape.vision_heads,
        hidden_size=shape.hidden_size,
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        hidden_act="quick_gelu",
    )
    text = qwen2_text_config(shape)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=shape.tie_word_embeddings)


def build_qwen2_vl(
    out_dir: str | Path,
    shape: Qwen2VLShape = QWEN2_VL_TINY,
    *,
    seed: int = 0,
    init_std: float = 0.02,
    dtype: str = "float32",
    processor_kwargs: dict | None = None,
) -> Path:
    """Write a random-weight Qwen2-VL model directory (config, safetensors, tokenizer, processor) to `out_dir`.

    `init_std` is the standard deviation of all weights: larger values make a random model's greedy choices
    decisive (top-1 far from top-2), which parity tests need. The result loads with
    `Qwen2VLForConditionalGeneration.from_pretrained(out_dir)`, `AutoTokenizer.from_pretrained(out_dir)` and
    `Qwen2VLImageProcessorPil.from_pretrained(out_dir)`.
    """
    from transformers import Qwen2VLForConditionalGeneration

    config = qwen2_vl_config(shape)
    return write_model_dir(out_dir, Qwen2VLForConditionalGeneration, config, qwen2_tokenizer(), seed=seed, init_std=init_std, dtype=dtype, processor_kwargs=processor_kwargs)  # fmt: skip
