"""Bundles as untrusted input: altered files, manifests that point outside the bundle or list too little, malformed
manifests of any shape, and the record of verified files that keeps repeat loads cheap."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgevlm
from edgevlm.bundle import MANIFEST_NAME, Bundle
from edgevlm.errors import BundleError
from edgevlm.integrity import CACHE_DIR_ENV, sha256_file


def edgevlm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgevlm.cli", *args], check=False, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgevlm {command}: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def bundle_copy(tiny_bundles, tmp_path) -> Path:
    """A private copy of the tiny F32 bundle that a test may damage."""
    return shutil.copytree(tiny_bundles["F32"], tmp_path / "bundle")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A fresh, empty record of verified files for this test (and the processes it starts)."""
    path = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(path))
    return path


def read_manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST_NAME).read_text())


def write_manifest(bundle: Path, manifest: object) -> None:
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))


def flip_last_byte(path: Path) -> None:
    """Change the file's content, same size (only a checksum notices)."""
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


# --- altered files -------------------------------------------------------------------------------------------------


def test_altered_gguf_of_the_same_size_is_refused_on_first_load(bundle_copy, cache_dir):
    gguf = bundle_copy / "llm-F32.gguf"
    flip_last_byte(gguf)
    with pytest.raises(BundleError, match=r"llm-F32.gguf fails its sha256 check.*Copy the whole bundle folder again"):
        edgevlm.load(bundle_copy, n_ctx=512)


def test_run_refuses_an_altered_gguf_and_no_verify_skips_the_check(bundle_copy, cache_dir):
    flip_last_byte(bundle_copy / "llm-F32.gguf")  # the last byte is tensor data: the model still loads
    refused = edgevlm_cli("run", str(bundle_copy), "-p", "hi", "--max-new-tokens", "2")
    assert_one_line_error(refused, "run", "llm-F32.gguf fails its sha256 check")
    skipped = edgevlm_cli("run", str(bundle_copy), "-p", "hi", "--max-new-tokens", "2", "--no-verify")
    assert skipped.returncode == 0, skipped.stderr


def test_verified_files_are_remembered_and_rehashed_only_when_changed(bundle_copy, cache_dir):
    names = set(Bundle.open(bundle_copy).manifest.files)
    assert set(Bundle.open(bundle_copy).verify(cached=True).values()) == {"ok"}  # first time: hashed
    record = json.loads((cache_dir / "verified.json").read_text())["files"]
    assert {Path(path).name for path in record} == names
    assert set(Bundle.open(bundle_copy).verify(cached=True).values()) == {"ok (verified before)"}
    assert set(Bundle.open(bundle_copy).verify().values()) == {"ok"}  # `edgevlm verify` always hashes

    onnx = bundle_copy / "vision.onnx"
    os.utime(onnx)  # touched, same content: hashed again, still fine
    results = Bundle.open(bundle_copy).verify(cached=True)
    assert results["vision.onnx"] == "ok" and results["llm-F32.gguf"] == "ok (verified before)"


def test_content_altered_with_its_mtime_restored_is_still_caught(bundle_copy, cache_dir):
    edgevlm.load(bundle_copy, n_ctx=512).close()  # verified and remembered
    gguf = bundle_copy / "llm-F32.gguf"
    before = gguf.stat()
    flip_last_byte(gguf)
    os.utime(gguf, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as recorded; ctime is not
    with pytest.raises(BundleError, match="fails its sha256 check"):
        edgevlm.load(bundle_copy, n_ctx=512)


def test_corrupt_record_is_ignored_and_rewritten(bundle_copy, cache_dir, caplog):
    cache_dir.mkdir()
    (cache_dir / "verified.json").write_text('{"format": 1, "files": [' * 100_000)
    with caplog.at_level(logging.WARNING, logger="edgevlm.integrity"):
        assert set(Bundle.open(bundle_copy).verify(cached=True).values()) == {"ok"}
    assert "ignoring the unreadable verified-files cache" in caplog.text
    assert len(json.loads((cache_dir / "verified.json").read_text())["files"]) == 2


def test_unwritable_cache_dir_only_warns(bundle_copy, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocker / "edgevlm"))
    with caplog.at_level(logging.WARNING, logger="edgevlm.integrity"):
        edgevlm.load(bundle_copy, n_ctx=512).close()
    assert "could not write the verified-files cache" in caplog.text and CACHE_DIR_ENV in caplog.text


