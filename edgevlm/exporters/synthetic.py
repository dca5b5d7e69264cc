"""Qwen2-VL and Qwen2.5-VL model directories built from configs, for machines without a model hub.

Tests use tiny random models; benchmarks use a model with Qwen2-VL-2B's published sizes and random weights. Both
carry the real Qwen2 BPE vocabulary, rebuilt from the `qwen.tiktoken` file that ships in the PyPI package
`dashscope` (its ids equal Qwen2's), so tokenization, special tokens and the chat template are the real ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .synthetic_llava import build_llava

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

# Added tokens Qwen2.5-VL's tokenizer has after Qwen2-VL's (ids 151657-151664), as Qwen2.5's: not special.
QWEN2_5_EXTRA_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip

# The chat template published with Qwen2-VL-*-Instruct (Qwen2.5-VL-*-Instruct publish the same one).
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


# Published sizes of Qwen/Qwen2-VL-2B-Instruct.
QWEN2_VL_2B = Qwen2VLShape(
    vision_depth=32, vision_embed_dim=1280, vision_heads=16, hidden_size=1536, intermediate_size=8960,
    layers=28, heads=12, kv_heads=2, mrope_section=[16, 24, 24],
)  # fmt: skip

# Smallest shape that still exercises everything: GQA, M-RoPE sections, K-quant row lengths (multiples of 256).
QWEN2_VL_TINY = Qwen2VLShape(
    vision_depth=2, vision_embed_dim=64, vision_heads=4, hidden_size=256, intermediate_size=512,
    layers=2, heads=4, kv_heads=2, mrope_section=[8, 12, 12], max_position_embeddings=4096,
)  # fmt: skip


def qwen2_vl_tokenizer(backend, *, model_max_length: int, extra_tokens: Sequence[str] = ()):
    """A `PreTrainedTokenizerFast` around a byte-level BPE `tokenizers.Tokenizer`, with Qwen2-VL's special tokens
    (added right after the BPE vocabulary, in Qwen2's order), then `extra_tokens` (not special), and chat template."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    # Added in id order first, so that they take consecutive ids whatever the tokenizer wrapper adds later.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_VL_SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN2_VL_SPECIAL_TOKENS,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tokenizer


def qwen2_tokenizer(extra_tokens: Sequence[str] = ()):
    """Qwen2's tokenizer (a `PreTrainedTokenizerFast`) rebuilt from dashscope's `qwen.tiktoken`, with Qwen2-VL's
    special tokens and then `extra_tokens` (`QWEN2_5_EXTRA_TOKENS` for Qwen2.5-VL's)."""
    try:
        import dashscope
    except ImportError as e:
        raise ImportError("building the Qwen2 tokenizer needs dashscope: pip install 'edgevlm[dev]'") from e
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(vocab_file), pattern=QWEN2_SPLIT_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    tokenizer = qwen2_vl_tokenizer(backend, model_max_length=32768, extra_tokens=extra_tokens)
    first_special = tokenizer.convert_tokens_to_ids(QWEN2_VL_SPECIAL_TOKENS[0])
    if first_special != 151643:
        raise RuntimeError(f"qwen.tiktoken gave <|endoftext|> id {first_special}, expected Qwen2's 151643")
    return tokenizer


def _qwen2_text_config(shape: Qwen2VLShape) -> dict:
    """The language model's config (Qwen2 with M-RoPE), the same in Qwen2-VL and Qwen2.5-VL."""
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
    text = _qwen2_text_config(shape)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=shape.tie_word_embeddings)


@dataclass(frozen=True)
class Qwen2_5_VLWindows:
    """What Qwen2.5-VL's vision tower adds to a `Qwen2VLShape`: a gated MLP width and window attention."""

    vision_intermediate_size: int
    window_size: int  # pixels
    fullatt_block_indexes: tuple[int, ...]


# Qwen2.5-VL-3B/7B-Instruct's vision tower.
QWEN2_5_VL_WINDOWS = Qwen2_5_VLWindows(vision_intermediate_size=3420, window_size=112, fullatt_block_indexes=(7, 15, 23, 31))  # fmt: skip
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
    text = _qwen2_text_config(shape)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=shape.tie_word_embeddings)


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
    return _write_model_dir(out_dir, Qwen2VLForConditionalGeneration, config, qwen2_tokenizer(), seed=seed, init_std=init_std, dtype=dtype, processor_kwargs=processor_kwargs)  # fmt: skip


def build_qwen2_5_vl(
    out_dir: str | Path,
    shape: Qwen2VLShape = QWEN2_5_VL_TINY,
    windows: Qwen2_5_VLWindows = QWEN2_5_VL_TINY_WINDOWS,
    *,
    seed: int = 0,
    init_std: float = 0.05,
    dtype: str = "float32",
    processor_kwargs: dict | None = None,
) -> Path:
    """Write a random-weight Qwen2.5-VL model directory (config, safetensors, tokenizer, processor) to `out_dir`;
    as `build_qwen2_vl`, loads with `Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir)`.

    `init_std` 0.05: at 0.02 the tiny model's greedy continuation of the one-image parity case meets a near tie
    (llama.cpp and transformers part at token 14 with logits 0.003 apart)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = qwen2_5_vl_config(shape, windows)
    tokenizer = qwen2_tokenizer(extra_tokens=QWEN2_5_EXTRA_TOKENS)
    return _write_model_dir(out_dir, Qwen2_5_VLForConditionalGeneration, config, tokenizer, seed=seed, init_std=init_std, dtype=dtype, processor_kwargs=processor_kwargs)  # fmt: skip


def _write_model_dir(
    out_dir: str | Path, model_class, config, tokenizer, *, seed: int, init_std: float, dtype: str, processor_kwargs: dict | None
) -> Path:  # fmt: skip
    import torch
    from transformers import Qwen2VLImageProcessorPil

    out_dir = Path(out_dir)
    config.text_config.initializer_range = init_std
    config.vision_config.initializer_range = init_std
    config.initializer_range = init_std
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = model_class(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # The image processor alone (Qwen2.5-VL's is Qwen2-VL's): the processors also want a video processor, which
    # needs torchvision.
    Qwen2VLImageProcessorPil(**(processor_kwargs or {})).save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    logger.info("wrote %s (%.1fM parameters)", out_dir, sum(p.numel() for p in model.parameters()) / 1e6)
    return out_dir


# architecture -> builder of a tiny random model directory of that family (`builder(out_dir, seed=...)`); every
# family registered in `edgevlm.exporters.FAMILY_MODULES` has one, and tests/test_<family.name>.py checks its
# bundles against transformers on it (tests/test_families.py enforces both).
TINY_BUILDERS = {
    "Qwen2VLForConditionalGeneration": build_qwen2_vl,
    "LlavaForConditionalGeneration": build_llava,
    "Qwen2_5_VLForConditionalGeneration": build_qwen2_5_vl,
}
