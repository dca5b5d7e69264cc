"""SmolVLM2's / Idefics3's language model → GGUF (arch `llama`), with its byte-level BPE tokenizer and chat template.

The tensors and hyperparameters are plain Llama's (`llama_gguf`); the checkpoint keeps them under
`model.text_model.`, and SmolVLM2 ties the output to the token embeddings (no `output.weight` then: llama.cpp uses
`token_embd`). The tokenizer is SmolLM2's kind: GPT-2's byte-level BPE after splitting digits one by one, which is
llama.cpp's `smollm` pre-tokenizer; any other pre-tokenizer is refused rather than tokenized differently.
"""

from __future__ import annotations

import json
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
    tokenizer_from_hf,
    write_gguf,
)
from edgevlm.exporters.llama_gguf import ARCH, llama_hparams, llama_tensor_source

logger = logging.getLogger(__name__)

LLM_PREFIX = "model.text_model."
VISION_PREFIXES = ("model.vision_model.", "model.connector.")
PRE_TOKENIZER = "smollm"  # llama.cpp's: "\p{N}" then GPT-2's regex
SMOLLM_PRE_TOKENIZER = [("Digits", {"individual_digits": True}), ("ByteLevel", {"add_prefix_space": False, "use_regex": True})]  # fmt: skip


def gguf_name_function(tied: bool) -> Callable[[str], str | None]:
    """Checkpoint name -> GGUF name (None: the vision side, or the tied output). Unknown ones raise ValueError."""

    def gguf_tensor_name(hf_name: str) -> str | None:
        if hf_name.startswith(VISION_PREFIXES) or (tied and hf_name == "lm_head.weight"):
            return None
        if hf_name == "lm_head.weight":
            return "output.weight"
        rest = hf_name.removeprefix(LLM_PREFIX)
        name = decoder_tensor_name(rest, DECODER_TENSOR_MAP) if rest != hf_name else None
        if name is None:
            raise ValueError(f"tensor {hf_name!r} has no GGUF name for arch {ARCH}; the checkpoint is not plain SmolVLM2/Idefics3")  # fmt: skip
        return name

    return gguf_tensor_name


def check_pre_tokenizer(tokenizer: Any) -> None:
    """Refuse a tokenizer whose pre-tokenizer is not SmolLM2's (llama.cpp's `smollm` would split text otherwise)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    found = [(step.get("type"), {key: step.get(key) for key in expected}) for step, (_, expected) in zip(steps, SMOLLM_PRE_TOKENIZER, strict=False)]  # fmt: skip
    if len(steps) != len(SMOLLM_PRE_TOKENIZER) or found != SMOLLM_PRE_TOKENIZER:
        raise UnsupportedModelError(f"tokenizer pre-tokenizer {spec!r}: edgevlm exports SmolLM2's (Digits individual_digits, then ByteLevel with GPT-2's regex), llama.cpp's {PRE_TOKENIZER!r}")  # fmt: skip


def write_smolvlm_llm_gguf(
    hf_model: Any,
    tokenizer: Any,
    out_path: str | Path,
    *,
    dtype: str = "f16",
    chat_template: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    weights: WeightSource | None = None,
) -> dict[str, Any]:
    """Write the language model of a `SmolVLMForConditionalGeneration` / `Idefics3ForConditionalGeneration` as a
    `llama` GGUF with its tokenizer. Returns the manifest's LLM section (JSON-able)."""
    config = hf_model.config
    text_config = config.text_config
    hparams = llama_hparams(text_config)  # validates the config before any tensor is touched
    check_pre_tokenizer(tokenizer)
    if chat_template is None:
        logger.warning("no chat template found; the GGUF will carry none (fine for a base model)")
    vocab_size = int(text_config.vocab_size)
    roles = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id}  # fmt: skip
    special_ids = {role: int(i) for role, i in roles.items() if i is not None}
    gguf_tokenizer = tokenizer_from_hf(tokenizer, vocab_size=vocab_size, pre=PRE_TOKENIZER, special_ids=special_ids, chat_template=chat_template)  # fmt: skip
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(text_config, "tie_word_embeddings", False))
    tensors = llama_tensor_source(weights or model_weights(hf_model), text_config, gguf_name_function(tied))
    write_gguf(
        out_path, arch=ARCH, metadata=hparams, tensors=tensors, tokenizer=gguf_tokenizer, dtype=dtype,
        name=Path(str(getattr(hf_model, "name_or_path", "") or "smolvlm")).name or "smolvlm", progress=progress,
    )  # fmt: skip
    return {**decoder_summary(ARCH, dtype, text_config, vocab_size, chat_template), "special_tokens": special_ids, "tied_embeddings": tied}  # fmt: skip
