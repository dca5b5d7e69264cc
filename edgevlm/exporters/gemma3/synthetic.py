"""Tiny random Gemma 3 model directories built from configs, for machines without a model hub.

The shape is Gemma 3's where it matters to the bundle (a SigLIP tower on one fixed image size, 4x4 average pooling
to `mm_tokens_per_image`, the soft-embedding RMS norm and projection; a Gemma 3 LLM with q/k norms, GQA, a local
sliding-window layer and a global layer with their own rope bases and the 4B's linear rope scaling on the global
one, tied embeddings) and tiny elsewhere: 64 px images of 4 px patches give 16x16 patches, pooled to 16 tokens; the
sliding window (8) is shorter than every test prompt and than one image, so both layer kinds and the window's edge
inside an image count. The tokenizer is a real SentencePiece BPE model with byte fallback and no dummy prefix, as
Gemma's, trained here deterministically, with Gemma's special tokens added after its pieces and gemma-3-4b-it's chat
template.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# google/gemma-3-4b-it's chat template
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    '    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)

N_PIECES = 1000  # SentencePiece vocabulary: <pad> <eos> <bos> <unk>, Gemma's special tokens, 256 bytes, merges
# user-defined pieces of the SentencePiece model, ids 4-8, as gemma-3's tokenizer.model holds its turn and image
# tokens; GemmaTokenizer adds <mask> (id 1000) after the pieces itself
SPECIAL_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
BOI, EOI, IMAGE_SOFT = 6, 7, 8
IMAGE_SIZE, PATCH_SIZE, MM_TOKENS_PER_IMAGE = 64, 4, 16
TINY_VISION = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
    "vision_use_head": False,
}  # fmt: skip
# Row lengths (hidden 256, 4 heads x 64, intermediate 512) are multiples of 256, as K-quants need.
TINY_TEXT = {
    "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "query_pre_attn_scalar": 64,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention"],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    },
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
}  # fmt: skip


def train_gemma_sentencepiece() -> bytes:
    """A SentencePiece BPE model with Gemma's settings: <pad>=0 <eos>=1 <bos>=2 <unk>=3, no dummy prefix, the turn
    and image tokens as user-defined pieces 4-8."""
    from ..sentencepiece_fixture import train_sentencepiece
    from ..verify import PARITY_CASES

    chat = [f"user\n{case.prompt}\nmodel\nIt shows {case.name}.\n\n" for case in PARITY_CASES]
    return train_sentencepiece(
        N_PIECES, chat, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False, user_defined_symbols=list(SPECIAL_TOKENS),
    )  # fmt: skip


def write_gemma3_tokenizer(out_dir: Path) -> None:
    """`tokenizer.model` and the transformers tokenizer (GemmaTokenizer with Gemma 3's image tokens) in `out_dir`."""
    from transformers import AutoTokenizer

    (out_dir / "tokenizer.model").write_bytes(train_gemma_sentencepiece())
    config = {
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>",
        "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>", "clean_up_tokenization_spaces": False,
    }  # fmt: skip
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})  # pieces already: ids kept
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    # Gemma3Processor reads these names of the tokenizer (as gemma-3-4b-it's tokenizer_config.json has them)
    saved = json.loads((out_dir / "tokenizer_config.json").read_text())
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({**saved, "extra_special_tokens": named}, indent=2))
    ids = [AutoTokenizer.from_pretrained(out_dir).convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    if ids[2:] != [BOI, EOI, IMAGE_SOFT]:
        raise RuntimeError(f"Gemma's image tokens got ids {ids[2:]}, expected {[BOI, EOI, IMAGE_SOFT]}")


def build_gemma3(out_dir: str | Path, *, seed: int = 0, init_std: float = 0.05) -> Path:
    """Write a tiny random-weight Gemma 3 model directory (config, safetensors, tokenizer, processor, chat
    template) to `out_dir`. Weights have std 0.05, not transformers' 0.02: at 0.02 this model's logits are nearly
    flat (std 0.3), so quantization flips top-1 at 40% of the positions and quantized bundles test little."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = Gemma3Config(
        vision_config={"model_type": "siglip_vision_model", **TINY_VISION, "initializer_range": init_std},
        text_config={**TINY_TEXT, "initializer_range": init_std}, mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE_SOFT, initializer_range=init_std,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # constant initial values (Gemma's zero norms, used as 1 + w; LayerNorms; zero biases; the projector's zero
        # weight) made random: the norm convention, the patch order and the image features then all count
        for param in model.parameters():
            if param.numel() == 1 or float(param.std()) < 1e-6:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out_dir)
    write_gemma3_tokenizer(out_dir)
    Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=False,
        pan_and_scan_min_crop_size=16, pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2,
    ).save_pretrained(out_dir)  # fmt: skip
    processor_config = out_dir / "processor_config.json"
    processor_config.write_text(json.dumps({"processor_class": "Gemma3Processor", "image_seq_length": MM_TOKENS_PER_IMAGE}))  # fmt: skip
    (out_dir / "chat_template.jinja").write_text(GEMMA3_CHAT_TEMPLATE)
    logger.info("wrote %s (%.1fM parameters)", out_dir, sum(p.numel() for p in model.parameters()) / 1e6)
    return out_dir
