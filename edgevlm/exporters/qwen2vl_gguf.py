"""The language model of Qwen2-VL, and of successors that keep it, → GGUF (arch `qwen2vl`), with its tokenizer and
chat template; and a plain Qwen2 language model (arch `qwen2`, `QWEN2_FORMAT`: the LLM of InternVL3 and
LLaVA-OneVision).

The result loads in stock llama.cpp (whose converter maps those architectures to `qwen2vl` too). Text positions are
plain 1-D; image positions use the M-RoPE sections stored in `qwen2vl.rope.dimension_sections`. The vision tower
is not in this file (it goes to ONNX).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevlm.errors import UnsupportedModelError
from edgevlm.exporters.checkpoint import WeightSource, model_weights
from edgevlm.exporters.family import find_chat_template
from edgevlm.exporters.gguf import (
    DECODER_TENSOR_MAP,
    TensorSource,
    decoder_hparams,
    decoder_summary,
    decoder_tensor_name,
    rope_settings,
    tokenizer_from_hf,
    write_gguf,
)

logger = logging.getLogger(__name__)

ARCH = "qwen2vl"
TOKENIZER_PRE = "qwen2"  # llama.cpp's name for Qwen2's pre-tokenizer regex (digits split one by one)

# HF checkpoint prefixes of the language model: transformers >= 4.52 nests it under `model.language_model.`,
# older checkpoints put it under `model.`. The vision tower (`model.visual.` / `visual.`) is skipped.
LLM_PREFIXES = ("model.language_model.", "model.")
VISION_PREFIXES = ("model.visual.", "visual.")

# HF name (after the prefix) → GGUF name, as llama.cpp's Qwen2: the shared decoder names plus q/k/v biases.
TENSOR_MAP = {
    **DECODER_TENSOR_MAP,
    "lm_head.weight": "output.weight",  # absent from the GGUF when tied to embed_tokens
    **{f"layers.{{bid}}.self_attn.{p}_proj.bias": f"blk.{{bid}}.attn_{p}.bias" for p in "qkv"},
}

# Qwen2's chat tokens by role, which every Qwen2 language model has.
QWEN2_CHAT_TOKENS = {"endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>"}

# Qwen2-VL's special tokens by role, looked up by text in the tokenizer (ids shown are Qwen2-VL's).
SPECIAL_TOKENS = {
    "endoftext": "<|endoftext|>",  # 151643: bos in config, pad, and an end-of-generation token
    "im_start": "<|im_start|>",  # 151644
    "im_end": "<|im_end|>",  # 151645: eos / end of turn
    "vision_start": "<|vision_start|>",  # 151652
    "vision_end": "<|vision_end|>",  # 151653
    "image_pad": "<|image_pad|>",  # 151655: one per merged image patch
    "video_pad": "<|video_pad|>",  # 151656
}


def gguf_tensor_name(hf_name: str, tensor_map: Mapping[str, str] = TENSOR_MAP, arch: str = ARCH) -> str | None:
    """The GGUF name of an HF checkpoint tensor by `tensor_map`; None for the vision tower. Unknown LLM tensors raise
    ValueError."""
    if hf_name.startswith(VISION_PREFIXES):
        return None
    if hf_name == "lm_head.weight":
        return tensor_map[hf_name]
    for prefix in LLM_PREFIXES:
        if hf_name.startswith(prefix):
            rest = hf_name[len(prefix) :]
            break
    else:
        raise ValueError(f"unexpected tensor {hf_name!r} in a Qwen-VL checkpoint")
    name = decoder_tensor_name(rest, tensor_map)
    if name is not None:
        return name
    raise ValueError(f"tensor {hf_name!r} has no GGUF name for arch {arch}; the checkpoint is not of this family")


def qwen2_vl_hparams(text_config: Any) -> dict[str, Any]:
    """GGUF metadata keys/values of the `qwen2vl` architecture from a Qwen2-VL text config."""
    return mrope_hparams(ARCH, text_config)


def mrope_hparams(arch: str, text_config: Any) -> dict[str, Any]:
    """GGUF metadata of a decoder with M-RoPE (`arch`.rope.dimension_sections, padded to llama.cpp's 4 sections)."""
    import gguf

    rope, rope_theta = rope_settings(text_config)
    mrope_section = list(rope.get("mrope_section") or [])
    if not mrope_section or rope_theta is None:
        raise UnsupportedModelError(
            f"Qwen2-VL text config lacks mrope_section or rope_theta (rope settings: {rope!r}); "
            "is this a Qwen2-VL checkpoint?"
        )
    if len(mrope_section) > 4:
        raise UnsupportedModelError(f"mrope_section {mrope_section} has more than 4 sections; llama.cpp takes 4")
    if getattr(text_config, "use_sliding_window", False):
        raise UnsupportedModelError("Qwen2-VL with use_sliding_window=true is not supported by llama.cpp's qwen2vl")
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    if 2 * sum(mrope_section) != head_dim:
        raise UnsupportedModelError(
            f"mrope_section {mrope_section} covers {2 * sum(mrope_section)} rotary dims, head_dim is {head_dim}"
        )

    sections = gguf.Keys.Rope.DIMENSION_SECTIONS.format(arch=arch)
    return {**decoder_hparams(arch, text_config, rope_theta), sections: mrope_section + [0] * (4 - len(mrope_section))}


@dataclass(frozen=True)
class QwenLLMFormat:
    """How a Qwen-VL family's language model is written: llama.cpp's architecture, the tensor names and the
    metadata (from the whole model config: a key may depend on the vision tower, as Qwen3-VL's DeepStack count)."""

    arch: str
    tensor_map: Mapping[str, str]
    hparams: Callable[[Any], dict[str, Any]]
    special_tokens: Mapping[str, str] = field(default_factory=lambda: SPECIAL_TOKENS)  # roles -> texts; the
    # tokenizer must have them all (QWEN2_CHAT_TOKENS' roles at least)


def _qwen2_vl_model_hparams(config: Any) -> dict[str, Any]:
    return qwen2_vl_hparams(getattr(config, "text_config", config))


QWEN2VL_FORMAT = QwenLLMFormat(ARCH, TENSOR_MAP, _qwen2_vl_model_hparams)


def _qwen2_model_hparams(config: Any) -> dict[str, Any]:
    """GGUF metadata of a plain Qwen2 decoder (1-D RoPE) from a model config (its text_config if nested)."""
    text_config = getattr(config, "text_config", config)
    rope, rope_theta = rope_settings(text_config)
    if rope_theta is None:
        raise UnsupportedModelError(f"Qwen2 text config lacks rope_theta (rope settings: {rope!r})")
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"Qwen2 rope_type={rope['rope_type']!r}: edgevlm writes the default RoPE only")
    if getattr(text_config, "use_sliding_window", False):
        raise UnsupportedModelError("Qwen2 with use_sliding_window=true is not supported")
    return decoder_hparams("qwen2", text_config, rope_theta)


