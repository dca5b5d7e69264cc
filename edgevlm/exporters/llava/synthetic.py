"""Tiny random LLaVA-1.5 model directories built from configs, for machines without a model hub.

The shape is LLaVA-1.5's where it matters to the bundle (a CLIP tower on 336 px images with 14 px patches: 576
image tokens; feature layer -2, CLS dropped; a linear-GELU-linear projector; a Llama LLM with separate q/k/v and an
untied output) and tiny elsewhere. The tokenizer is a real SentencePiece BPE model with byte fallback, as Llama's,
trained here (seeded, single-threaded: the same text gives the same model) on seeded sentences of fixed words and
chat lines, with `<image>` and `<pad>` added after its pieces as in llava-hf's tokenizer, and llava-hf's chat template.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# llava-hf/llava-1.5-7b-hf's chat template: "USER: <image>\n<prompt> ASSISTANT:"
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

N_PIECES = 1000  # SentencePiece vocabulary: <unk> <s> </s>, 256 byte pieces, merges
ADDED_TOKENS = ("<image>", "<pad>")  # ids 1000 and 1001, as llava-hf adds them after Llama's 32000 pieces
TINY_VISION = {
    "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
    "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 64, "layer_norm_eps": 1e-5,
}  # fmt: skip
# Row lengths (hidden 256, intermediate 512) are multiples of 256, as K-quants need.
TINY_TEXT = {
    "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 1001, "tie_word_embeddings": False,
}  # fmt: skip


def train_sentencepiece(n_pieces: int = N_PIECES) -> bytes:
    """A SentencePiece BPE model with Llama's settings (byte fallback, digits split, <unk>=0 <s>=1 </s>=2)."""
    from ..sentencepiece_fixture import train_sentencepiece as train
    from ..verify import PARITY_CASES

    chat = [f"USER: {case.prompt} ASSISTANT: It shows {case.name}." for case in PARITY_CASES]
    return train(n_pieces, chat, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True)


def write_llava_tokenizer(out_dir: Path) -> None:
    """`tokenizer.model` and the transformers tokenizer (legacy SentencePiece behaviour, as Llama's) in `out_dir`."""
    from transformers import AutoTokenizer

    (out_dir / "tokenizer.model").write_bytes(train_sentencepiece())
    config = {
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
    }  # fmt: skip
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [ADDED_TOKENS[0]]})  # one by one: ids in order
    tokenizer.add_special_tokens({"pad_token": ADDED_TOKENS[1]})
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    # transformers does not save `legacy`; without it a reload would drop the "▁" after <image> (see llm.py)
    saved = json.loads((out_dir / "tokenizer_config.json").read_text())
    (out_dir / "tokenizer_config.json").write_text(json.dumps({**saved, "legacy": True}, indent=2))
    ids = [tokenizer.convert_tokens_to_ids(token) for token in ADDED_TOKENS]
    if ids != [N_PIECES, N_PIECES + 1]:
        raise RuntimeError(f"added tokens {ADDED_TOKENS} got ids {ids}, expected {N_PIECES} and {N_PIECES + 1}")


def build_llava(out_dir: str | Path, *, seed: int = 0, init_std: float = 0.02, pad_to_square: bool = False) -> Path:
    """Write a tiny random-weight LLaVA-1.5 model directory (config, safetensors, tokenizer, processor, chat
    template) to `out_dir`. `pad_to_square` saves llava's processor with `do_pad` (the original LLaVA's "pad")
    instead of llava-hf's plain CLIP processor."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION, initializer_range=init_std),
        text_config=LlamaConfig(**TINY_TEXT, initializer_range=init_std),
        image_token_index=N_PIECES, image_seq_length=576, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )  # fmt: skip
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    write_llava_tokenizer(out_dir)
    processor = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    if pad_to_square:
        LlavaImageProcessorPil(**processor, do_pad=True).save_pretrained(out_dir)
    else:
        CLIPImageProcessorPil(**processor).save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(LLAVA_CHAT_TEMPLATE)
    logger.info("wrote %s (%.1fM parameters)", out_dir, sum(p.numel() for p in model.parameters()) / 1e6)
    return out_dir
