"""`edgevlm bench` on a real tiny bundle: every stage measured, the plain llama-cpp-python baseline, the outputs."""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from edgevlm.bench import figure, image_side_blocks, markdown, plot, run_bench, short_cases
from edgevlm.llama_backend import cpu_has_amx


def test_image_side_blocks_stay_within_the_requested_tokens():
    assert image_side_blocks(64) == (8, 8)
    assert image_side_blocks(1024) == (32, 32)
    assert image_side_blocks(300) == (17, 17)  # 289 tokens: as square as possible, never above the request
    assert image_side_blocks(2) == (1, 2)
    with pytest.raises(ValueError, match="positive"):
        image_side_blocks(0)


@pytest.fixture(scope="module")
def bench_result(tiny_bundles):
    lines = []
    result = run_bench(tiny_bundles["Q8_0"], image_tokens=(4, 16), runs=2, max_new_tokens=4, progress=lines.append)
    assert any("baseline" in line for line in lines)
    return result


def test_bench_measures_every_stage_per_image_size(bench_result):
    assert [case["n_image_tokens"] for case in bench_result["cases"]] == [4, 16]
    assert [case["image_size"] for case in bench_result["cases"]] == [(56, 56), (112, 112)]
    for case in bench_result["cases"]:
        stages = case["stages"]
        assert all(1 <= n <= 4 for n in case["n_generated"])  # a random model may end early
        for name in ("vision_ms", "image_prefill_ms", "time_to_first_token_ms"):
            assert 0 < stages[name]["low"] <= stages[name]["median"] <= stages[name]["high"], name
        # the image part of the prefill and the vision encoder happen before the first token
        assert stages["vision_ms"]["median"] + stages["image_prefill_ms"]["median"] < stages["time_to_first_token_ms"]["high"]  # fmt: skip
    text = bench_result["text_prefill_tokens_per_s"]
    assert 0 < text["low"] <= text["median"] <= text["high"]
    assert bench_result["load_s"] > 0
    assert bench_result["peak_rss_bytes"] > sum(bench_result["files"].values()) / 10
    assert set(bench_result["files"]) == {"llm-Q8_0.gguf", "vision.onnx", "vision-int8.onnx"}
    # what the automatic rule chose for llama.cpp's extra buffer types, not the setting (None)
    assert bench_result["llm_settings"]["repack_weights"] is None
    assert bench_result["llm_extra_buffers"] is not cpu_has_amx()


def test_bench_records_the_host_it_ran_on(bench_result):
    host = bench_result["host"]
    assert host["physical_cores"] >= 1 and host["logical_cpus"] >= host["physical_cores"]
    assert host["llama_cpp"].startswith("CPU :") and host["onnxruntime"]
    # on x86-64 and ARM64 Linux the ISA line names at least the vector extension the kernels use
    if Path("/proc/cpuinfo").exists() and platform.machine() in ("x86_64", "aarch64"):
        assert host["isa"] != "unknown"
    assert host["onnxruntime_int8"] in ("exact int32 sums", "pairs saturate in int16 (vpmaddubsw)")


def test_bench_baseline_is_plain_llama_cpp_on_the_same_gguf(bench_result):
    baseline = bench_result["baseline"]
    ours, plain = baseline["runtime_decode_tokens_per_s"], baseline["plain_llama_decode_tokens_per_s"]
    assert 0 < plain["low"] <= plain["median"] <= plain["high"]
    assert 0 < ours["low"] <= ours["median"] <= ours["high"]
    assert baseline["decode_ratio"] == pytest.approx(ours["median"] / plain["median"])


def test_bench_reports_as_markdown_json_and_plot(bench_result, tmp_path):
    table = markdown(bench_result)
    assert "| 4 | 56x56 |" in table and "| 16 | 112x112 |" in table and "ratio" in table and "text prefill" in table
    extra_buffers = "on" if bench_result["llm_extra_buffers"] else "off"
    assert f"extra buffer types (repacked and AMX weights) {extra_buffers}" in table
    json.dumps(bench_result)  # JSON-ready as it is
    pytest.importorskip("matplotlib")
    png = plot(bench_result, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_checks_its_flags_before_loading(tiny_bundles):
    def bench(*args):
        return subprocess.run([sys.executable, "-m", "edgevlm.cli", "bench", str(tiny_bundles["F32"]), *args],
                              check=False, capture_output=True, text=True, timeout=120)  # fmt: skip

    result = bench("--image-tokens", "64,abc")
    assert result.returncode == 2 and "comma-separated integers" in result.stderr
    result = bench("--runs", "0")
    assert result.returncode == 2 and "at least 1" in result.stderr
    result = bench("--image-tokens", "0")
    assert result.returncode == 2 and "positive" in result.stderr


def test_bench_labels_rows_with_the_tokens_measured_and_warns_when_fewer_than_asked(bench_result):
    result = copy.deepcopy(bench_result)
    result["cases"][0]["requested_tokens"] = 64  # as the demo model, whose pixel limit caps images at 36 tokens
    assert short_cases(result) == [result["cases"][0]] and short_cases(bench_result) == []
    table = markdown(result)
    assert "| 4 (asked 64) | 56x56 |" in table and "| 16 | 112x112 |" in table
    assert "warning: the model encoded fewer image tokens than asked for 64" in table
    assert "warning" not in markdown(bench_result)
    pytest.importorskip("matplotlib")
    labels = [label.get_text() for label in figure(result).axes[0].get_xticklabels()]
    assert labels == ["4 tok (asked 64)\n56x56", "16 tok\n112x112"]


def test_bench_plot_legend_stays_off_the_bars(bench_result):
    pytest.importorskip("matplotlib")
    fig = figure(bench_result)
    fig.canvas.draw()
    stages = fig.axes[0]
    assert not stages.get_legend().get_window_extent().overlaps(stages.get_window_extent())


def test_bench_plot_without_matplotlib_fails_before_measuring(tiny_bundles, tmp_path):
    shadow = tmp_path / "no-matplotlib" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), *sys.path])}
    command = [sys.executable, "-m", "edgevlm.cli", "bench", str(tiny_bundles["F32"]), "--plot", str(tmp_path / "b.png")]  # fmt: skip
    result = subprocess.run(command, env=env, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "edgevlm bench: error: --plot needs matplotlib: pip install 'edgevlm[bench]'" in result.stderr
    assert "loading" not in result.stderr and not (tmp_path / "b.png").exists()  # nothing ran
