"""The `edgevlm` command as a user runs it: real subprocesses, real files, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def edgevlm(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgevlm.cli", *args], check=False, capture_output=True, text=True, timeout=600, cwd=cwd)  # fmt: skip


def test_run_prints_the_answer_and_stats(tiny_bundles, tmp_path):
    from conftest import random_image

    image = tmp_path / "photo.jpg"
    random_image(300, 400).save(image)
    result = edgevlm("run", str(tiny_bundles["Q4_K_M"]), "--image", str(image), "-p", "What is this?", "--max-new-tokens", "4", "--stats")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "image tokens 154" in result.stderr  # 300x400 -> 308x392 -> grid 22x28 -> 11x14
    assert "decode" in result.stderr and "first token" in result.stderr
    assert "profile cpu | vision int8 |" in result.stderr  # which profile and precision ran (the suite pins cpu)


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
    result = edgevlm("export", str(tiny_qwen2vl_dir), "-o", str(out), "--f16", "-v")  # -v after the subcommand
    assert result.returncode == 0, result.stderr
    # -v shows edgevlm's steps, not the libraries' (onnx_ir's passes logged ~370 lines for a 2B export)
    assert "INFO edgevlm.exporters.onnx_export: exported" in result.stderr
    third_party = [line for line in result.stderr.splitlines() if line.startswith(("INFO ", "DEBUG ")) and " edgevlm" not in line]  # fmt: skip
    assert third_party == []
    manifest = json.loads((out / "edgevlm.json").read_text())
    assert manifest["llm"]["quantization"] == "F16" and "llm-F16.gguf" in manifest["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging or partial directories left
    # by default the int8 graph the cpu profile loads ships beside fp32; the summary shows files, checks and the command
    assert set(manifest["vision"]["variants"]) == {"fp32", "int8"}
    summary = result.stdout
    assert f"bundle written to {out}:" in summary and "vision-int8.onnx" in summary and "llm-F16.gguf" in summary
    assert "vision fp32: max abs diff" in summary and "vision int8: cosine vs fp32 mean" in summary
    assert f"run it: edgevlm run {out} --image" in summary

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


# -- flags: checked at parse time, with the subcommand's usage -------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        ("run", ["--max-new-tokens", "0"], "argument --max-tokens/--max-new-tokens: must be at least 1, got 0"),
        ("run", ["--max-tokens", "many"], "expected an integer, got 'many'"),
        ("run", ["--threads", "0"], "argument --threads: must be at least 1, got 0"),
        ("run", ["--temperature", "-1"], "argument --temperature: must be at least 0, got -1"),
        ("run", ["--temperature", "nan"], "argument --temperature: must be at least 0, got nan"),
        ("run", ["--top-p", "2"], "argument --top-p: must be in (0, 1], got 2"),
        ("run", ["--seed", "-1"], "argument --seed: must be in [0, 4294967294], got -1"),
        ("run", ["--n-ctx", "0"], "argument --n-ctx: must be at least 1"),
        ("run", ["--max-image-tokens", "0"], "argument --max-image-tokens: must be at least 1, got 0"),
        ("run", ["--image-budget", "-5"], "argument --image-budget: must be at least 1, got -5"),
        ("run", ["--tiles", "0"], "argument --tiles: must be at least 1, got 0"),
        ("chat", ["--top-k", "-1"], "argument --top-k: must be at least 0, got -1"),
        ("plan", ["--image", "a.jpg", "--gflops", "0"], "argument --gflops: must be greater than 0, got 0"),
        ("bench", ["--runs", "0"], "argument --runs: must be at least 1, got 0"),
        ("bench", ["--max-tokens", "1"], "must be at least 2, got 1"),
        ("serve", ["--port", "70000"], "argument --port: must be in [1, 65535], got 70000"),
        ("serve", ["--request-timeout", "0"], "argument --request-timeout: must be greater than 0, got 0"),
        ("serve", ["--queue", "-1"], "argument --queue: must be at least 0, got -1"),
        ("export", ["--max-image-tokens", "0"], "argument --max-image-tokens: must be at least 1, got 0"),
    ],
)
def test_numbers_are_checked_at_parse_time(command, flags, message, tmp_path):
    positional = ["qwen2-vl-2b"] if command == "export" else [str(tmp_path / "bundle")]
    prompt = ["-p", "hi"] if command == "run" else []
    result = edgevlm(command, *positional, *prompt, *flags)
    assert result.returncode == 2, result.stderr
    assert f"usage: edgevlm {command} " in result.stderr  # the subcommand's usage, not the top level's
    assert f"edgevlm {command}: error: argument " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_mistyped_flag_prints_the_subcommand_usage(tmp_path):
    result = edgevlm("run", str(tmp_path), "-p", "hi", "--max-tokns", "4")
    assert result.returncode == 2
    assert "usage: edgevlm run " in result.stderr and "edgevlm run: error: unrecognized arguments: --max-tokns" in result.stderr  # fmt: skip
    result = edgevlm("profiles", "show", "cpu", "--bogus")
    assert result.returncode == 2 and "usage: edgevlm profiles show " in result.stderr


def test_version():
    import edgevlm as package

    result = edgevlm("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"edgevlm {package.__version__}"


def test_help_has_examples_defaults_and_says_what_each_argument_is():
    text = " ".join(edgevlm("run", "--help").stdout.split())  # argparse wraps lines
    assert "examples: edgevlm run bundle/ --image photo.jpg" in text
    assert "bundle bundle directory (made by `edgevlm export`)" in text
    assert "-p PROMPT, --prompt PROMPT the question or instruction about the images" in text
    assert "most tokens in the answer (--max-new-tokens is the old name) (default: 256)" in text
    assert "--temperature T 0 = greedy (default: 0.0)" in text
    top = edgevlm("--help").stdout
    assert "examples:" in top and "edgevlm chat bundle/" in top and "--version" in top


def test_logging_flags_work_before_or_after_the_subcommand(tiny_bundles):
    bundle = str(tiny_bundles["F32"])
    for args in (["-v", "verify", bundle], ["verify", bundle, "-v"], ["verify", bundle, "--log-level", "info"]):
        result = edgevlm(*args)
        assert result.returncode == 0, (args, result.stderr)
    result = edgevlm("-v", "verify", bundle, "-q")
    assert result.returncode == 2 and "-v and -q contradict each other" in result.stderr


def test_very_verbose_export_shows_the_third_party_logs_too(tiny_qwen2vl_dir, tmp_path):
    louder = edgevlm("export", str(tiny_qwen2vl_dir), "-o", str(tmp_path / "b"), "--f16", "-vv")
    assert louder.returncode == 0, louder.stderr
    assert any(line.startswith(("INFO onnx", "DEBUG onnx")) for line in louder.stderr.splitlines())


# -- run: --json, --system, --image - -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from conftest import random_image

    path = tmp_path_factory.mktemp("photo") / "photo.png"
    random_image(120, 160).save(path)
    return path


RUN_FLAGS = ("--max-tokens", "6", "--threads", "1", "--n-ctx", "1024")


def test_run_json_is_one_object_with_the_streamed_answer(tiny_bundles, photo):
    bundle = str(tiny_bundles["F32"])
    plain = edgevlm("run", bundle, "--image", str(photo), "-p", "What is this?", *RUN_FLAGS)
    result = edgevlm("run", bundle, "--image", str(photo), "-p", "What is this?", *RUN_FLAGS, "--json")
    assert plain.returncode == 0 and result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer) == {"text", "finish_reason", "timings", "usage"}
    assert answer["text"] + "\n" == plain.stdout  # the same greedy answer as the streamed one
    assert answer["finish_reason"] in ("stop", "length")
    timings, usage = answer["timings"], answer["usage"]
    assert timings["n_image_tokens"] > 0 and timings["load_s"] > 0 and "decode_tokens_per_s" in timings
    assert usage["completion_tokens"] == timings["n_generated"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_run_reads_the_image_from_stdin(tiny_bundles, photo):
    bundle = str(tiny_bundles["F32"])
    from_file = edgevlm("run", bundle, "--image", str(photo), "-p", "What is this?", *RUN_FLAGS, "--json")
    command = [sys.executable, "-m", "edgevlm.cli", "run", bundle, "--image", "-", "-p", "What is this?", *RUN_FLAGS, "--json"]  # fmt: skip
    from_stdin = subprocess.run(command, check=False, input=photo.read_bytes(), capture_output=True, timeout=600)
    assert from_stdin.returncode == 0, from_stdin.stderr.decode()
    a, b = json.loads(from_file.stdout), json.loads(from_stdin.stdout)
    assert a["text"] == b["text"] and a["timings"]["n_image_tokens"] == b["timings"]["n_image_tokens"] > 0
    empty = subprocess.run(command, check=False, input=b"", capture_output=True, timeout=600)
    assert empty.returncode == 2 and b"stdin is empty" in empty.stderr
    twice = edgevlm("run", bundle, "--image", "-", "--image", "-", "-p", "hi")
    assert twice.returncode == 2 and "usage: edgevlm run" in twice.stderr and "stdin holds one image" in twice.stderr


def test_run_system_message_reaches_the_model(tiny_bundles, photo):
    import edgevlm as package

    bundle = tiny_bundles["F32"]
    system = "You are a careful assistant. Answer every question in French, in one short sentence."
    result = edgevlm("run", str(bundle), "--system", system, "--image", str(photo), "-p", "What is this?", *RUN_FLAGS, "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    user = {"role": "user", "content": [{"type": "image", "image": str(photo)}, {"type": "text", "text": "What is this?"}]}  # fmt: skip
    with package.load(bundle, n_ctx=1024, n_threads=1) as vlm:
        with_system = vlm.chat([{"role": "system", "content": system}, user], max_tokens=6)
        without = vlm.chat([user], max_tokens=6)
    answer = json.loads(result.stdout)
    assert answer["text"] == with_system.text
    assert answer["usage"] == with_system.usage and answer["usage"]["prompt_tokens"] > without.usage["prompt_tokens"]
    refused = edgevlm("run", str(bundle), "--system", system, "--tiles", "2", "-p", "hi")
    assert refused.returncode == 2 and "--system does not combine with --crop or --tiles" in refused.stderr


def test_a_missing_vision_precision_says_how_to_export_it(tiny_bundles):
    from edgevlm.bundle import Bundle

    bundle = tiny_bundles["Q4_K_M"]
    missing = next(d for d in ("fp16", "int8", "fp32") if d not in Bundle.open(bundle).manifest.vision.variants)
    result = edgevlm("run", str(bundle), "-p", "hi", "--vision-dtype", missing)
    assert result.returncode == 2 and f"export the bundle again with `--vision-dtype {missing}`" in result.stderr
