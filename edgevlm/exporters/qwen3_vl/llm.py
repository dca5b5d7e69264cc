"""Qwen3-VL's language model -> GGUF arch `qwen3vl`, as llama.cpp's converter writes it (`Qwen3VLTextModel`).

Qwen3's decoder (RMS-normed queries and keys, no q/k/v biases, a head size of its own) with the `qwen2vl` writer's
tokenizer, special tokens and M-RoPE sections; `qwen3vl.n_deepstack_layers` makes llama.cpp take image rows
n_embd x (1 + n) wide and add set i to the hidden states after layer i, as transformers' DeepStack does. llama.cpp
gives the architecture interleaved M-RoPE (rope type IMROPE) itself: no key says so.
"""

from __future__ import annotations

from typing import Any

from ...errors import UnsupportedModelError
from ..gguf import DECODER_TENSOR_MAP
from ..qwen2vl_gguf import QwenLLMFormat, mrope_hparams

ARCH = "qwen3vl"

# HF name (after the language model's prefix) -> GGUF name: the shared decoder names plus Qwen3's q/k norms.
TENSOR_MAP = {
    **DECODER_TENSOR_MAP,
    "lm_head.weight": "output.weight",  # absent from the GGUF when tied to embed_tokens
    "layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
}


def qwen3_vl_hparams(config: Any) -> dict[str, Any]:
    """GGUF metadata of the `qwen3vl` architecture from a `Qwen3VLConfig` (text and vision configs)."""
    import gguf

    text = config.text_config
    if getattr(text, "attention_bias", False):
        raise UnsupportedModelError("Qwen3-VL with attention_bias=true: llama.cpp's qwen3vl has no q/k/v biases")
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    n_deepstack = len(getattr(config.vision_config, "deepstack_visual_indexes", None) or ())
    if n_deepstack > int(text.num_hidden_layers):
        raise UnsupportedModelError(f"{n_deepstack} DeepStack layers for a language model of {text.num_hidden_layers} layers")  # fmt: skip
    return {
        **mrope_hparams(ARCH, text),
        gguf.Keys.Attention.KEY_LENGTH.format(arch=ARCH): head_dim,
        gguf.Keys.Attention.VALUE_LENGTH.format(arch=ARCH): head_dim,
        gguf.Keys.LLM.NUM_DEEPSTACK_LAYERS.format(arch=ARCH): n_deepstack,
    }


QWEN3VL_FORMAT = QwenLLMFormat(ARCH, TENSOR_MAP, qwen3_vl_hparams)