def test_cache_dir_follows_xdg_cache_home(bundle_copy, tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    Bundle.open(bundle_copy).verify(cached=True)
    assert (tmp_path / "xdg" / "edgevlm" / "verified.json").is_file()


# --- manifests that point outside the bundle or list too little ------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/llm.gguf", "..", ".hidden", "a\\b", "nul\0", "", "x" * 300])  # fmt: skip
def test_file_names_must_be_plain_names_inside_the_bundle(bundle_copy, name):
    for place in ("files", "llm", "vision"):
        manifest = read_manifest(bundle_copy)
        if place == "files":
            manifest["files"][name] = {"size": 11, "sha256": "0" * 64}
        elif place == "llm":
            manifest["llm"]["file"] = name
        else:
            manifest["vision"]["variants"]["fp32"]["file"] = name
        write_manifest(bundle_copy, manifest)
        with pytest.raises(BundleError, match="is not a plain file name inside the bundle"):
            Bundle.open(bundle_copy)


def test_verify_refuses_a_manifest_entry_outside_the_bundle(bundle_copy):
    manifest = read_manifest(bundle_copy)
    passwd = Path("/etc/passwd")
    manifest["files"]["../../../../etc/passwd"] = {"size": passwd.stat().st_size, "sha256": sha256_file(passwd)}
    write_manifest(bundle_copy, manifest)
    result = edgevlm_cli("verify", str(bundle_copy))
    assert_one_line_error(result, "verify", "files.../../../../etc/passwd", "not a plain file name")
    assert "ok" not in result.stdout


def test_verify_refuses_a_manifest_that_lists_no_files(bundle_copy):
    manifest = read_manifest(bundle_copy)
    manifest["files"] = {}
    write_manifest(bundle_copy, manifest)
    result = edgevlm_cli("verify", str(bundle_copy))
    assert_one_line_error(result, "verify", "files: lists no files")
    assert "all 0 files match" not in result.stdout


def test_manifest_must_list_every_file_it_uses(bundle_copy):
    manifest = read_manifest(bundle_copy)
    del manifest["files"]["llm-F32.gguf"]
    write_manifest(bundle_copy, manifest)
    with pytest.raises(BundleError, match="files: does not list llm-F32.gguf, which the manifest refers to"):
        Bundle.open(bundle_copy)


def test_external_data_file_of_a_graph_must_be_listed(bundle_copy, cache_dir):
    """A graph with its weights in `vision.onnx.data` (as the exporter writes graphs over 1.5 GB): the data file
    must be in `files`, or an altered one would load unchecked."""
    import onnx

    graph = bundle_copy / "vision.onnx"
    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="vision.onnx.data", size_threshold=1024)  # fmt: skip
    manifest = read_manifest(bundle_copy)
    manifest["files"]["vision.onnx"] = {"size": graph.stat().st_size, "sha256": sha256_file(graph)}
    write_manifest(bundle_copy, manifest)
    with pytest.raises(BundleError, match="has vision.onnx.data, which edgevlm.json does not list"):
        Bundle.open(bundle_copy)

    data = bundle_copy / "vision.onnx.data"
    manifest["files"]["vision.onnx.data"] = {"size": data.stat().st_size, "sha256": sha256_file(data)}
    write_manifest(bundle_copy, manifest)
    vlm = edgevlm.load(bundle_copy, n_ctx=512)  # listed: checked, and onnxruntime reads the weights from it
    vlm.close()
    flip_last_byte(data)
    with pytest.raises(BundleError, match="vision.onnx.data fails its sha256 check"):
        edgevlm.load(bundle_copy, n_ctx=512)


# --- malformed manifests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,message",
    [
        ("[]", "expected a JSON object, got []"),
        ("1", "expected a JSON object, got 1"),
        ("null", "expected a JSON object, got None"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
        ("{not json", "not readable JSON"),
    ],
)
def test_malformed_manifest_text_is_a_clear_error(bundle_copy, text, message):
    (bundle_copy / MANIFEST_NAME).write_text(text)
    with pytest.raises(BundleError, match=re.escape(message)):
        Bundle.open(bundle_copy)


