"""A GGUF file's header (metadata and tensor directory), read straight from the file.

Both sides need it: the runtime sizes the KV cache from the header before llama.cpp loads anything, the exporter
checks what it wrote. gguf.GGUFReader builds a Python object per array element and takes ~20 s on a file carrying a
150k-token vocabulary and 150k merges; this reads the same header in a fraction of a second, and skips the values
it was not asked for without decoding them.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
# GGUF value type id -> struct format (little-endian); 8 is a string, 9 an array (gguf.GGUFValueType).
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_ALIGNMENT_KEY, _DEFAULT_ALIGNMENT = "general.alignment", 32


@dataclass(frozen=True)
class GGUFTensor:
    type_id: int  # ggml type (gguf.GGMLQuantizationType)
    shape: tuple[int, ...]  # ggml order: the row length first
    offset: int  # where its data starts in the file


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]  # plain Python values: str, int, float, bool, lists of those
    tensors: dict[str, GGUFTensor]  # by name, in file order; empty when reading stopped early

    @property
    def tensor_types(self) -> dict[str, int]:
        return {name: tensor.type_id for name, tensor in self.tensors.items()}


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: str | Path):
        self.buf, self.path, self.offset = buf, path, 0

    def skip(self, n_bytes: int) -> int:
        """Step over `n_bytes`; returns where they start."""
        start = self.offset
        if start + n_bytes > len(self.buf):
            raise ValueError(f"{self.path}: the GGUF header is cut short at byte {start} (file of {len(self.buf)} bytes)")  # fmt: skip
        self.offset += n_bytes
        return start

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack_from(fmt, self.buf, self.skip(struct.calcsize(fmt)))

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        start = self.skip(length)
        return self.buf[start : start + length].decode("utf-8", errors="replace")

    def _strings(self, count: int, *, keep: bool) -> list[str] | None:
        buf, offset, items = self.buf, self.offset, []
        for _ in range(count):
            if offset + 8 > len(buf):
                self.skip(offset + 8 - self.offset)  # raises: the file ends inside the array
            (length,) = struct.unpack_from("<Q", buf, offset)
            if keep:
                items.append(buf[offset + 8 : offset + 8 + length].decode("utf-8", errors="replace"))
            offset += 8 + length
        self.skip(offset - self.offset)  # checks the strings lay inside the file
        return items if keep else None

    def value(self, value_type: int, *, keep: bool) -> Any:
        """The next value of `value_type`, or None after only stepping over it when `keep` is False."""
        if value_type == _STRING:
            if keep:
                return self.string()
            self.skip(self.unpack("<Q")[0])
            return None
        if value_type == _ARRAY:
            item_type, count = self.unpack("<IQ")
            if item_type in _SCALAR_FORMATS and item_type != 7:
                dtype = np.dtype(_SCALAR_FORMATS[item_type])
                start = self.skip(count * dtype.itemsize)
                return np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).tolist() if keep else None
            if item_type == _STRING:  # vocabularies and merges: 100k+ items, so one tight loop
                return self._strings(count, keep=keep)
            items = [self.value(item_type, keep=keep) for _ in range(count)]
            return items if keep else None
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"{self.path}: unknown GGUF value type {value_type} at byte {self.offset}")
        (value,) = self.unpack(_SCALAR_FORMATS[value_type])
        return value


def read_gguf_header(path: str | Path, keys: Collection[str] | None = None, *, tensors: bool = True) -> GGUFHeader:
    """The metadata and tensor directory of a little-endian GGUF (v2/v3).

    With `keys`, only those metadata values are kept; with `tensors` False as well, reading stops as soon as all of
    them are found. Raises ValueError when the file is not such a GGUF or its header is cut short.
    """
    wanted = None if keys is None else {*keys, _ALIGNMENT_KEY} if tensors else set(keys)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (starts with {bytes(buf[:4])!r})")
        cursor = _Cursor(buf, path)
        cursor.skip(4)
        version, n_tensors, n_kv = cursor.unpack("<IQQ")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (expected 2 or 3, little-endian)")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cursor.string()
            (value_type,) = cursor.unpack("<I")
            keep = wanted is None or key in wanted
            value = cursor.value(value_type, keep=keep)
            if keep:
                metadata[key] = value
                if not tensors and wanted is not None and len(metadata) == len(wanted):
                    break
        if not tensors:
            return GGUFHeader({k: v for k, v in metadata.items() if keys is None or k in keys}, {})
        directory = []
        for _ in range(n_tensors):
            name = cursor.string()
            (n_dims,) = cursor.unpack("<I")
            shape = cursor.unpack(f"<{n_dims}Q")
            type_id, relative_offset = cursor.unpack("<IQ")
            directory.append((name, type_id, shape, relative_offset))
        alignment = int(metadata.get(_ALIGNMENT_KEY, _DEFAULT_ALIGNMENT))
        data_start = -(-cursor.offset // alignment) * alignment
    found = {name: GGUFTensor(type_id, tuple(shape), data_start + offset) for name, type_id, shape, offset in directory}  # fmt: skip
    return GGUFHeader({k: v for k, v in metadata.items() if keys is None or k in keys}, found)
