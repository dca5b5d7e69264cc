"""What the families whose language model is a plain Llama share on the GGUF side (LLaVA, SmolVLM2 / Idefics3):
the `llama` architecture's hyperparameters and the tensors, with the rows of q_proj and k_proj permuted from
transformers' rotate-half rotary layout to llama.cpp's interleaved one, as llama.cpp's own converter does it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from edgevlm.errors import UnsupportedModelError
from edgevlm.exporters.checkpoint import WeightSource
from edgevlm.exporters.gguf import TensorSource, decoder_hparams, rope_settings

if TYPE_CHECKING:
    import torch

ARCH = "llama"


def head_dim(text_config: Any) -> int:
    return int(getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads)


def llama_hparams(text_config: Any) -> dict[str, Any]:
    """GGUF metadata keys/values of the `llama` architecture from a Llama text config."""
    import gguf

    rope, rope_theta = rope_settings(text_config)
    if rope.get("rope_type", "default") != "default" or rope_theta is None:
        raise UnsupportedModelError(f"Llama rope settings {rope!r}: edgevlm exports plain rope (rope_type 'default') with rope_theta")  # fmt: skip

    dimensions = gguf.Keys.Rope.DIMENSION_COUNT.format(arch=ARCH)
    return {**decoder_hparams(ARCH, text_config, rope_theta), dimensions: head_dim(text_config)}


def interleave_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q_proj/k_proj rows from transformers' rotate-half layout (per head: first halves, then second halves) to
    llama.cpp's interleaved pairs; the same permutation as llama.cpp's `LlamaModel.permute`."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)  # fmt: skip


def llama_tensor_source(
    weights: WeightSource, text_config: Any, gguf_name: Callable[[str], str | None]
) -> TensorSource:
    """The `llama` GGUF tensors of a checkpoint: `gguf_name` maps each checkpoint name to its GGUF name (None: not
    part of the language model), q/k rows are interleaved, everything float32 (the writer picks the stored type)."""
    import torch

    heads = {"attn_q": text_config.num_attention_heads, "attn_k": text_config.num_key_value_heads}

    def tensors(shapes_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
        for hf_name, tensor in weights(shapes_only):
            name = gguf_name(hf_name)
            if name is None:
                continue
            array = tensor.detach().to(dtype=torch.float32)
            role = name.split(".")[2] if name.startswith("blk.") else None
            yield name, interleave_rotary_rows(array, heads[role]) if role in heads else array

    return tensors