def test_oversized_manifest_is_refused_before_parsing(bundle_copy):
    (bundle_copy / MANIFEST_NAME).write_text(" " * (2 << 20) + "{}")
    with pytest.raises(BundleError, match="more than a manifest's limit"):
        Bundle.open(bundle_copy)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("vision", [], "vision: expected a JSON object, got []"),
        ("vision.variants", [1], "vision.variants: expected a JSON object, got [1]"),
        ("vision.variants.fp32", "x", "vision.variants.fp32: expected a JSON object, got 'x'"),
        ("vision.variants.fp32.file", 5, "vision.variants.fp32.file: expected a string, got 5"),
        ("vision.embedding_dim", "64", "vision.embedding_dim: expected an integer, got '64'"),
        ("vision.embedding_dim", True, "vision.embedding_dim: expected an integer, got True"),
        ("vision.mlp_ratio", "4", "vision.mlp_ratio: expected a finite number"),
        ("vision.default", "fp16", "vision.default: 'fp16' is not one of the variants"),
        ("vision.patch_positions", "sideways", "vision.patch_positions: 'sideways' is not known"),
        ("llm", None, "llm: expected a JSON object, got None"),
        ("llm.n_ctx_train", -1, "llm.n_ctx_train: expected a positive integer, got -1"),
        ("tokens.eos_ids", [2], "tokens: unknown key(s) 'eos_ids'"),
        ("positions.kind", "spiral", "positions.kind: 'spiral' is not known"),
        ("positions.kind", None, "positions.kind: None is not known to this edgevlm (its positions kinds: mrope-3d, linear"),
        ("positions.merge_size", 0, "positions: positions merge_size=0: expected a positive integer"),
        ("positions.merge_size", 1, "positions.merge_size: 1 differs from preprocessing's merge_size 2"),
        ("positions", "mrope-3d", "positions: expected a JSON object with a 'kind', got 'mrope-3d'"),
        ("preprocessing", {"kind": "crystal-ball"}, "preprocessing.kind: 'crystal-ball' is not known"),
        ("preprocessing", {"patch_size": 14}, "preprocessing: missing key 'kind'"),
        ("preprocessing.image_mean", [10**400, 0, 0], "preprocessing: preprocessing image_mean="),
        ("vision.mlp_ratio", 10**400, "vision.mlp_ratio: expected a finite number"),
        ("vision.embedding_dim", 65, "vision.embedding_dim: 65 differs from llm.embedding_length"),
        ("files", [], "files: expected a JSON object, got []"),
        ("files.vision.onnx", {"size": 1}, "files.vision.onnx: missing key 'sha256'"),
        ("files.vision.onnx", {"size": 1, "sha256": "abc"}, "files.vision.onnx: expected a size >= 0 and a sha256"),
        ("budget", [], "budget: expected a JSON object"),
        ("budget", {"max_image_tokens": 0}, "invalid budget section"),
        ("family", {}, "family: expected a string"),
        ("surprise", 1, "unknown key(s) 'surprise'"),
        ("tokens.image_pad", None, "tokens.image_pad: expected a string, got None"),
        ("tokens.image_pad", "", "tokens.image_pad: the image placeholder's text is empty"),
        ("llm.text_normalization", "NFX", "llm.text_normalization: 'NFX' is not a Unicode normalization form"),
        ("llm.file", None, "llm.file: expected a string, got None"),
    ],
)
def test_wrong_types_and_values_name_the_key(bundle_copy, key, value, message):
    manifest = read_manifest(bundle_copy)
    *parents, last = key.split(".") if not key.startswith("files.") else ["files", key.removeprefix("files.")]
    section = manifest
    for part in parents:
        section = section[part]
    section[last] = value
    write_manifest(bundle_copy, manifest)
    with pytest.raises(BundleError, match=re.escape(message)):
        Bundle.open(bundle_copy)


@pytest.mark.parametrize("command", ["run", "verify", "plan"])
@pytest.mark.parametrize("text", ["[]", "1", "[" * 100_000 + "]" * 100_000, '{"format_version": 1, "vision": 2}'])
def test_cli_answers_a_malformed_manifest_with_one_line(bundle_copy, command, text, tmp_path):
    from conftest import random_image

    image = tmp_path / "photo.png"
    random_image(64, 64).save(image)
    (bundle_copy / MANIFEST_NAME).write_text(text)
    extra = {"run": ["-p", "hi"], "plan": ["--image", str(image)], "verify": []}[command]
    assert_one_line_error(edgevlm_cli(command, str(bundle_copy), *extra), command, "edgevlm.json")


# --- property: whatever the manifest holds, opening it succeeds or raises BundleError ---------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON value's objects and arrays."""
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += _paths(item, (*prefix, index))
    return paths


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_manifest_opens_or_raises_bundle_error(tiny_bundles, tmp_path, data):
    source = tiny_bundles["F32"]
    manifest = read_manifest(source)
    paths = _paths(manifest)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(paths), label="path")
        value = data.draw(json_values, label="value")
        if not path:
            manifest = value
            break
        parent = manifest
        try:
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced part of this path
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    for name in ("llm-F32.gguf", "vision.onnx"):  # the files themselves, without copying them
        if not (bundle / name).exists():
            (bundle / name).symlink_to(source / name)
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    try:
        Bundle.open(bundle)
    except BundleError:
        pass
