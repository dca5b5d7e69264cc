"""The bundle contract: manifest round trip, completeness checks, atomic writing, clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

import edgevlm
from edgevlm.bundle import Bundle, BundleWriter
from edgevlm.contract.manifest import MANIFEST_NAME, Manifest
from edgevlm.errors import BundleError


@pytest.fixture
def bundle_copy(tiny_bundles, tmp_path):
    """A private copy of the tiny F32 bundle that a test may damage."""
    return shutil.copytree(tiny_bundles["F32"], tmp_path / "bundle")


def test_manifest_round_trips(tiny_bundles):
    bundle = Bundle.open(tiny_bundles["Q4_K_M"])
    again = Manifest.from_dict(json.loads(json.dumps(bundle.manifest.to_dict())))
    assert again == bundle.manifest
    assert bundle.verify() == {name: "ok" for name in bundle.manifest.files}


def test_missing_file_is_reported(bundle_copy):
    (bundle_copy / "vision.onnx").unlink()
    with pytest.raises(BundleError, match="missing vision.onnx"):
        edgevlm.load(bundle_copy)


def test_truncated_file_is_reported(bundle_copy):
    gguf = bundle_copy / "llm-F32.gguf"
    size = gguf.stat().st_size
    with open(gguf, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(BundleError, match=rf"has {size // 2} bytes, the manifest expects {size}"):
        edgevlm.load(bundle_copy)


def test_corrupt_file_fails_verify(bundle_copy):
    onnx = bundle_copy / "vision.onnx"
    data = bytearray(onnx.read_bytes())
    data[-10] ^= 0xFF  # same size, different content: only the checksum notices
    onnx.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(bundle_copy).verify()


@pytest.mark.parametrize("version", [99, True, 1.0, "2"])
def test_unknown_format_version_is_refused(bundle_copy, version):
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    manifest["format_version"] = version
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"format version {re.escape(repr(version))}; this edgevlm reads versions 1 and 2"):  # fmt: skip
        edgevlm.load(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no edgevlm.json"):
        Bundle.open(tmp_path)
    with pytest.raises(BundleError, match="not a bundle directory"):
        Bundle.open(tmp_path / "nowhere")
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not readable JSON"):
        Bundle.open(tmp_path)


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="boom"), BundleWriter(out) as writer:
        writer.path("vision.onnx").write_bytes(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_non_empty_output_without_force(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(BundleError, match="not empty; pass --force"):
        BundleWriter(tmp_path).__enter__()
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_a_signal_between_commits_renames_arrives_once_the_bundle_is_in_place(bundle_copy, tmp_path, monkeypatch):
    """Re-exporting over a bundle renames it away, then the new one into place: a SIGTERM in between used to leave
    no bundle at all. It now waits until the new bundle is there."""
    manifest = Bundle.open(bundle_copy).manifest
    out = tmp_path / "out"
    shutil.copytree(bundle_copy, out)

    class Terminated(Exception):
        pass

    def terminate(signum, frame):
        raise Terminated()

    rename = Path.rename

    def rename_then_signal(self, target):
        moved = rename(self, target)
        if self == out:  # the old bundle is gone, the new one not yet in place
            os.kill(os.getpid(), signal.SIGTERM)
        return moved

    previous = signal.signal(signal.SIGTERM, terminate)
    monkeypatch.setattr(Path, "rename", rename_then_signal)
    try:
        with pytest.raises(Terminated), BundleWriter(out, force=True) as writer:
            for name in manifest.files:
                shutil.copy(bundle_copy / name, writer.path(name))
            writer.commit(manifest)
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert Bundle.open(out).manifest.files == manifest.files


def _as_format_1(manifest: dict) -> dict:
    """The tiny Qwen2-VL bundle's manifest as edgevlm 0.1.0 wrote it (format 1): family-named kinds, graph I/O
    names, M-RoPE sections and token ids that no runtime read."""
    v1 = json.loads(json.dumps(manifest))
    v1["format_version"] = 1
    v1["preprocessing"]["kind"] = "qwen2_vl"
    v1["positions"] = {"kind": "mrope", "merge_size": 2, "sections": [8, 12, 12]}
    v1["vision"].update(input_names=["pixel_patches", "patch_positions"], output_name="image_embeds", patch_positions="qwen2_vl")  # fmt: skip
    v1["tokens"].update(image_pad_id=151655, vision_start_id=151652, vision_end_id=151653, eos_ids=[151645, 151643])
    return v1


def test_format_1_llava_manifests_are_migrated(tiny_llava_bundles):
    current = json.loads((tiny_llava_bundles["F32"] / MANIFEST_NAME).read_text())
    v1 = json.loads(json.dumps(current))  # as 0.1.0 wrote a LLaVA bundle's
    v1["format_version"] = 1
    v1["preprocessing"]["kind"] = "clip"
    v1["positions"]["sections"] = []
    v1["vision"].update(input_names=["pixel_patches"], output_name="image_embeds", patch_positions="none")
    v1["tokens"].update(image_pad_id=32000, vision_start_id=None, vision_end_id=None, eos_ids=[2])
    migrated = Manifest.from_dict(v1)
    assert migrated == Manifest.from_dict(current)
    assert (migrated.preprocessing.kind, migrated.positions.kind, migrated.vision.patch_positions.kind) == ("fixed-resize", "linear", "none")  # fmt: skip


def test_format_1_manifests_are_migrated(bundle_copy):
    manifest_path = bundle_copy / MANIFEST_NAME
    current = json.loads(manifest_path.read_text())
    assert current["format_version"] == 2
    manifest_path.write_text(json.dumps(_as_format_1(current)))
    migrated = Bundle.open(bundle_copy).manifest
    assert migrated == Manifest.from_dict(current)
    assert (migrated.preprocessing.kind, migrated.positions.kind, migrated.vision.patch_positions.kind) == ("dynamic-patches", "mrope-3d", "grid-2d")  # fmt: skip


@pytest.mark.parametrize(("input_names", "kind"), [(None, "grid-2d"), (["pixel_patches", "patch_positions"], "grid-2d"), (["pixel_patches"], "none")])  # fmt: skip
def test_format_1_without_patch_positions_reads_the_graph_inputs(bundle_copy, input_names, kind):
    """0.1.0 wrote `patch_positions` only for LLaVA; before that, `input_names` (or nothing: Qwen2-VL) said it."""
    v1 = _as_format_1(json.loads((bundle_copy / MANIFEST_NAME).read_text()))
    del v1["vision"]["patch_positions"]
    if input_names is None:
        del v1["vision"]["input_names"]
    else:
        v1["vision"]["input_names"] = input_names
    assert Manifest.from_dict(v1).vision.patch_positions.kind == kind


def test_format_1_with_an_unknown_kind_names_it(bundle_copy):
    v1 = _as_format_1(json.loads((bundle_copy / MANIFEST_NAME).read_text()))
    v1["positions"]["kind"] = "spiral"
    with pytest.raises(BundleError, match=r"positions.kind: 'spiral' is not known to this edgevlm \(its positions kinds: mrope-3d, linear"):  # fmt: skip
        Manifest.from_dict(v1)
