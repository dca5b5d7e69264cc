"""The language model's input embeddings of text tokens, read from its GGUF.

llama.cpp decodes a batch of either token ids or embeddings. A prompt with an image would therefore take three
batches (text before, image, text after), and on a CPU a batch of a few dozen tokens costs nearly as much as one of
hundreds: the weights are streamed once per batch either way. Looking the text's rows up in `token_embd.weight`
ourselves lets the whole prompt go as one embeddings batch, exactly what llama.cpp's own lookup (`get_rows`, which
dequantizes the same rows to float32) would have fed the first layer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from ..gguf_header import read_gguf_header

logger = logging.getLogger(__name__)

TOKEN_EMBEDDING_TENSOR = "token_embd.weight"


class TokenEmbeddings:
    """Rows of a GGUF's token embedding matrix as float32; the file is memory-mapped, only the rows used are read."""

    def __init__(self, gguf_path: str | os.PathLike):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        tensor = read_gguf_header(gguf_path, keys=()).tensors.get(TOKEN_EMBEDDING_TENSOR)
        if tensor is None or len(tensor.shape) != 2:
            raise ValueError(f"{gguf_path} has no 2-D {TOKEN_EMBEDDING_TENSOR}")
        self.qtype = GGMLQuantizationType(tensor.type_id)
        self.n_embd, self.n_vocab = tensor.shape
        block_size, block_bytes = GGML_QUANT_SIZES[self.qtype]
        row_bytes = self.n_embd // block_size * block_bytes
        self._rows = np.memmap(gguf_path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(self.n_vocab, row_bytes))  # fmt: skip

    def __call__(self, tokens: Sequence[int]) -> np.ndarray:
        """(len(tokens), n_embd) float32."""
        from gguf.quants import dequantize

        ids = np.asarray(tokens, dtype=np.int64)
        if not ids.size:
            return np.empty((0, self.n_embd), dtype=np.float32)
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.n_vocab}), got {ids.min()}..{ids.max()}")
        return np.ascontiguousarray(dequantize(np.asarray(self._rows[ids]), self.qtype), dtype=np.float32)


def open_token_embeddings(gguf_path: str | os.PathLike) -> TokenEmbeddings | None:
    """The table, or None (the text then goes in token batches) when gguf-py cannot read or dequantize it."""
    try:
        table = TokenEmbeddings(gguf_path)
        table([0])  # a type gguf-py cannot dequantize fails here, not in the middle of a request
    except (ImportError, ValueError, KeyError, NotImplementedError) as e:
        logger.info("text around images goes in separate token batches: %s", e)
        return None
    return table
