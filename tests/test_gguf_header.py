"""The GGUF header reader shared by the runtime (KV estimate) and the exporter (checks of what it wrote)."""

from __future__ import annotations

import numpy as np
import pytest

from edgevlm.gguf_header import read_gguf_header


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "h.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(3)
    writer.add_token_list([f"tok{i}" for i in range(5000)])
    writer.add_array("tokenizer.ggml.scores", [float(i) for i in range(5000)])
    writer.add_string("zz.after_the_vocabulary", "found")
    writer.add_tensor("a.weight", np.arange(32, dtype=np.float16).reshape(4, 8))
    writer.add_tensor("b.weight", np.full((8,), -1.0, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_reads_every_value_and_tensor_type(gguf_file):
    header = read_gguf_header(gguf_file)
    assert header.metadata["llama.block_count"] == 3
    assert header.metadata["tokenizer.ggml.tokens"][4999] == "tok4999"
    assert header.metadata["tokenizer.ggml.scores"][:3] == [0.0, 1.0, 2.0]
    assert header.tensor_types == {"a.weight": 1, "b.weight": 0}  # F16, F32
    a, b = header.tensors["a.weight"], header.tensors["b.weight"]
    assert a.shape == (8, 4) and b.shape == (8,)  # ggml order: row length first
    raw = gguf_file.read_bytes()
    assert np.frombuffer(raw, np.float16, count=32, offset=a.offset).tolist() == [float(i) for i in range(32)]
    assert np.frombuffer(raw, np.float32, count=8, offset=b.offset).tolist() == [-1.0] * 8


def test_keys_skip_the_rest(gguf_file):
    keys = {"llama.block_count", "zz.after_the_vocabulary"}
    header = read_gguf_header(gguf_file, keys=keys)
    assert header.metadata == {"llama.block_count": 3, "zz.after_the_vocabulary": "found"}
    assert header.tensors == read_gguf_header(gguf_file).tensors
    early = read_gguf_header(gguf_file, keys=keys, tensors=False)
    assert early.metadata == header.metadata and early.tensors == {}
    assert read_gguf_header(gguf_file, keys={"absent.key"}, tensors=False).metadata == {}


@pytest.mark.parametrize("keep", [200, 20_000, 85_000])
def test_truncated_files_are_a_value_error(gguf_file, tmp_path, keep):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file.read_bytes()[:keep])
    with pytest.raises(ValueError, match="cut short"):
        read_gguf_header(cut)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_header(path)
