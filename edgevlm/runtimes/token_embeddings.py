"""The language model's input embeddings of text tokens, read from its GGUF.

llama.cpp decodes a batch of either token ids or embeddings. A prompt with an image would therefore take three
batches (text before, image, text after), and on a CPU a batch of a few dozen tokens costs nearly as much as one of
hundreds: the weights are streamed once per batch either way. Looking the text's rows up in `token_embd.weight`
ourselves lets the whole prompt go as one embeddings batch, exactly what llama.cpp's own lookup (`get_rows`, which
dequantizes the same rows to float32) would have fed the first layer. Where llama.cpp's rows are wider than the
table's (DeepStack sets after the input embedding, qwen3vl), it pads a token's row with zeros, and so do we.
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

    def __init__(self, gguf_path: str | os.PathLike, row_width: int | None = None):
        """`row_width`: the width of the rows returned (the model's input width), zero-padded; None: the table's."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        tensor = read_gguf_header(gguf_path, keys=()).tensors.get(TOKEN_EMBEDDING_TENSOR)
        if tensor is None or len(tensor.shape) != 2:
            raise ValueError(f"{gguf_path} has no 2-D {TOKEN_EMBEDDING_TENSOR}")
        self.qtype = GGMLQuantizationType(tensor.type_id)
        self.n_embd, self.n_vocab = tensor.shape
        self.row_width = self.n_embd if row_width is None else row_width
        if self.row_width < self.n_embd:
            raise ValueError(f"row width {row_width} is narrower than {TOKEN_EMBEDDING_TENSOR}'s {self.n_embd}")
        block_size, block_bytes = GGML_QUANT_SIZES[self.qtype]
        row_bytes = self.n_embd // block_size * block_bytes
        self._rows = np.memmap(gguf_path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(self.n_vocab, row_bytes))  # fmt: skip

    def __call__(self, tokens: Sequence[int]) -> np.ndarray:
        """(len(tokens), row_width) float32."""
        from gguf.quants import dequantize

        ids = np.asarray(tokens, dtype=np.int64)
        rows = np.zeros((ids.size, self.row_width), dtype=np.float32)
        if not ids.size:
            return rows
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.n_vocab}), got {ids.min()}..{ids.max()}")
        rows[:, : self.n_embd] = dequantize(np.asarray(self._rows[ids]), self.qtype)
        return rows


def open_token_embeddings(gguf_path: str | os.PathLike, row_width: int | None = None) -> TokenEmbeddings | None:
    """The table (rows `row_width` wide), or None (the text then goes in token batches) when gguf-py cannot read or
    dequantize it."""
    try:
        table = TokenEmbeddings(gguf_path, row_width)
        table([0])  # a type gguf-py cannot dequantize fails here, not in the middle of a request
    except (ImportError, ValueError, KeyError, NotImplementedError) as e:
        logger.info("text around images goes in separate token batches: %s", e)
        return None
    return table
