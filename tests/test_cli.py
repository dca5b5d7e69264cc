"""The `edgevlm` command as a user runs it: real subprocesses, real files, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def edgevlm(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgevlm.cli", *args], capture_output=True, text=True, timeout=600, cwd=cwd)  # fmt: skip


def test_run_prints_the_answer_and_stats(tiny_bundles, tmp_path):
    from conftest import random_image

    image = tmp_path / "photo.jpg"
    random_image(300, 400).save(image)
    result = edgevlm("run", str(tiny_bundles["Q4_K_M"]), "--image", str(image), "-p", "What is this?", "--max-new-tokens", "4", "--stats")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "image tokens 154" in result.stderr  # 300x400 -> 308x392 -> grid 22x28 -> 11x14
    assert "decode" in result.stderr and "first token" in result.stderr


def test_run_errors_are_one_clear_line(tiny_bundles, tmp_path):
    result = edgevlm("run", str(tiny_bundles["F32"]), "--image", str(tmp_path / "nope.jpg"), "-p", "hi")
    assert result.returncode == 2
    assert "edgevlm run: error:" in result.stderr and "nope.jpg" in result.stderr
    assert "Traceback" not in result.stderr
    result = edgevlm("run", str(tmp_path), "-p", "hi")
    assert result.returncode == 2 and "no edgevlm.json" in result.stderr


def test_verify_command(tiny_bundles):
    result = edgevlm("verify", str(tiny_bundles["F32"]))
    assert result.returncode == 0, result.stderr
    assert "match their sha256" in result.stdout


def test_export_cli_writes_a_bundle_and_refuses_to_overwrite(tiny_qwen2vl_dir, tmp_path):
    out = tmp_path / "bundle"
    result = edgevlm("export", str(tiny_qwen2vl_dir), "-o", str(out), "--f16")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "edgevlm.json").read_text())
    assert manifest["llm"]["quantization"] == "F16" and "llm-F16.gguf" in manifest["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging or partial directories left

    again = edgevlm("export", str(tiny_qwen2vl_dir), "-o", str(out), "--f16")
    assert again.returncode == 2 and "not empty; pass --force" in again.stderr


def test_export_of_unsupported_architecture_names_the_supported_ones(tmp_path):
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    result = edgevlm("export", str(model), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "'LlamaForCausalLM' is not supported" in result.stderr
    assert "Qwen2VLForConditionalGeneration" in result.stderr
    assert not (tmp_path / "out").exists()


def test_export_of_unknown_alias_lists_aliases(tmp_path):
    result = edgevlm("export", "qwen2-vl-3b", "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "qwen2-vl-2b" in result.stderr


@pytest.mark.parametrize("flags", [["--int4", "--int8"], ["--vision-dtype", "fp64"]])
def test_export_flag_errors(flags, tmp_path):
    result = edgevlm("export", "qwen2-vl-2b", "-o", str(tmp_path / "out"), *flags)
    assert result.returncode == 2 and "error" in result.stderr


def test_failed_export_leaves_nothing_behind(tiny_qwen2vl_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_qwen2vl_dir.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "model.safetensors").unlink()
    (broken / "model.safetensors").write_bytes(b"\0" * 100)  # corrupt weights: loading fails
    out = tmp_path / "out"
    result = edgevlm("export", str(broken), "-o", str(out))
    assert result.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
