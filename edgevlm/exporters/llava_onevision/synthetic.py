"""Tiny random LLaVA-OneVision model directories built from configs, for machines without a model hub.

The shape is llava-onevision-qwen2-0.5b-ov-hf's where it matters to the bundle (a SigLIP tower whose last layer's
features, all of them, go through a linear-GELU-linear projector; AnyRes with a 6 x 6 grid of pinpoints and
`anyres_max_9`; a learned `image_newline`; a Qwen2 LLM with tied embeddings and the real Qwen2 vocabulary, with
`<image>` and `<video>` right after Qwen2's three chat tokens, as llava-hf's tokenizer has them) and tiny elsewhere:
32-pixel tiles of 8-pixel patches (16 tokens a tile), so test images make several grids and large ones trigger the
`anyres_max` downsampling.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# llava-hf/llava-onevision-qwen2-*-ov-hf's chat template (transformers' conversion script writes it)
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# llava-onevision's special tokens, ids 151643-151647
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 151646, 151647

TILE, PATCH = 32, 8
TINY_PINPOINTS = [[TILE * rows, TILE * cols] for rows in range(1, 7) for cols in range(1, 7)]
TINY_VISION = {
    "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "image_size": TILE, "patch_size": PATCH, "vision_use_head": False,
}  # fmt: skip
# Row lengths (hidden 256, intermediate 512) are multiples of 256, as K-quants need.
TINY_TEXT = {
    "vocab_size": 151936, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}, "bos_token_id": 151643,
    "eos_token_id": 151645, "tie_word_embeddings": True,
}  # fmt: skip


def build_llava_onevision(out_dir: str | Path, *, seed: int = 0, init_std: float = 0.02) -> Path:
    """Write a tiny random-weight LLaVA-OneVision model directory (config, safetensors, tokenizer, image processor,
    chat template) to `out_dir`."""
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from ..qwen_synthetic import qwen2_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**TINY_VISION, initializer_range=init_std),
        text_config=Qwen2Config(**TINY_TEXT, initializer_range=init_std),
        image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID, projector_hidden_act="gelu",
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=TINY_PINPOINTS,
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True,
    )  # fmt: skip
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    tokenizer = qwen2_tokenizer(special_tokens=SPECIAL_TOKENS)
    tokenizer.chat_template = LLAVA_ONEVISION_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, image_grid_pinpoints=TINY_PINPOINTS, image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(out_dir)  # fmt: skip
    (out_dir / "chat_template.jinja").write_text(LLAVA_ONEVISION_CHAT_TEMPLATE)
    logger.info("wrote %s (%.1fM parameters)", out_dir, sum(p.numel() for p in model.parameters()) / 1e6)
    return out_dir