QWEN2_FORMAT = QwenLLMFormat("qwen2", TENSOR_MAP, _qwen2_model_hparams, QWEN2_CHAT_TOKENS)


def special_token_ids(tokenizer: Any, special_tokens: Mapping[str, str] = SPECIAL_TOKENS) -> dict[str, int]:
    """Ids of a family's special tokens (`special_tokens`: roles -> texts) by role; raises if the tokenizer lacks one."""
    vocab = tokenizer.get_vocab()
    missing = [text for text in special_tokens.values() if text not in vocab]
    if missing:
        raise UnsupportedModelError(f"tokenizer lacks the special tokens {missing}")
    return {role: int(vocab[text]) for role, text in special_tokens.items()}


def _tied(hf_model: Any) -> bool:
    output, embed = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    if output is None or output.weight is embed.weight:
        return True
    return not output.weight.is_meta and output.weight.data_ptr() == embed.weight.data_ptr()  # meta: no storage


def _tensor_source(weights: WeightSource, tied: bool, llm_format: QwenLLMFormat) -> TensorSource:
    import torch

    def tensors(shapes_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
        for hf_name, tensor in weights(shapes_only):
            name = gguf_tensor_name(hf_name, llm_format.tensor_map, llm_format.arch)
            if name is None or (tied and name == "output.weight"):
                continue
            # f32 weights give a view (no copy); bf16/f16 ones a per-tensor f32 copy, dropped after writing.
            yield name, tensor.detach().to(dtype=torch.float32)

    return tensors


def write_qwen2_vl_llm_gguf(
    hf_model: Any,
    tokenizer: Any,
    out_path: str | Path,
    *,
    dtype: str = "f16",
    chat_template: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    llm_format: QwenLLMFormat = QWEN2VL_FORMAT,
    weights: WeightSource | None = None,
) -> dict[str, Any]:
    """Write the language model of a `Qwen2VLForConditionalGeneration` (or a successor's, by `llm_format`) as a
    `qwen2vl` (`llm_format.arch`) GGUF with its tokenizer.

    `weights` are the model's tensors (default: its state_dict; `checkpoint.checkpoint_weights` streams them from
    the shards of a model whose weights were never loaded).

    `chat_template` defaults to the tokenizer's or the model directory's. Returns the manifest's LLM section
    (JSON-able): arch, n_ctx_train, embedding_length, n_vocab, rope sections, special token ids.
    """
    arch = llm_format.arch
    text_config = getattr(hf_model.config, "text_config", hf_model.config)
    hparams = llm_format.hparams(hf_model.config)  # validates the config before any tensor is touched
    vocab_size = int(text_config.vocab_size)
    ids = special_token_ids(tokenizer, llm_format.special_tokens)
    if chat_template is None:
        chat_template = find_chat_template(tokenizer, getattr(hf_model, "name_or_path", None))
    if chat_template is None:
        logger.warning("no chat template found; the GGUF will carry none (fine for a base model)")

    gguf_tokenizer = tokenizer_from_hf(
        tokenizer,
        vocab_size=vocab_size,
        pre=TOKENIZER_PRE,
        # As Qwen2's own GGUFs: bos is <|endoftext|> (config.bos_token_id) but never added; <|im_end|> ends a turn.
        special_ids={"bos": ids["endoftext"], "eos": ids["im_end"], "eot": ids["im_end"], "pad": ids["endoftext"]},
        add_bos=False,
        chat_template=chat_template,
    )
    tied = _tied(hf_model)
    write_gguf(
        out_path,
        arch=arch,
        metadata=hparams,
        tensors=_tensor_source(weights or model_weights(hf_model), tied, llm_format),
        tokenizer=gguf_tokenizer,
        dtype=dtype,
        name=Path(str(getattr(hf_model, "name_or_path", "") or "qwen2-vl")).name or "qwen2-vl",
        progress=progress,
    )
    return {
        **decoder_summary(arch, dtype, text_config, vocab_size, chat_template),
        "tied_embeddings": tied,
        **({"rope_sections": hparams[sections]} if (sections := f"{arch}.rope.dimension_sections") in hparams else {}),
        "special_tokens": {"eos": ids["im_end"], **ids},
        "eos_token_ids": [ids["im_end"], ids["endoftext"]],
        # llama.cpp does not normalize; tokenizing normalize(form, text) gives transformers' ids.
        "text_normalization": gguf_tokenizer.normalization,
    }
