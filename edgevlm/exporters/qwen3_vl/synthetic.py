"""Qwen3-VL model directories built from configs: tiny ones for tests, Qwen3-VL-2B's published sizes for benchmarks
(random weights), with the real Qwen2 vocabulary and Qwen3's added tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..qwen_synthetic import QWEN2_5_EXTRA_TOKENS, qwen2_tokenizer, write_model_dir

# Added tokens Qwen3's tokenizer has after Qwen2.5's (ids 151665-151668), not special.
QWEN3_EXTRA_TOKENS = [*QWEN2_5_EXTRA_TOKENS, "<tool_response>", "</tool_response>", "<think>", "</think>"]

# Qwen3-VL-*-Instruct's chat template as published, without its tool-calling branch (no tools are passed): unlike
# Qwen2-VL's it adds no default system prompt.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}"
    "{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# preprocessor_config.json as Qwen/Qwen3-VL-*-Instruct publish it (pixels between 256 and 16384 merged tokens)
QWEN3_VL_PROCESSOR = {
    "size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}  # fmt: skip


@dataclass(frozen=True)
class Qwen3VLShape:
    """The sizes that define a Qwen3-VL model (vision tower with DeepStack mergers, language model)."""

    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    num_position_embeddings: int  # a square learned grid
    deepstack_visual_indexes: tuple[int, ...]
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    vocab_size: int = 151936
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = True


# Qwen/Qwen3-VL-2B-Instruct's published sizes.
QWEN3_VL_2B = Qwen3VLShape(
    vision_depth=24, vision_hidden=1024, vision_intermediate=4096, vision_heads=16, num_position_embeddings=2304,
    deepstack_visual_indexes=(5, 11, 17), hidden_size=2048, intermediate_size=6144, layers=28, heads=16, kv_heads=8,
    head_dim=128,
)  # fmt: skip
# Tiny: two DeepStack sets from non-adjacent layers, added after the first two of three language model layers; a head
# size unlike hidden / heads and Qwen3-VL's own rope sections (so llama.cpp's interleaved layout is exercised); a
# 6 x 6 learned position grid, resampled down and up by the test images; every row length a multiple of 256.
QWEN3_VL_TINY = Qwen3VLShape(
    vision_depth=4, vision_hidden=64, vision_intermediate=128, vision_heads=4, num_position_embeddings=36,
    deepstack_visual_indexes=(0, 2), hidden_size=256, intermediate_size=512, layers=3, heads=4, kv_heads=2,
    head_dim=128, max_position_embeddings=4096,
)  # fmt: skip


def qwen3_vl_config(shape: Qwen3VLShape):
    """A transformers `Qwen3VLConfig` with the given sizes and Qwen3-VL's other published settings."""
    from transformers import Qwen3VLConfig

    vision = {
        "depth": shape.vision_depth, "hidden_size": shape.vision_hidden, "intermediate_size": shape.vision_intermediate,
        "num_heads": shape.vision_heads, "out_hidden_size": shape.hidden_size, "hidden_act": "gelu_pytorch_tanh",
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
        "num_position_embeddings": shape.num_position_embeddings,
        "deepstack_visual_indexes": list(shape.deepstack_visual_indexes),
    }  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": list(shape.mrope_section), "mrope_interleaved": True}  # fmt: skip
    text = {
        "vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim, "max_position_embeddings": shape.max_position_embeddings, "rms_norm_eps": 1e-6,
        "rope_parameters": rope, "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
        "tie_word_embeddings": shape.tie_word_embeddings,
    }  # fmt: skip
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=shape.tie_word_embeddings)


def build_qwen3_vl(
    out_dir: str | Path,
    shape: Qwen3VLShape = QWEN3_VL_TINY,
    *,
    seed: int = 0,
    init_std: float = 0.05,
    dtype: str = "float32",
    processor_kwargs: dict | None = None,
) -> Path:
    """Write a random-weight Qwen3-VL model directory (config, safetensors, tokenizer, processor, chat template) to
    `out_dir`; loads with `Qwen3VLForConditionalGeneration.from_pretrained(out_dir)`. `processor_kwargs` default to
    the published processor's settings."""
    from transformers import Qwen3VLForConditionalGeneration

    config = qwen3_vl_config(shape)
    tokenizer = qwen2_tokenizer(extra_tokens=QWEN3_EXTRA_TOKENS)
    return write_model_dir(out_dir, Qwen3VLForConditionalGeneration, config, tokenizer, seed=seed, init_std=init_std, dtype=dtype,
                           processor_kwargs=processor_kwargs or QWEN3_VL_PROCESSOR, chat_template=QWEN3_VL_CHAT_TEMPLATE)  # fmt: skip
