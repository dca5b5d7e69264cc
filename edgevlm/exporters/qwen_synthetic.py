"""What the Qwen-VL families' model directories built from configs share, for machines without a model hub.

Tests use tiny random models; benchmarks use a model with Qwen2-VL-2B's published sizes and random weights. All
carry the real Qwen2 BPE vocabulary, rebuilt from the `qwen.tiktoken` file that ships in the PyPI package
`dashscope` (its ids equal Qwen2's), so tokenization, special tokens and the chat template are the real ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# Qwen2's pre-tokenizer splits digits one by one (`\p{N}`), unlike tiktoken's cl100k pattern (`\p{N}{1,3}`).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Added tokens of Qwen2-VL's tokenizer, in id order from 151643.
QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

# Added tokens Qwen2.5-VL's tokenizer (and its successors') has after Qwen2-VL's (ids 151657-151664), as Qwen2.5's:
# not special.
QWEN2_5_EXTRA_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip

# The chat template published with Qwen2-VL-*-Instruct (its successors publish the same one).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Qwen2VLShape:
    """The sizes that define a Qwen2-VL model (vision tower, merger and language model)."""

    vision_depth: int
    vision_embed_dim: int
    vision_heads: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    vocab_size: int = 151936
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True


# Smallest shape that still exercises everything: GQA, M-RoPE sections, K-quant row lengths (multiples of 256).
QWEN2_VL_TINY = Qwen2VLShape(
    vision_depth=2, vision_embed_dim=64, vision_heads=4, hidden_size=256, intermediate_size=512,
    layers=2, heads=4, kv_heads=2, mrope_section=[8, 12, 12], max_position_embeddings=4096,
)  # fmt: skip


def qwen2_vl_tokenizer(backend, *, model_max_length: int, extra_tokens: Sequence[str] = (), special_tokens: Sequence[str] = QWEN2_VL_SPECIAL_TOKENS):  # fmt: skip
    """A `PreTrainedTokenizerFast` around a byte-level BPE `tokenizers.Tokenizer`, with `special_tokens` (Qwen2-VL's
    by default; added right after the BPE vocabulary, in that order), then `extra_tokens` (not special), and Qwen2-VL's
    chat template."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    # Added in id order first, so that they take consecutive ids whatever the tokenizer wrapper adds later.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(special_tokens),
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tokenizer


def qwen2_tokenizer(extra_tokens: Sequence[str] = (), special_tokens: Sequence[str] = QWEN2_VL_SPECIAL_TOKENS):
    """Qwen2's tokenizer (a `PreTrainedTokenizerFast`) rebuilt from dashscope's `qwen.tiktoken`, with `special_tokens`
    from id 151643 (Qwen2-VL's by default; they must start with `<|endoftext|>`) and then `extra_tokens` (those a
    successor's tokenizer adds)."""
    try:
        import dashscope
    except ImportError as e:
        raise ImportError("building the Qwen2 tokenizer needs dashscope: pip install 'edgevlm[dev]'") from e
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(vocab_file), pattern=QWEN2_SPLIT_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    tokenizer = qwen2_vl_tokenizer(backend, model_max_length=32768, extra_tokens=extra_tokens, special_tokens=special_tokens)  # fmt: skip
    first_special = tokenizer.convert_tokens_to_ids(QWEN2_VL_SPECIAL_TOKENS[0])
    if first_special != 151643:
        raise RuntimeError(f"qwen.tiktoken gave <|endoftext|> id {first_special}, expected Qwen2's 151643")
    return tokenizer


def qwen2_text_config(shape: Qwen2VLShape) -> dict:
    """The language model's config (Qwen2 with M-RoPE), the same in the Qwen-VL families."""
    return dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": shape.mrope_section},
        bos_token_id=151643,
        eos_token_id=151645,
        tie_word_embeddings=shape.tie_word_embeddings,
    )


def write_model_dir(
    out_dir: str | Path, model_class, config, tokenizer, *, seed: int, init_std: float, dtype: str, processor_kwargs: dict | None,
    chat_template: str = QWEN2_VL_CHAT_TEMPLATE, streamed: bool = False,
) -> Path:  # fmt: skip
    """Save a `model_class(config)` with weights of standard deviation `init_std`, `tokenizer`, Qwen2-VL's image
    processor (`processor_kwargs`) and `chat_template` to `out_dir`. `streamed` never builds the model with weights:
    each tensor is drawn and written to the shards alone (`write_random_shards`), for models larger than memory."""
    import torch
    from transformers import Qwen2VLImageProcessorPil

    out_dir = Path(out_dir)
    config.text_config.initializer_range = init_std
    config.vision_config.initializer_range = init_std
    config.initializer_range = init_std
    torch.manual_seed(seed)
    if streamed:
        with torch.device("meta"):
            model = model_class(config)
        config.dtype = getattr(torch, dtype)
        config.architectures = [model_class.__name__]  # what save_pretrained of the model would record
        config.save_pretrained(out_dir)
        write_random_shards(model, out_dir, seed=seed, init_std=init_std, dtype=getattr(torch, dtype))
    else:
        with torch.device("cpu"):
            model = model_class(config).to(getattr(torch, dtype)).eval()
        model.save_pretrained(out_dir)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)
    # The image processor alone (the Qwen-VL families share Qwen2-VL's): the processors also want a video
    # processor, which needs torchvision.
    Qwen2VLImageProcessorPil(**(processor_kwargs or {})).save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(chat_template)
    logger.info("wrote %s (%.1fM parameters)", out_dir, sum(p.numel() for p in model.parameters()) / 1e6)
    return out_dir


SHARD_BYTES = 4 * 2**30
_SAFETENSORS_DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def write_random_shards(model, out_dir: Path, *, seed: int, init_std: float, dtype, shard_bytes: int = SHARD_BYTES) -> None:  # fmt: skip
    """Write random weights for `model` (on the meta device: names and shapes only) as safetensors shards of at most
    `shard_bytes` plus their index, one tensor in memory at a time: norms' weights 1, biases 0, the rest drawn from
    N(0, init_std) by a generator seeded with `seed` and the tensor's position."""
    import json
    import struct

    import torch

    named = [(f"{module_name}.{name}" if module_name else name, module, tensor)
             for module_name, module in model.named_modules() for name, tensor in module.named_parameters(recurse=False)]  # fmt: skip
    shards: list[list[tuple[str, object, object]]] = [[]]
    size = 0
    for entry in named:
        nbytes = entry[2].numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    weight_map, total, index = {}, 0, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, _, tensor in shard:
            nbytes = tensor.numel() * dtype.itemsize
            header[key] = {"dtype": _SAFETENSORS_DTYPE_NAMES[str(dtype).removeprefix("torch.")], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}  # fmt: skip
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data aligned to 8 bytes, as safetensors writes it
        with open(out_dir / file, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            for key, module, tensor in shard:
                f.write(
                    _random_tensor(module, key, tensor.shape, seed + index, init_std, dtype).view(torch.uint8).numpy()
                )
                weight_map[key] = file
                index += 1
        total += offset
        logger.info("wrote %s (%.2f GB)", file, offset / 1e9)
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2) + "\n")


def _random_tensor(module, key: str, shape, seed: int, init_std: float, dtype):
    import torch

    if "Norm" in type(module).__name__:
        return (torch.ones if key.endswith("weight") else torch.zeros)(shape, dtype=dtype)
    if key.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, init_std, generator=generator).to(dtype)
