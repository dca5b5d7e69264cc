"""LLaVA's language model → GGUF (arch `llama`), with its SentencePiece tokenizer and chat template.

The result loads in stock llama.cpp. As llama.cpp's own converter does for `llama`, the rows of q_proj and k_proj
are permuted from transformers' rotate-half rotary layout to llama.cpp's interleaved one. The vision tower and the
projector are not in this file (they go to ONNX).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgevlm.errors import UnsupportedModelError
from edgevlm.exporters.checkpoint import WeightSource, model_weights
from edgevlm.exporters.gguf import (
    DECODER_TENSOR_MAP,
    decoder_summary,
    decoder_tensor_name,
    sentencepiece_tokenizer_of,
    write_gguf,
)
from edgevlm.exporters.llama_gguf import ARCH, llama_hparams, llama_tensor_source

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
LLM_PREFIX = "model.language_model."  # transformers >= 4.52 (older llava-hf checkpoints are renamed on load)
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a checkpoint tensor; None for the vision tower and projector. Unknown ones raise ValueError."""
    if hf_name.startswith(VISION_PREFIXES):
        return None
    if hf_name == "lm_head.weight":
        return "output.weight"
    rest = hf_name.removeprefix(LLM_PREFIX)
    name = decoder_tensor_name(rest, DECODER_TENSOR_MAP) if rest != hf_name else None
    if name is None:
        raise ValueError(f"tensor {hf_name!r} has no GGUF name for arch {ARCH}; the checkpoint is not plain LLaVA")
    return name


def _warn_if_transformers_drops_the_space(tokenizer: Any) -> None:
    """llama.cpp's SentencePiece tokenizer puts "▁" before text that follows a special token (`<image>`), as the
    original LLaVA's per-chunk tokenization did; transformers 5 with `legacy: false` does not."""
    pre_tokenizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if pre_tokenizer is not None and "prepend_scheme=first" in repr(pre_tokenizer):
        logger.warning(
            "this tokenizer (legacy: false) tokenizes the text after %s without the leading '\u2581' that llama.cpp "
            "and the original LLaVA add: the bundle follows llama.cpp, so logits after an image can differ from "
            "transformers' by that one token", IMAGE_TOKEN,
        )  # fmt: skip


def write_llava_llm_gguf(
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
    """Write the language model of a `LlavaForConditionalGeneration` as a `llama` GGUF with its SentencePiece
    tokenizer (`sentencepiece_model`: the checkpoint's `tokenizer.model`) plus the tokens added to it (`<image>`).
    Returns the manifest's LLM section (JSON-able)."""
    text_config = hf_model.config.text_config
    hparams = llama_hparams(text_config)  # validates the config before any tensor is touched
    vocab_size = int(text_config.vocab_size)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        raise UnsupportedModelError(f"tokenizer lacks LLaVA's {IMAGE_TOKEN} token")
    if chat_template is None:
        logger.warning("no chat template found; the GGUF will carry none (fine for a base model)")
    _warn_if_transformers_drops_the_space(tokenizer)
    gguf_tokenizer, special_ids = sentencepiece_tokenizer_of(tokenizer, sentencepiece_model, vocab_size, chat_template)
    write_gguf(
        out_path, arch=ARCH, metadata=hparams, tensors=llama_tensor_source(weights or model_weights(hf_model), text_config, gguf_tensor_name), tokenizer=gguf_tokenizer,
        dtype=dtype, name=Path(str(getattr(hf_model, "name_or_path", "") or "llava")).name or "llava", progress=progress,
    )  # fmt: skip
    return {**decoder_summary(ARCH, dtype, text_config, vocab_size, chat_template), "special_tokens": special_ids}
