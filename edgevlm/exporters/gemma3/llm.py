"""Gemma 3's language model → GGUF (arch `gemma3`), with its SentencePiece tokenizer and chat template.

The keys are those llama.cpp's `gemma3` reads (src/models/gemma3.cpp) and its converter writes: the sliding window
and which layers use it (`attention.sliding_window_pattern`, one bool per layer, from the config's `layer_types`),
the global layers' rope base (`rope.freq_base`) and linear scaling (`rope.scaling.*`), the local layers' base
(`rope.freq_base_swa`; llama.cpp gives them no scaling), head sizes, and the final logit softcap when the config has
one. As in llama.cpp's converter, every RMS norm weight is stored plus one (Gemma3RMSNorm multiplies by 1 + w) and
no rotary rows are permuted (`gemma3` ropes rotate-half, as transformers). llama.cpp scales token embeddings by
sqrt(hidden) itself, and only token batches: embeddings fed through `llama_batch.embd` (the image) are not scaled,
as transformers scales only the token embeddings, not the image features it scatters in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgevlm.errors import UnsupportedModelError
from edgevlm.exporters.checkpoint import WeightSource, model_weights
from edgevlm.exporters.gguf import (
    DECODER_TENSOR_MAP,
    TensorSource,
    decoder_hparams,
    decoder_summary,
    decoder_tensor_name,
    sentencepiece_tokenizer_of,
    write_gguf,
)

logger = logging.getLogger(__name__)

ARCH = "gemma3"
LLM_PREFIX = "model.language_model."
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")
GEMMA3_TENSOR_MAP = {
    **DECODER_TENSOR_MAP,
    "layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",
    "layers.{bid}.pre_feedforward_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "layers.{bid}.post_feedforward_layernorm.weight": "blk.{bid}.post_ffw_norm.weight",
    "layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
}
LAYER_TYPES = ("sliding_attention", "full_attention")


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a checkpoint tensor; None for the vision side and the tied output. Unknown ones raise."""
    if hf_name.startswith(VISION_PREFIXES) or hf_name == "lm_head.weight":
        return None
    rest = hf_name.removeprefix(LLM_PREFIX)
    name = decoder_tensor_name(rest, GEMMA3_TENSOR_MAP) if rest != hf_name else None
    if name is None:
        raise ValueError(f"tensor {hf_name!r} has no GGUF name for arch {ARCH}; the checkpoint is not plain Gemma 3")
    return name


def gemma3_hparams(text_config: Any) -> dict[str, Any]:
    """GGUF metadata keys/values of the `gemma3` architecture from a Gemma3TextConfig; refuses what llama.cpp's
    graph would compute differently."""
    import gguf

    def key(template: str) -> str:
        return template.format(arch=ARCH)

    layer_types = list(text_config.layer_types)
    if set(layer_types) - set(LAYER_TYPES):
        raise UnsupportedModelError(f"layer_types {sorted(set(layer_types))}: edgevlm exports {', '.join(LAYER_TYPES)}")
    rope = text_config.rope_parameters
    local, glob = rope["sliding_attention"], rope["full_attention"]
    if local.get("rope_type", "default") != "default" or glob.get("rope_type", "default") not in ("default", "linear"):
        raise UnsupportedModelError(f"Gemma 3 rope parameters {rope!r}: llama.cpp's gemma3 takes default rope on the sliding layers and default or linear on the global ones")  # fmt: skip
    _check_attention_scale(text_config)
    if text_config.attn_logit_softcapping is not None:
        raise UnsupportedModelError("attn_logit_softcapping is set: llama.cpp's gemma3 has no attention softcap")
    head_dim = int(text_config.head_dim)
    hparams = {
        **decoder_hparams(ARCH, text_config, float(glob["rope_theta"])),
        key(gguf.Keys.Attention.KEY_LENGTH): head_dim,
        key(gguf.Keys.Attention.VALUE_LENGTH): head_dim,
        key(gguf.Keys.Rope.FREQ_BASE_SWA): float(local["rope_theta"]),
    }
    if "sliding_attention" in layer_types:
        hparams[key(gguf.Keys.Attention.SLIDING_WINDOW)] = int(text_config.sliding_window)
        pattern = [t == "sliding_attention" for t in layer_types]
        hparams[key(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN)] = (pattern, gguf.GGUFValueType.ARRAY)
    if glob.get("rope_type") == "linear":
        hparams[key(gguf.Keys.Rope.SCALING_TYPE)] = "linear"
        hparams[key(gguf.Keys.Rope.SCALING_FACTOR)] = float(glob["factor"])
    if text_config.final_logit_softcapping:
        hparams[key(gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING)] = float(text_config.final_logit_softcapping)
    return hparams


def _check_attention_scale(text_config: Any) -> None:
    """llama.cpp scales queries by 1/sqrt(head_dim), and 1/sqrt(hidden / heads) for the 62-layer 27B; transformers
    by query_pre_attn_scalar**-0.5: they must agree."""
    is_27b = text_config.num_hidden_layers == 62
    llama_scalar = text_config.hidden_size // text_config.num_attention_heads if is_27b else text_config.head_dim
    if text_config.query_pre_attn_scalar != llama_scalar:
        raise UnsupportedModelError(
            f"query_pre_attn_scalar {text_config.query_pre_attn_scalar}: llama.cpp's gemma3 scales queries by "
            f"1/sqrt({llama_scalar}) for this model, so its attention would differ"
        )


def _tensor_source(weights: WeightSource) -> TensorSource:
    import torch

    def tensors(shapes_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
        for hf_name, tensor in weights(shapes_only):
            name = gguf_tensor_name(hf_name)
            if name is None:
                continue
            array = tensor.detach().to(dtype=torch.float32)
            yield name, array + 1.0 if hf_name.endswith("norm.weight") else array  # Gemma3RMSNorm: x * (1 + w)

    return tensors


def write_gemma3_llm_gguf(
    hf_model: Any,
    tokenizer: Any,
    sentencepiece_model: str | Path,
    out_path: str | Path,
    *,
    dtype: str = "f16",
    chat_template: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    weights: WeightSource | None = None,
) -> dict[str, Any]:
    """Write the language model of a `Gemma3ForConditionalGeneration` as a `gemma3` GGUF with its SentencePiece
    tokenizer (`sentencepiece_model`: the checkpoint's `tokenizer.model`) plus the tokens added to it. `weights`: as `write_qwen2_vl_llm_gguf`'s.
    Returns the manifest's LLM section (JSON-able)."""
    text_config = hf_model.config.text_config
    hparams = gemma3_hparams(text_config)  # validates the config before any tensor is touched
    if not text_config.tie_word_embeddings:
        raise UnsupportedModelError("Gemma 3 ties its output to the token embeddings; this checkpoint does not")
    vocab_size = int(text_config.vocab_size)
    if chat_template is None:
        logger.warning("no chat template found; the GGUF will carry none (fine for a base model)")
    gguf_tokenizer, special_ids = sentencepiece_tokenizer_of(tokenizer, sentencepiece_model, vocab_size, chat_template)
    write_gguf(
        out_path, arch=ARCH, metadata=hparams, tensors=_tensor_source(weights or model_weights(hf_model)), tokenizer=gguf_tokenizer,
        dtype=dtype, name=Path(str(getattr(hf_model, "name_or_path", "") or ARCH)).name or ARCH, progress=progress,
    )  # fmt: skip
    return {**decoder_summary(ARCH, dtype, text_config, vocab_size, chat_template), "special_tokens": special_ids,
            "image_attention": "bidirectional"}  # fmt: skip
