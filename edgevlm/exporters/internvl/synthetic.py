"""Tiny random InternVL3 ("-hf", `InternVLForConditionalGeneration`) model directories built from configs, for
machines without a model hub.

The shape is InternVL3's where it matters to the bundle (an InternViT tower with a CLS token, learned position
embeddings, layer scale and, here, qk norm; the last layer's patches pixel-shuffled 2x2 into one token; a LayerNorm
+ MLP projector; a Qwen2 language model with tied embeddings) and tiny elsewhere: 64 px tiles of 8 px patches, 16
tokens per view, at most 6 tiles. The tokenizer is Qwen2's real BPE vocabulary (`qwen_synthetic.qwen2_tokenizer`)
with Qwen2.5's added tokens, then InternVL's (`<img>`, `</img>`, `<IMG_CONTEXT>`, ..., as OpenGVLab's conversion
adds them), and the chat template of InternVL3-*-hf.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# InternVL3-*-hf's chat template (transformers' conversion script writes it): no default system turn, each image
# content as "<IMG_CONTEXT>\n".
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# Added after Qwen2.5's tokens (ids 151665-151673), special, as OpenGVLab's conversion adds them.
INTERNVL_SPECIAL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]  # fmt: skip
# The tokenizer's named tokens `InternVLProcessor` reads (`tokenizer.start_image_token`, ...).
INTERNVL_NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}  # fmt: skip
IMAGE_CONTEXT_ID = 151667

TINY_VISION = {
    "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "image_size": 64, "patch_size": 8, "use_qk_norm": True, "attention_bias": True, "norm_type": "layer_norm",
    "layer_scale_init_value": 0.1, "use_mean_pooling": True, "hidden_act": "gelu",
}  # fmt: skip
# Row lengths (hidden 256, intermediate 512) are multiples of 256, as K-quants need.
TINY_TEXT = {
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}, "bos_token_id": 151643,
    "eos_token_id": 151645, "tie_word_embeddings": True,
}  # fmt: skip
TINY_PROCESSOR = {"size": {"height": 64, "width": 64}, "min_patches": 1, "max_patches": 6, "crop_to_patches": False,
                  "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}  # fmt: skip


def internvl_tokenizer():
    """Qwen2's tokenizer with Qwen2.5's and InternVL's added tokens, the named image tokens and the chat template."""
    from transformers import AutoTokenizer

    from ..qwen_synthetic import QWEN2_5_EXTRA_TOKENS, qwen2_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        qwen2_tokenizer(extra_tokens=QWEN2_5_EXTRA_TOKENS).save_pretrained(scratch)
        tokenizer = AutoTokenizer.from_pretrained(scratch)
        tokenizer.add_special_tokens({"extra_special_tokens": INTERNVL_SPECIAL_TOKENS}, replace_extra_special_tokens=False)  # fmt: skip
        tokenizer.save_pretrained(scratch)
        tokenizer = AutoTokenizer.from_pretrained(scratch, extra_special_tokens=INTERNVL_NAMED_TOKENS)
    if tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") != IMAGE_CONTEXT_ID:
        raise RuntimeError(f"<IMG_CONTEXT> got id {tokenizer.convert_tokens_to_ids('<IMG_CONTEXT>')}, expected {IMAGE_CONTEXT_ID}")  # fmt: skip
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    return tokenizer


def build_internvl(out_dir: str | Path, *, seed: int = 0, init_std: float = 0.05) -> Path:
    """Write a tiny random-weight InternVL3 model directory (config, safetensors, tokenizer, image processor, chat
    template) to `out_dir`. The CLS token, position embeddings and layer scales, which transformers initializes to
    zeros and constants, are drawn at random too, so that parity checks see them."""
    import torch
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = InternVLConfig(
        vision_config={**TINY_VISION, "initializer_range": init_std},
        text_config={**TINY_TEXT, "initializer_range": init_std},
        image_token_id=IMAGE_CONTEXT_ID, image_seq_length=(64 // 8 // 2) ** 2, downsample_ratio=0.5,
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )  # fmt: skip
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.model.vision_tower.named_parameters():
            if name.endswith(("cls_token", "position_embeddings", "lambda_1", "lambda_2")):
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    internvl_tokenizer().save_pretrained(out_dir)
    GotOcr2ImageProcessorPil(**TINY_PROCESSOR).save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(INTERNVL_CHAT_TEMPLATE)
    logger.info("wrote %s (%.1fM parameters)", out_dir, sum(p.numel() for p in model.parameters()) / 1e6)
    return out_dir
