"""Tiny random SmolVLM2 model directories built from configs, for machines without a model hub.

The shape is SmolVLM2's where it matters to the bundle (a SigLIP tower whose image size is the processor's tile, a
pixel shuffle of 4 and a bias-free projection, a Llama LLM with tied embeddings, LANCZOS tiling into a grid plus a
global view) and tiny elsewhere: 64 px tiles of 8 px patches are 4 tokens each, a 256 px longest edge gives up to
4 x 4 tiles. The real tokenizer (SmolLM2's GPT-2-style byte-level BPE with digits split one by one) is not on PyPI:
one of the same kind is trained here with `tokenizers` (deterministic: the same text gives the same merges), with
SmolVLM2's special tokens and chat template.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# SmolVLM2's chat template (transformers' SmolVLMProcessor DEFAULT_CHAT_TEMPLATE): "<|im_start|>User:<image>...".
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'] is string %}"
    "{{': ' + message['content']}}{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}"
    "{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
BPE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2
IMAGE_SPECIALS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
GRID_SIDE = 6  # <row_r_col_c> for r, c in 1..6, as SmolVLM2's tokenizer has them
N_BPE = 700  # trained vocabulary: specials, 256 bytes, merges
TILE, PATCH, SCALE, LONGEST_EDGE = 64, 8, 4, 256
TINY_VISION = {
    "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "image_size": TILE, "patch_size": PATCH, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}  # fmt: skip
# Row lengths (hidden 256, intermediate 512) are multiples of 256, as K-quants need.
TINY_TEXT = {
    "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}, "tie_word_embeddings": True,
}  # fmt: skip


def added_tokens() -> list[str]:
    return [*IMAGE_SPECIALS, *(f"<row_{r}_col_{c}>" for r in range(1, GRID_SIDE + 1) for c in range(1, GRID_SIDE + 1))]


def training_text() -> list[str]:
    """Seeded chat lines, digits, punctuation and whitespace runs: what the merges are learned from."""
    import random

    from ..verify import PARITY_CASES

    words = ("robot", "picture", "apples", "image", "tile", "detail", "differs", "between", "these", "two", "what", "is", "the", "a", "of", "and", "in", "on")  # fmt: skip
    rng = random.Random(0)
    lines = [f"User:{case.prompt}<end_of_utterance>\nAssistant: It shows {case.name}." for case in PARITY_CASES]
    lines += [
        " ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 99999)}, ok?\n\n  x" for _ in range(300)
    ]
    return lines


def train_tokenizer():
    """A byte-level BPE like SmolLM2's: digits split one by one, then GPT-2's regex (llama.cpp's `smollm`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=N_BPE, special_tokens=list(BPE_SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    return tokenizer


def write_smolvlm_tokenizer(out_dir: Path) -> dict[str, int]:
    """The transformers tokenizer (tokenizer.json + config) in `out_dir`; returns the added tokens' ids."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend = train_tokenizer()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added_tokens()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", clean_up_tokenization_spaces=False,
    )  # fmt: skip
    tokenizer.chat_template = SMOLVLM_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return {token: tokenizer.convert_tokens_to_ids(token) for token in (*BPE_SPECIALS, *added_tokens())}


def build_smolvlm(out_dir: str | Path, *, seed: int = 0, init_std: float = 0.02) -> Path:
    """Write a tiny random-weight SmolVLM2 model directory (config, safetensors, tokenizer, image processor, chat
    template) to `out_dir`."""
    import torch
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil
    from transformers.models.smolvlm import SmolVLMVisionConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = write_smolvlm_tokenizer(out_dir)
    text = LlamaConfig(**TINY_TEXT, bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"],
                       pad_token_id=ids["<|im_end|>"], initializer_range=init_std)  # fmt: skip
    config = SmolVLMConfig(
        vision_config=SmolVLMVisionConfig(**TINY_VISION, initializer_range=init_std), text_config=text,
        scale_factor=SCALE, image_token_id=ids["<image>"], tie_word_embeddings=True,
    )  # fmt: skip
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    SmolVLMImageProcessorPil(size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE}).save_pretrained(out_dir)  # fmt: skip
    (out_dir / "chat_template.jinja").write_text(SMOLVLM_CHAT_TEMPLATE)
    logger.info("wrote %s (%.1fM parameters)", out_dir, sum(p.numel() for p in model.parameters()) / 1e6)
    return out_dir
