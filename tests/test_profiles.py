"""Hardware profiles: loading and validation, auto-detection on faked machines, the exact settings each shipped profile
produces, fallbacks, the memory ceiling, and real bundles loaded with profiles (CPU; GPU runs are in tests/gpu/)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import edgevlm
from edgevlm.budget import BudgetLimits
from edgevlm.bundle import Bundle
from edgevlm.errors import ProfileError
from edgevlm.profiles import (
    HostInfo,
    LlamaSettings,
    Overrides,
    choose_profile,
    load_profile,
    probe_host,
    resolve_settings,
    shipped_profiles,
)
from edgevlm.profiles.host import cores_taken_by_others
from edgevlm.profiles.memory import kv_cache_bytes, kv_values_per_token
from edgevlm.runtimes.llm import _set_load_mode

GIB = 2**30
ALL_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_HOST = HostInfo(None, None, ALL_PROVIDERS, True, 16 * GIB, physical_cores=6, logical_cpus=12)
CPU_HOST = HostInfo(None, None, ("CPUExecutionProvider",), False, 32 * GIB, physical_cores=4, logical_cpus=8)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ loading


def test_shipped_profiles_load():
    assert shipped_profiles() == ["cpu", "cpu-lowmem", "cuda", "jetson-agx-orin", "jetson-orin-nano", "jetson-orin-nx"]
    for name in shipped_profiles():
        profile = load_profile(name)
        assert profile.name == name and profile.description
        assert profile.vision.providers[-1] == "cpu"  # every profile ends on the provider that always exists


# fmt: off
INVALID_PROFILES = [
    ("colour = 1\n", r"unknown key\(s\) colour; a profile takes description, extends, strict, vision, llm"),
    ("[llm]\nn_ctxx = 4096\n", r"unknown key\(s\) llm.n_ctxx; \[llm\] takes n_gpu_layers, .*n_ctx"),
    ("[llm]\nflash_attn = 1\n", r"llm.flash_attn = 1 is invalid; expected one of 'auto', true, false"),
    ("[llm]\nkv_cache_type = 'q3_k'\n", r"llm.kv_cache_type = 'q3_k' is invalid; expected one of 'f32', 'f16'"),
    ("[llm]\nn_threads = 'all'\n", r"llm.n_threads = 'all' is invalid; expected \"physical\" or a whole number >= 1"),
    ("[llm]\nn_gpu_layers = -2\n", r"llm.n_gpu_layers = -2 is invalid; expected a whole number >= -1"),
    ("[llm]\nn_batch = 128\nn_ubatch = 256\n", r"n_ubatch = 256 is above llm.n_batch = 128"),
    ("[llm]\nkv_cache_type = 'q8_0'\nflash_attn = false\n", r"q8_0' needs flash attention"),
    ("[vision]\nproviders = ['cuda', 'rocm']\n", r"vision.providers = \['cuda', 'rocm'\] is invalid; expected a list of distinct names from 'tensorrt', 'cuda', 'cpu'"),
    ("[vision]\nproviders = []\n", r"at least one"),
    ("[vision]\nprecision = ['int4']\n", r"vision.precision .* from 'fp32', 'fp16', 'int8'"),
    ("[vision]\nproviders = ['cpu']\n[vision.tensorrt]\nfp16 = true\n", r"\[vision.tensorrt\] is set but 'tensorrt' is not in vision.providers"),
    ("[vision]\nproviders = ['cuda']\n[vision.cuda]\narena_extend_strategy = 'kGrow'\n", r"vision.cuda.arena_extend_strategy = 'kGrow' is invalid; expected one of 'kNextPowerOfTwo', 'kSameAsRequested'"),
    ("[vision]\nproviders = ['cuda']\n[vision.cuda]\nmem = 1\n", r"unknown key\(s\) vision.cuda.mem"),
    ("vision = 3\n", r"\[vision\] must be a table"),
    ("[budget]\nmax_image_tokens = 0\n", r"\[budget\]|max_image_tokens=0"),
    ("[budget]\nmax_tokens = 10\n", r"unknown key\(s\) max_tokens; known keys: max_image_tokens"),
    ("[memory]\nceiling_gib = 4\nceiling_ram_fraction = 0.5\n", r"set one of memory.ceiling_gib and memory.ceiling_ram_fraction"),
    ("[memory]\nceiling_ram_fraction = 1.5\n", r"memory.ceiling_ram_fraction = 1.5 is invalid; expected a number > 0 and <= 1"),
    ("[memory]\non_exceed = 'swap'\n", r"memory.on_exceed = 'swap' is invalid; expected one of 'shrink', 'refuse'"),
    ("strict = 'yes'\n", r"strict = 'yes' is invalid; expected true or false"),
    ("[llm\n", r"is not valid TOML"),
    ("extends = 'gpu-fast'\n", r"unknown profile 'gpu-fast'; shipped profiles: cpu, cpu-lowmem, cuda"),
]
# fmt: on


@pytest.mark.parametrize("text, message", INVALID_PROFILES)
def test_invalid_profiles_name_the_file_key_and_allowed_values(tmp_path, text, message):
    path = write(tmp_path / "mine.toml", text)
    with pytest.raises(ProfileError, match=message) as error:
        load_profile(path)
    assert str(path) in str(error.value)


def test_unknown_names_and_missing_files():
    with pytest.raises(
        ProfileError, match=r"unknown profile 'jetson-nano'; shipped profiles: .*jetson-orin-nano.*'auto'"
    ):
        load_profile("jetson-nano")
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile("/nonexistent/robot.toml")


def test_a_user_profile_extends_a_shipped_one_key_by_key(tmp_path):
    path = write(tmp_path / "robot.toml", 'extends = "jetson-orin-nano"\nstrict = true\n[llm]\nn_ctx = 1024\n[budget]\nmax_image_tokens = 128\n')  # fmt: skip
    profile = load_profile(path)
    base = load_profile("jetson-orin-nano")
    assert profile.name == str(path) and profile.strict
    assert profile.llm == replace(base.llm, n_ctx=1024)
    assert profile.vision == base.vision
    assert profile.budget == BudgetLimits(max_image_tokens=128, image_budget=1024)  # the table merged, not replaced
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ProfileError, match="levels deep"):
        load_profile(tmp_path / "a.toml")


# ------------------------------------------------------------------------------------------------ auto-detection


def fake_machine(root: Path, *, model: str | None = None, tegra: str | None = None, ram_gib: float = 16,
                 cores: int = 4, threads_per_core: int = 1) -> Path:  # fmt: skip
    write(root / "proc/meminfo", f"MemTotal:       {int(ram_gib * 2**20)} kB\nMemFree:         1000 kB\n")
    if model is not None:
        (root / "proc/device-tree").mkdir(parents=True)
        (root / "proc/device-tree/model").write_bytes(model.encode() + b"\0")
    if tegra is not None:
        write(root / "etc/nv_tegra_release", tegra)
    for core in range(cores):
        siblings = ",".join(str(core * threads_per_core + t) for t in range(threads_per_core))
        for t in range(threads_per_core):
            write(root / f"sys/devices/system/cpu/cpu{core * threads_per_core + t}/topology/core_cpus_list", siblings)
    return root


# fmt: off
MACHINES = [
    ({"model": "NVIDIA Jetson Orin Nano Developer Kit", "ram_gib": 7.4, "cores": 6}, ALL_PROVIDERS, True, "jetson-orin-nano", "Jetson Orin Nano Developer Kit"),
    ({"model": "NVIDIA Jetson Orin NX Engine Board", "ram_gib": 15.3, "cores": 8}, ("CPUExecutionProvider",), False, "jetson-orin-nx", "Orin NX"),
    ({"model": "Jetson AGX Orin Developer Kit", "ram_gib": 61, "cores": 12}, ALL_PROVIDERS, True, "jetson-agx-orin", "AGX Orin"),
    ({"tegra": "# R36 (release), REVISION: 3.0, GCID: 36923193", "ram_gib": 15}, ALL_PROVIDERS, True, "jetson-orin-nx", "not a known Orin.*15.0 GiB"),
    ({"ram_gib": 64}, ("CUDAExecutionProvider", "CPUExecutionProvider"), False, "cuda", "onnxruntime has CUDAExecutionProvider"),
    ({"ram_gib": 64}, ("CPUExecutionProvider",), True, "cuda", "llama.cpp can offload"),
    ({"ram_gib": 7.6}, ("CPUExecutionProvider",), False, "cpu-lowmem", r"7.6 GiB of RAM \(under 12 GiB\)"),
    ({"ram_gib": 31}, ("CPUExecutionProvider",), False, "cpu", "no GPU support"),
    ({"model": "Raspberry Pi 5 Model B Rev 1.0", "ram_gib": 8}, ("CPUExecutionProvider",), False, "cpu-lowmem", "no GPU"),
]
# fmt: on


@pytest.mark.parametrize("machine, providers, offload, expected, reason", MACHINES)
def test_auto_detection_on_faked_machines(tmp_path, monkeypatch, machine, providers, offload, expected, reason):
    monkeypatch.delenv("EDGEVLM_PROFILE", raising=False)  # conftest pins the test runs' profile
    root = fake_machine(tmp_path, **machine)
    host = probe_host(root, onnxruntime_providers=providers, llama_gpu_offload=offload)
    name, why = choose_profile(host)
    assert name == expected
    assert re.search(reason, why), why
    settings = resolve_settings("auto", None, host=host)
    assert settings.profile.name == expected and settings.reason == f"auto: {why}"


def test_physical_cores_come_from_the_cpu_topology(tmp_path):
    host = probe_host(fake_machine(tmp_path, cores=4, threads_per_core=2), onnxruntime_providers=(), llama_gpu_offload=False)  # fmt: skip
    assert (host.physical_cores, host.logical_cpus) == (4, 8)
    assert host.ram_bytes == 16 * GIB
    real = probe_host()  # this machine: at least one core, and onnxruntime always has the CPU provider
    assert 1 <= real.physical_cores <= real.logical_cpus and "CPUExecutionProvider" in real.onnxruntime_providers


# ------------------------------------------------------------------------------------------------ exact settings

# fmt: off
CUDA_OPTIONS = {"device_id": "0", "arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "HEURISTIC"}
TRT_OPTIONS = {
    "device_id": "0", "trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
    "trt_engine_cache_path": str(Path("~/.cache/edgevlm/tensorrt").expanduser()), "trt_timing_cache_enable": "True",
    "trt_timing_cache_path": str(Path("~/.cache/edgevlm/tensorrt").expanduser()),
}
EXPECTED = {  # on GPU_HOST (6 physical cores), without a bundle
    "cpu": (
        [("CPUExecutionProvider", {})], "int8",
        LlamaSettings(n_ctx=4096, n_batch=512, n_ubatch=512, n_threads=6, n_threads_batch=6, n_gpu_layers=0, flash_attn=None, kv_cache_type="f16", mmap=None, mlock=False, adapt_threads=True),
        BudgetLimits(max_image_tokens=256),
    ),
    "cpu-lowmem": (
        [("CPUExecutionProvider", {})], "int8",
        LlamaSettings(n_ctx=2048, n_batch=256, n_ubatch=256, n_threads=6, n_threads_batch=6, n_gpu_layers=0, flash_attn=True, kv_cache_type="q8_0", mmap=None, mlock=False, adapt_threads=True),
        BudgetLimits(max_image_tokens=512, image_budget=1024, max_tiles=4),
    ),
    "cuda": (
        [("CUDAExecutionProvider", CUDA_OPTIONS), ("CPUExecutionProvider", {})], "fp16",
        LlamaSettings(n_ctx=8192, n_batch=2048, n_ubatch=512, n_threads=6, n_threads_batch=6, n_gpu_layers=-1, flash_attn=True, kv_cache_type="f16", mmap=False, mlock=False),
        BudgetLimits(),
    ),
    "jetson-orin-nano": (
        [("TensorrtExecutionProvider", TRT_OPTIONS), ("CUDAExecutionProvider", {**CUDA_OPTIONS, "gpu_mem_limit": str(int(1.5 * GIB))}), ("CPUExecutionProvider", {})], "fp16",
        LlamaSettings(n_ctx=2048, n_batch=512, n_ubatch=256, n_threads=6, n_threads_batch=6, n_gpu_layers=-1, flash_attn=True, kv_cache_type="q8_0", mmap=False, mlock=False),
        BudgetLimits(max_image_tokens=512, image_budget=1024),
    ),
    "jetson-orin-nx": (
        [("TensorrtExecutionProvider", TRT_OPTIONS), ("CUDAExecutionProvider", {**CUDA_OPTIONS, "gpu_mem_limit": str(3 * GIB)}), ("CPUExecutionProvider", {})], "fp16",
        LlamaSettings(n_ctx=4096, n_batch=512, n_ubatch=512, n_threads=6, n_threads_batch=6, n_gpu_layers=-1, flash_attn=True, kv_cache_type="f16", mmap=False, mlock=False),
        BudgetLimits(max_image_tokens=1024),
    ),
    "jetson-agx-orin": (
        [("TensorrtExecutionProvider", TRT_OPTIONS), ("CUDAExecutionProvider", CUDA_OPTIONS), ("CPUExecutionProvider", {})], "fp16",
        LlamaSettings(n_ctx=8192, n_batch=2048, n_ubatch=512, n_threads=6, n_threads_batch=6, n_gpu_layers=-1, flash_attn=True, kv_cache_type="f16", mmap=False, mlock=False),
        BudgetLimits(max_image_tokens=2048),
    ),
}
# fmt: on


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_settings_of_each_shipped_profile(name):
    providers, precision, llama, limits = EXPECTED[name]
    settings = resolve_settings(name, None, host=GPU_HOST)
    assert [(p, dict(o)) for p, o in settings.providers] == providers
    assert settings.vision_dtype == precision
    assert settings.llama == llama
    assert settings.limits == limits
    assert (settings.intra_op_threads, settings.allow_spinning) == (6, False)
    assert settings.notes == ()


def test_tensorrt_shapes_cover_the_image_token_range_of_the_bundle(tiny_bundles):
    bundle = Bundle.open(tiny_bundles["Q8_0"])
    settings = resolve_settings("jetson-orin-nano", bundle, host=GPU_HOST)
    trt = dict(settings.providers[0][1])
    # the tiny model allows 4..1024 tokens per image (its min/max pixels); the profile caps at 512 and tunes for 256;
    # a token is 2x2 patches of 3*2*14*14 = 1176 values
    assert trt["trt_profile_min_shapes"] == "pixel_patches:16x1176,patch_positions:16x2"
    assert trt["trt_profile_opt_shapes"] == "pixel_patches:1024x1176,patch_positions:1024x2"
    assert trt["trt_profile_max_shapes"] == "pixel_patches:2048x1176,patch_positions:2048x2"
    assert settings.vision_dtype == "fp32"  # the bundle has fp32 and int8; the profile prefers fp16, then fp32
    narrow = resolve_settings("jetson-orin-nano", bundle, Overrides(limits=BudgetLimits(64, 32)), host=GPU_HOST)
    assert dict(narrow.providers[0][1])["trt_profile_max_shapes"] == "pixel_patches:256x1176,patch_positions:256x2"
    assert dict(narrow.providers[0][1])["trt_profile_min_shapes"] == "pixel_patches:128x1176,patch_positions:128x2"


def test_tensorrt_shapes_of_a_tiling_model_are_one_views(tiny_smolvlm_bundles):
    """A tiling model's graph takes one fixed-size view per call, whatever the image's grid or token limits."""
    bundle = Bundle.open(tiny_smolvlm_bundles["Q8_0"])
    spec = bundle.manifest.preprocessing
    trt = dict(resolve_settings("jetson-orin-nano", bundle, host=GPU_HOST).providers[0][1])
    view = f"pixel_patches:{spec.crop_patches}x{spec.patch_dim}"
    assert trt["trt_profile_min_shapes"] == trt["trt_profile_opt_shapes"] == trt["trt_profile_max_shapes"] == view


def test_missing_cuda_falls_back_with_one_warning_or_fails_when_strict(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="edgevlm.profiles"):
        settings = resolve_settings("cuda", None, host=CPU_HOST)
    assert settings.providers == (("CPUExecutionProvider", {}),)
    assert settings.llama.n_gpu_layers == 0
    assert settings.vision_dtype == "fp32"  # fp16 moves last when the graph runs on the CPU
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 == len(settings.notes)
    assert "asks for CUDAExecutionProvider, which this onnxruntime lacks" in warnings[0] and "onnxruntime-gpu" in warnings[0]  # fmt: skip
    assert "built without GPU support" in warnings[1]

    strict = write(tmp_path / "strict.toml", 'extends = "cuda"\nstrict = true\n')
    with pytest.raises(ProfileError, match=r"asks for CUDAExecutionProvider.*is strict"):
        resolve_settings(strict, None, host=CPU_HOST)


def test_explicit_arguments_beat_the_profile(tmp_path):
    overrides = Overrides(n_ctx=1000, n_threads=16, n_gpu_layers=3, vision_dtype="fp32", providers=("CPUExecutionProvider",))  # fmt: skip
    settings = resolve_settings("jetson-orin-nano", None, overrides, host=GPU_HOST)
    assert settings.providers == ("CPUExecutionProvider",)
    assert settings.vision_dtype == "fp32"
    assert (settings.llama.n_ctx, settings.llama.n_gpu_layers) == (1000, 3)
    assert (settings.llama.n_threads, settings.llama.n_threads_batch, settings.intra_op_threads) == (16, 16, 16)
    # a profile's own thread count never exceeds the CPUs this process has
    many = write(
        tmp_path / "many.toml", "[vision]\nintra_op_threads = 64\n[llm]\nn_threads = 64\nn_threads_batch = 3\n"
    )
    settings = resolve_settings(many, None, host=GPU_HOST)
    assert (settings.intra_op_threads, settings.llama.n_threads, settings.llama.n_threads_batch) == (12, 12, 3)


def test_load_mode_maps_mmap_and_mlock_onto_real_llama_cpp_params():
    import llama_cpp

    cases = {(None, False): llama_cpp.LLAMA_LOAD_MODE_AUTO, (True, False): llama_cpp.LLAMA_LOAD_MODE_MMAP,
             (False, False): llama_cpp.LLAMA_LOAD_MODE_NONE, (True, True): llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK,
             (False, True): llama_cpp.LLAMA_LOAD_MODE_MLOCK}  # fmt: skip
    for (mmap, mlock), mode in cases.items():
        params = llama_cpp.llama_model_default_params()
        _set_load_mode(params, mmap, mlock)
        assert params.load_mode == mode, (mmap, mlock)


# ------------------------------------------------------------------------------------------------ memory


def test_kv_cache_estimate_matches_the_model_config(tiny_bundles, tiny_qwen2vl_dir):
    config = json.loads((tiny_qwen2vl_dir / "config.json").read_text())
    text = config.get("text_config", config)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    expected = text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * 2
    bundle = Bundle.open(tiny_bundles["Q8_0"])
    assert kv_values_per_token(bundle.file(bundle.manifest.llm.file), bundle.manifest.llm.arch) == expected
    assert kv_cache_bytes(expected, 1000, "f16") == 1024 * expected * 2  # rounded up to 256 cells, like llama.cpp
    assert kv_cache_bytes(expected, 1024, "q8_0") == 1024 * expected * 34 // 32


@pytest.mark.parametrize("kv_cache_type", ["f16", "q8_0"])
def test_kv_cache_estimate_equals_what_llama_cpp_allocates(tiny_bundles, caplog, kv_cache_type):
    from edgevlm.runtimes.llm import LlamaLM

    bundle = Bundle.open(tiny_bundles["Q8_0"])
    gguf = bundle.file(bundle.manifest.llm.file)
    settings = LlamaSettings(n_ctx=1000, n_threads=1, kv_cache_type=kv_cache_type, flash_attn=True)
    with caplog.at_level(logging.INFO, logger="edgevlm.llama_cpp"):
        LlamaLM(gguf, settings).close()
    reported = re.search(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells", caplog.text)
    assert reported, "llama.cpp did not log its KV cache size"
    estimate = kv_cache_bytes(kv_values_per_token(gguf, bundle.manifest.llm.arch), 1000, kv_cache_type)
    assert int(reported.group(2)) == 1024 and abs(estimate / 2**20 - float(reported.group(1))) < 0.01


@pytest.mark.parametrize(("mmap", "repack", "mapped"), [(None, False, True), (None, True, False), (True, True, True), (False, False, False)])  # fmt: skip
def test_the_gguf_is_read_where_llama_cpp_repacks_it(tiny_bundles, tmp_path, mmap, repack, mapped):
    """Repacked weights are a copy: the mapped pages they were read from would stay resident beside it (0.57 GiB more
    for a 2B Q4_K_M with llama.cpp's AVX2 kernels), so unless the profile says otherwise the file is read there."""
    from edgevlm.runtimes.llm import LlamaLM

    bundle = Bundle.open(tiny_bundles["F32"])
    gguf = tmp_path / "llm.gguf"  # a name of its own: no other test's model maps this path
    os.link(bundle.file(bundle.manifest.llm.file), gguf)
    llm = LlamaLM(gguf, LlamaSettings(n_ctx=256, n_threads=1, mmap=mmap, repack_weights=repack))
    try:
        assert llm.mapped is mapped
        assert (str(gguf) in Path("/proc/self/maps").read_text()) is mapped
    finally:
        llm.close()


def test_memory_ceiling_shrinks_the_profile_or_refuses(tiny_bundles, tmp_path, caplog):
    bundle = Bundle.open(tiny_bundles["Q8_0"])
    cpu_1024 = 'extends = "cpu"\n[budget]\nmax_image_tokens = 1024\n'
    roomy = write(tmp_path / "roomy.toml", cpu_1024 + '[memory]\nceiling_gib = 100\n')
    full = resolve_settings(roomy, bundle, host=CPU_HOST).memory
    assert full.vision_file == "vision-int8.onnx" and full.max_image_tokens == 1024 and full.n_ctx == 4096
    assert full.total_bytes == full.llm_file_bytes + full.vision_file_bytes + full.kv_cache_bytes + full.vision_activation_bytes  # fmt: skip
    assert full.llm_file_bytes == (tiny_bundles["Q8_0"] / "llm-Q8_0.gguf").stat().st_size

    ceiling_gib = (full.total_bytes - full.vision_activation_bytes * 0.9) / GIB  # the images must shrink
    tight = write(tmp_path / "tight.toml", cpu_1024 + f'[memory]\nceiling_gib = {ceiling_gib}\n')
    with caplog.at_level(logging.WARNING, logger="edgevlm.profiles"):
        settings = resolve_settings(tight, bundle, host=CPU_HOST)
    assert settings.memory.total_bytes <= ceiling_gib * GIB
    assert settings.limits.max_image_tokens < 1024 and "shrank" in settings.notes[0]
    assert "max_image_tokens 1024 ->" in caplog.text

    refuse = write(tmp_path / "refuse.toml", cpu_1024 + f'[memory]\nceiling_gib = {ceiling_gib}\non_exceed = "refuse"\n')  # fmt: skip
    with pytest.raises(ProfileError, match=r"estimated memory \(llm-Q8_0.gguf .* GiB\) is above profile .* ceiling"):
        resolve_settings(refuse, bundle, host=CPU_HOST)
    explicit = Overrides(limits=BudgetLimits(max_image_tokens=1024))
    with pytest.raises(ProfileError, match=r"given explicitly: max_image_tokens"):
        resolve_settings(tight, bundle, explicit, host=CPU_HOST)

    # TensorRT's shape profile follows the shrunk image size
    nano = write(tmp_path / "nano.toml", 'extends = "jetson-orin-nano"\n[memory]\nceiling_gib = 100\n')
    full = resolve_settings(nano, bundle, host=GPU_HOST).memory
    ceiling_gib = (full.total_bytes - full.vision_activation_bytes * 0.9) / GIB
    nano = write(tmp_path / "nano.toml", f'extends = "jetson-orin-nano"\n[memory]\nceiling_gib = {ceiling_gib}\n')
    settings = resolve_settings(nano, bundle, host=GPU_HOST)
    patches = settings.limits.max_image_tokens * 4
    assert patches < 512 * 4
    assert (
        settings.providers[0][1]["trt_profile_max_shapes"]
        == f"pixel_patches:{patches}x1176,patch_positions:{patches}x2"
    )


# ------------------------------------------------------------------------------------------------ real bundles


def test_a_bundle_runs_with_the_cpu_profile_and_with_a_user_profile(tiny_bundles, tmp_path):
    from conftest import random_image

    host = probe_host()
    vlm = edgevlm.load(tiny_bundles["Q8_0"], profile="cpu")
    try:
        assert vlm.profile.name == "cpu" and vlm.vision_dtype == "int8"  # the CPU profile prefers the int8 graph
        assert vlm.vision.providers == ["CPUExecutionProvider"]
        assert vlm.vision.vision_session.get_session_options().intra_op_num_threads == host.physical_cores
        assert vlm.llm.settings.n_threads == host.physical_cores and vlm.llm.n_ctx == 4096
        steps = list(vlm.generate("What is it?", images=[random_image(200, 300)], max_tokens=3))
        assert steps[-1].finish_reason in ("stop", "length")
    finally:
        vlm.close()

    mine = write(tmp_path / "laptop.toml", 'extends = "cpu-lowmem"\n[vision]\nprecision = ["fp32"]\n'
                 '[llm]\nn_ctx = 512\nn_threads = 1\n[budget]\nmax_image_tokens = 64\n')  # fmt: skip
    vlm = edgevlm.load(tiny_bundles["Q8_0"], profile=mine)
    try:
        assert vlm.vision_dtype == "fp32" and vlm.llm.n_ctx == 512 and vlm.llm.settings.kv_cache_type == "q8_0"
        assert vlm.llm.settings.n_threads == 1
        assert vlm.resolve_limits().describe("max_image_tokens") == "max_image_tokens=64 (profile)"
        steps = list(vlm.generate("What is it?", images=[random_image(600, 800)], max_tokens=3))
        assert 0 < steps[-1].timings.n_image_tokens <= 64  # quantized KV cache with flash attention really decodes
    finally:
        vlm.close()


# ------------------------------------------------------------------------------------------------ CLI


def edgevlm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgevlm.cli", *args], capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def test_cli_lists_profiles_and_shows_one(tiny_bundles, tmp_path):
    result = edgevlm_cli("profiles")
    assert result.returncode == 0, result.stderr
    for name in shipped_profiles():
        assert name in result.stdout
    assert "auto picks cpu: EDGEVLM_PROFILE=cpu" in result.stdout  # conftest pins it
    result = subprocess.run([sys.executable, "-m", "edgevlm.cli", "profiles"], capture_output=True, text=True,
                            timeout=300, check=False, env={k: v for k, v in os.environ.items() if k != "EDGEVLM_PROFILE"})  # fmt: skip
    auto_name, reason = choose_profile(probe_host())
    assert f"auto picks {auto_name}: {reason}" in result.stdout

    result = edgevlm_cli("profiles", "show", "jetson-orin-nano", "--bundle", str(tiny_bundles["Q8_0"]), "--assume-gpu")
    assert result.returncode == 0, result.stderr
    assert "trt_profile_max_shapes = pixel_patches:2048x1176,patch_positions:2048x2" in result.stdout
    assert "n_gpu_layers -1 (all)" in result.stdout and "KV cache q8_0" in result.stdout
    assert "max_image_tokens=512, image_budget=1024" in result.stdout and "estimate llm-Q8_0.gguf" in result.stdout

    bad = write(tmp_path / "bad.toml", "[llm]\nn_ctx = 'big'\n")
    result = edgevlm_cli("run", str(tiny_bundles["F32"]), "-p", "hi", "--profile", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}: llm.n_ctx = 'big' is invalid; expected a whole number >= 256" in result.stderr


def test_cli_plan_uses_the_profile(tiny_bundles, tmp_path):
    from conftest import random_image

    image = tmp_path / "photo.png"
    random_image(1200, 1600).save(image)
    result = edgevlm_cli("plan", str(tiny_bundles["Q8_0"]), "--image", str(image), "--profile", "cpu-lowmem")
    assert result.returncode == 0, result.stderr
    assert "max_image_tokens=512 (profile)" in result.stdout and "image_budget=1024 (profile)" in result.stdout
    assert "profile: cpu-lowmem (asked for); int8 vision graph, n_ctx 2048" in result.stdout


def test_export_ships_the_precisions_the_profiles_load(tiny_qwen2vl_dir, tmp_path):
    out = tmp_path / "bundle"
    result = edgevlm_cli("export", str(tiny_qwen2vl_dir), "-o", str(out), "--f16", "--profile", "jetson-orin-nano", "--profile", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    vision = json.loads((out / "edgevlm.json").read_text())["vision"]
    assert sorted(vision["variants"]) == ["fp16", "int8"] and vision["default"] == "fp16"
    assert not (out / "vision.onnx").exists()  # fp32 is only the intermediate the variants derive from
    assert resolve_settings("cpu", Bundle.open(out), host=CPU_HOST).vision_dtype == "int8"
    assert resolve_settings("jetson-orin-nano", Bundle.open(out), host=GPU_HOST).vision_dtype == "fp16"


@pytest.mark.skipif("CUDAExecutionProvider" in probe_host().onnxruntime_providers, reason="CUDA starts here")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_a_provider_onnxruntime_cannot_start_is_reported(tiny_bundles, tmp_path, caplog):
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # explicit: used as given, no profile fallback
    with caplog.at_level(logging.WARNING, logger="edgevlm.runtimes.pipeline"):
        vlm = edgevlm.load(tiny_bundles["F32"], profile="cpu", providers=providers, n_ctx=256)
    vlm.close()
    assert vlm.vision.providers == ["CPUExecutionProvider"]
    assert "onnxruntime could not start CUDAExecutionProvider" in caplog.text
    strict = write(tmp_path / "strict.toml", 'extends = "cpu"\nstrict = true\n')
    with pytest.raises(ProfileError, match=r"could not start CUDAExecutionProvider.*is strict"):
        edgevlm.load(tiny_bundles["F32"], profile=strict, providers=providers, n_ctx=256)


def test_host_reads_the_cpu_model_and_the_isa_flags_that_pick_kernels(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n"
        "flags\t\t: fpu sse2 avx avx2 fma bmi2\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n"
    )
    host = probe_host(tmp_path, onnxruntime_providers=("CPUExecutionProvider",), llama_gpu_offload=False)
    assert (host.cpu_model, host.isa) == ("AMD EPYC 7B13 64-Core Processor", "avx2 fma")  # f16c is not listed here
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n")
    arm = probe_host(tmp_path, onnxruntime_providers=("CPUExecutionProvider",), llama_gpu_offload=False)
    assert (arm.cpu_model, arm.isa) == (None, "asimd asimddp")


def test_cores_taken_by_others_reads_the_running_tasks_less_our_own_and_idle_siblings(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/loadavg").write_text("1.52 0.98 0.61 3/412 12345\n")
    assert cores_taken_by_others(tmp_path) == 2  # the caller is one of the 3
    (tmp_path / "proc/loadavg").write_text("0.00 0.01 0.05 1/97 12\n")
    assert cores_taken_by_others(tmp_path) == 0
    # this process's own running threads (llama.cpp's, still polling after a step) are not other processes' tasks
    (tmp_path / "proc/loadavg").write_text("2.10 1.00 0.50 4/97 12\n")
    for tid, state in ((100, "R"), (101, "R"), (102, "S")):
        (tmp_path / f"proc/self/task/{tid}").mkdir(parents=True)
        (tmp_path / f"proc/self/task/{tid}/stat").write_text(f"{tid} (python3 (x) y) {state} 1 2 3\n")
    assert cores_taken_by_others(tmp_path) == 2
    # two cores with two SMT siblings each: the first two other tasks run on the idle siblings
    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):
        (tmp_path / f"sys/devices/system/cpu/cpu{cpu}/topology").mkdir(parents=True)
        (tmp_path / f"sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list").write_text(siblings)
    (tmp_path / "proc/loadavg").write_text("2.10 1.00 0.50 5/97 12\n")
    assert cores_taken_by_others(tmp_path) == 1  # 5 running - 2 of ours - 2 idle siblings
    assert cores_taken_by_others(tmp_path / "nowhere") == 0  # no /proc: nothing known to be busy


@pytest.mark.parametrize(("others", "explicit", "expected"), [(0, None, 2), (1, None, 1), (5, None, 1), (1, 2, 2)])
def test_requests_leave_busy_cores_to_other_processes(tiny_bundles, monkeypatch, others, explicit, expected):
    """The cpu profile's llama.cpp threads, per request: its 2 threads minus the cores other processes are running on
    at the request's start (at least 1); a thread count given to load() is used as given."""
    from edgevlm.runtimes import pipeline

    monkeypatch.setattr(pipeline, "cores_taken_by_others", lambda: others)
    host = replace(CPU_HOST, physical_cores=2, logical_cpus=2)
    monkeypatch.setattr("edgevlm.profiles.resolve.probe_host", lambda: host)
    with edgevlm.load(tiny_bundles["F32"], profile="cpu", n_threads=explicit, n_ctx=256) as vlm:
        steps = list(vlm.generate("hi", max_tokens=2))
        assert steps[-1].timings.n_threads == vlm.llm.n_threads == expected
