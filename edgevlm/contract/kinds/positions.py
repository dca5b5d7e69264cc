"""Where image embeddings sit in the language model's position space: the manifest's `positions` section.

Text tokens advance one position each (llama.cpp expands a token batch's positions to every slot itself); these
strategies give the positions of image embeddings, and of text decoded as embeddings next to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .registry import Section, check_positive_ints, register


def text_positions(start: int, n_tokens: int) -> np.ndarray:
    """Text tokens advance one position each."""
    return np.arange(start, start + n_tokens, dtype=np.int32)


@dataclass(frozen=True)
class _Positions(Section):
    """What the position kinds share: `merge_size` patches per side make one token."""

    merge_size: int = 1

    def __post_init__(self) -> None:
        check_positive_ints(self, "positions", ("merge_size",))


@register("positions", "mrope-3d")
@dataclass(frozen=True)
class MRope3D(_Positions):
    """Multimodal rotary positions in (time, row, column), as Qwen2-VL's M-RoPE: llama.cpp takes 4 slots per
    embedding (time, row, column, an unused fourth), laid out section-major."""

    slots: ClassVar[int] = 4

    def text_embedding_positions(self, start: int, n_tokens: int) -> np.ndarray:
        """Positions of text decoded as embeddings, (slots, n_tokens), as llama.cpp expands a token batch's: the
        same position in time, row and column and 0 in the fourth slot."""
        positions = text_positions(start, n_tokens)
        return np.concatenate([np.tile(positions, (self.slots - 1, 1)), np.zeros((1, n_tokens), np.int32)])

    def image_positions(self, start: int, grid: tuple[int, int, int]) -> tuple[np.ndarray, int]:
        """Positions of one image's embeddings, (slots, n_tokens), and the position of the text that follows.

        `grid` is the vision grid (t, h, w) in patches: the LLM sees a (h/merge, w/merge) grid of tokens at
        (start + t, start + row, start + col), and text resumes at start + max(t, rows, cols), as transformers'
        `get_rope_index` computes it.
        """
        grid_t, grid_h, grid_w = grid
        rows, cols = grid_h // self.merge_size, grid_w // self.merge_size
        t_idx, row_idx, col_idx = np.meshgrid(np.arange(grid_t), np.arange(rows), np.arange(cols), indexing="ij")
        positions = np.zeros((self.slots, grid_t * rows * cols), dtype=np.int32)
        positions[0] = start + t_idx.reshape(-1)
        positions[1] = start + row_idx.reshape(-1)
        positions[2] = start + col_idx.reshape(-1)
        return positions, start + max(grid_t, rows, cols)


@register("positions", "linear")
@dataclass(frozen=True)
class Linear(_Positions):
    """Image tokens take consecutive positions, like text (LLaVA)."""

    slots: ClassVar[int] = 1

    def text_embedding_positions(self, start: int, n_tokens: int) -> np.ndarray:
        return text_positions(start, n_tokens)[None, :]

    def image_positions(self, start: int, grid: tuple[int, int, int]) -> tuple[np.ndarray, int]:
        grid_t, grid_h, grid_w = grid
        n_tokens = grid_t * grid_h * grid_w // (self.merge_size**2)
        return text_positions(start, n_tokens)[None, :], start + n_tokens


@register("positions", "mrope-3d-interleaved")
@dataclass(frozen=True)
class MRope3DInterleaved(MRope3D):
    """Qwen3-VL's interleaved M-RoPE: the same (time, row, column) positions as `mrope-3d`, and the fourth slot
    carries the time position too. transformers rotates every pair outside the interleaved row and column sections
    by time; llama.cpp's interleaved kernel (rope type IMROPE) takes the angle of those past 3 x their section (2 of
    Qwen3-VL's 64 pairs, `sections` [24, 20, 20, 0]) from the fourth slot. Token batches (text-only prompts, generated
    tokens) get 0 there from llama.cpp, as images do in its own multimodal path: on those two lowest-frequency pairs
    (~4e-7 rad per position at rope_theta 5e6) llama.cpp's text differs from transformers, ours (fed as embeddings)
    does not; the logits differ by ~1e-4 on the tiny model."""

    def text_embedding_positions(self, start: int, n_tokens: int) -> np.ndarray:
        return np.tile(text_positions(start, n_tokens), (self.slots, 1))

    def image_positions(self, start: int, grid: tuple[int, int, int]) -> tuple[np.ndarray, int]:
        positions, next_position = super().image_positions(start, grid)
        positions[3] = positions[0]
        return positions, next_position


Positions = MRope3D | MRope3DInterleaved | Linear
