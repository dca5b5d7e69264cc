"""Qwen2.5-VL model directories built from configs: a Qwen2-VL shape plus the tower's gated MLP and windows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..qwen_synthetic import (
    QWEN2_5_EXTRA_TOKENS,
    QWEN2_VL_TINY,
    Qwen2VLShape,
    qwen2_text_config,
    qwen2_tokenizer,
    write_model_dir,
)


@dataclass(frozen=True)
class Qwen2_5_VLWindows:
    """What Qwen2.5-VL's vision tower adds to a `Qwen2VLShape`: a gated MLP width and window attention."""

    vision_intermediate_size: int
    window_size: int  # pixels
    fullatt_block_indexes: tuple[int, ...]


# Qwen2.5-VL-3B/7B-Instruct's vision tower.
QWEN2_5_VL_WINDOWS = Qwen2_5_VLWindows(vision_intermediate_size=3420, window_size=112, fullatt_block_indexes=(7, 15, 23, 31))  # fmt: skip
# Qwen2.5-VL-7B-Instruct's published sizes (for benchmarks: built with `streamed=True`, it never fits in memory whole).
QWEN2_5_VL_7B = Qwen2VLShape(
    vision_depth=32, vision_embed_dim=1280, vision_heads=16, hidden_size=3584, intermediate_size=18944,
    layers=28, heads=28, kv_heads=4, mrope_section=[16, 24, 24], vocab_size=152064, max_position_embeddings=128000,
    tie_word_embeddings=False,
)  # fmt: skip
# Tiny: windows of 2 x 2 merged tokens (56 px), so the test images span many windows, some cut by the image
# edge; window attention in blocks 0 and 2, full attention in blocks 1 and 3.
QWEN2_5_VL_TINY = replace(QWEN2_VL_TINY, vision_depth=4)
QWEN2_5_VL_TINY_WINDOWS = Qwen2_5_VLWindows(vision_intermediate_size=128, window_size=56, fullatt_block_indexes=(1, 3))  # fmt: skip


def qwen2_5_vl_config(shape: Qwen2VLShape, windows: Qwen2_5_VLWindows = QWEN2_5_VL_WINDOWS):
    """A transformers `Qwen2_5_VLConfig` with the given sizes and Qwen2.5-VL's other published settings."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(
        depth=shape.vision_depth,
        hidden_size=shape.vision_embed_dim,
        intermediate_size=windows.vision_intermediate_size,
        num_heads=shape.vision_heads,
        out_hidden_size=shape.hidden_size,
        hidden_act="silu",
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=2,
        window_size=windows.window_size,
        fullatt_block_indexes=list(windows.fullatt_block_indexes),
    )
    text = qwen2_text_config(shape)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=shape.tie_word_embeddings)


def build_qwen2_5_vl(
    out_dir: str | Path,
    shape: Qwen2VLShape = QWEN2_5_VL_TINY,
    windows: Qwen2_5_VLWindows = QWEN2_5_VL_TINY_WINDOWS,
    *,
    seed: int = 0,
    init_std: float = 0.05,
    dtype: str = "float32",
    processor_kwargs: dict | None = None,
    streamed: bool = False,
) -> Path:
    """Write a random-weight Qwen2.5-VL model directory (config, safetensors, tokenizer, processor) to `out_dir`;
    as `build_qwen2_vl`, loads with `Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir)`.

    `init_std` 0.05: at 0.02 the tiny model's greedy continuation of the one-image parity case meets a near tie
    (llama.cpp and transformers part at token 14 with logits 0.003 apart). `streamed`: see `write_model_dir`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = qwen2_5_vl_config(shape, windows)
    tokenizer = qwen2_tokenizer(extra_tokens=QWEN2_5_EXTRA_TOKENS)
    return write_model_dir(out_dir, Qwen2_5_VLForConditionalGeneration, config, tokenizer, seed=seed, init_std=init_std, dtype=dtype, processor_kwargs=processor_kwargs, streamed=streamed)  # fmt: skip
