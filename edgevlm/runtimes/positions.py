"""Where image embeddings sit in the language model's position space, by the manifest's position kind."""

from __future__ import annotations

import numpy as np

from ..bundle import PositionSpec

# llama.cpp's M-RoPE models take 4 position slots per embedding: time, row, column, and an unused fourth.
MROPE_SLOTS = 4


def text_positions(start: int, n_tokens: int) -> np.ndarray:
    """Text tokens advance one position each (llama.cpp expands them to all M-RoPE slots itself)."""
    return np.arange(start, start + n_tokens, dtype=np.int32)


def text_embedding_positions(spec: PositionSpec, start: int, n_tokens: int) -> np.ndarray:
    """Positions of text decoded as embeddings, shape (slots, n_tokens), as llama.cpp expands a token batch's:
    for `mrope` the same position in time, row and column and 0 in the fourth slot."""
    positions = text_positions(start, n_tokens)
    if spec.kind == "mrope":
        return np.concatenate([np.tile(positions, (MROPE_SLOTS - 1, 1)), np.zeros((1, n_tokens), np.int32)])
    if spec.kind == "linear":
        return positions[None, :]
    raise ValueError(f"unknown position kind {spec.kind!r} in the manifest; expected 'mrope' or 'linear'")


def image_positions(spec: PositionSpec, start: int, grid: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    """Positions of one image's embeddings, shape (slots, n_tokens), and the position of the text that follows.

    `grid` is the vision grid (t, h, w) in patches. For `mrope` the LLM sees a (h/merge, w/merge) grid of tokens at
    (start + t, start + row, start + col), and text resumes at start + max(t, rows, cols), as transformers'
    `get_rope_index` computes it. For `linear` the tokens take consecutive positions.
    """
    grid_t, grid_h, grid_w = grid
    if spec.kind == "mrope":
        rows, cols = grid_h // spec.merge_size, grid_w // spec.merge_size
        t_idx, row_idx, col_idx = np.meshgrid(np.arange(grid_t), np.arange(rows), np.arange(cols), indexing="ij")
        positions = np.zeros((MROPE_SLOTS, grid_t * rows * cols), dtype=np.int32)
        positions[0] = start + t_idx.reshape(-1)
        positions[1] = start + row_idx.reshape(-1)
        positions[2] = start + col_idx.reshape(-1)
        return positions, start + max(grid_t, rows, cols)
    if spec.kind == "linear":
        n_tokens = grid_t * grid_h * grid_w // (spec.merge_size**2)
        return text_positions(start, n_tokens)[None, :], start + n_tokens
    raise ValueError(f"unknown position kind {spec.kind!r} in the manifest; expected 'mrope' or 'linear'")
