"""What one request leaves for the next: vision embeddings by image content, and the KV cache's contents.

A follow-up question about the same camera frame renders the whole conversation again. Its prompt starts like the
previous one (system prompt, the image, the first question, the previous answer), so the pipeline decodes only from
the longest common prefix of what the KV cache holds (`KVRecord`), and an image seen recently is not re-encoded
(`EmbeddingCache`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..contract.kinds.preprocessing import PreparedImage

# A unit of the KV cache: a text token (its id) or a whole image span (its content key).
Unit = int | str


def image_key(image: PreparedImage, vision_dtype: str) -> str:
    """Content key of a preprocessed image: its patches, grid and the vision precision that would encode it."""
    digest = hashlib.sha256(np.ascontiguousarray(image.pixel_patches, dtype=np.float32).data)
    digest.update(repr((image.grid, image.merge_size, vision_dtype)).encode())
    for name, value in sorted(image.graph_inputs.items()):  # what packs its tokens (AnyRes), if anything
        digest.update(name.encode() + np.ascontiguousarray(value).tobytes())
    return "image:" + digest.hexdigest()


class EmbeddingCache:
    """Least-recently-used vision embeddings by `image_key`, at most `max_bytes` of them (0 turns it off)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.n_bytes = 0
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> np.ndarray | None:
        embeddings = self._entries.get(key)
        if embeddings is not None:
            self._entries.move_to_end(key)
        return embeddings

    def put(self, key: str, embeddings: np.ndarray) -> None:
        if embeddings.nbytes > self.max_bytes or key in self._entries:
            return
        embeddings.setflags(write=False)  # shared with later requests
        self._entries[key] = embeddings
        self.n_bytes += embeddings.nbytes
        while self.n_bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.n_bytes -= evicted.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.n_bytes = 0


@dataclass
class KVRecord:
    """The units in the KV cache, in order, with each unit's position and the cache cells before it.

    Positions are not cell counts under M-RoPE (an image advances the text position by its longest side in tokens),
    so both are kept: removing the cache's tail needs the position, the room check needs the cells.
    """

    units: list[Unit] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    cells_before: list[int] = field(default_factory=list)
    end_position: int = 0
    end_cells: int = 0

    def common_prefix(self, units: list[Unit]) -> int:
        """How many leading `units` the cache already holds."""
        n = 0
        for held, wanted in zip(self.units, units):
            if held != wanted:
                break
            n += 1
        return n

    def truncate(self, n_units: int) -> tuple[int, int]:
        """Forget every unit from index `n_units` on; returns (first removed position, cells kept)."""
        if n_units < len(self.units):
            self.end_position = self.positions[n_units]
            self.end_cells = self.cells_before[n_units]
            del self.units[n_units:], self.positions[n_units:], self.cells_before[n_units:]
        return self.end_position, self.end_cells

    def append(self, unit: Unit, position: int, n_cells: int, next_position: int) -> None:
        """Record a unit decoded at `position` into `n_cells` cells; text continues at `next_position`."""
        self.units.append(unit)
        self.positions.append(position)
        self.cells_before.append(self.end_cells)
        self.end_cells += n_cells
        self.end_position = next_position

    def clear(self) -> None:
        self.units.clear()
        self.positions.clear()
        self.cells_before.clear()
        self.end_position = self.end_cells = 0
