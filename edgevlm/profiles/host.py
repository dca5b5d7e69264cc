"""What this machine is, and which shipped profile `auto` picks for it (and why).

Everything read from the system goes through `probe_host(root=...)` with the GPU checks injectable, so tests fake a
Jetson or a CUDA desktop with a folder of files and a list of provider names.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
LOWMEM_BELOW_BYTES = 12 * GIB  # `auto` picks cpu-lowmem under this much RAM
# /proc/device-tree/model substrings (lower case) -> profile; NVIDIA's names, e.g. "NVIDIA Jetson Orin Nano Developer Kit"
JETSON_MODELS = (("orin nano", "jetson-orin-nano"), ("orin nx", "jetson-orin-nx"), ("agx orin", "jetson-agx-orin"))
# The /proc/cpuinfo flags that decide which int8 and llama.cpp kernels run: x86 vector widths and int8 dot products
# (VNNI, AMX), ARM's NEON (asimd, or neon on 32-bit), its dot product (asimddp), int8 matrix multiply (i8mm) and SVE
ISA_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
    "amx_bf16", "neon", "asimd", "asimddp", "i8mm", "sve",
)  # fmt: skip


@dataclass(frozen=True)
class HostInfo:
    """The facts auto-detection and thread counts use."""

    device_model: str | None  # /proc/device-tree/model (ARM boards)
    tegra_release: str | None  # first line of /etc/nv_tegra_release (Jetson Linux)
    onnxruntime_providers: tuple[str, ...]
    llama_gpu_offload: bool
    ram_bytes: int | None  # MemTotal
    physical_cores: int  # of the CPUs this process may run on
    logical_cpus: int
    cpu_model: str | None = None  # /proc/cpuinfo "model name"
    cpu_flags: frozenset[str] = frozenset()  # the `ISA_FLAGS` /proc/cpuinfo lists

    @property
    def is_jetson(self) -> bool:
        return self.tegra_release is not None or "jetson" in (self.device_model or "").lower()

    @property
    def isa(self) -> str:
        """The instruction sets that matter for the kernels, e.g. "avx2 fma avx512f avx512_vnni amx_int8"."""
        return " ".join(flag for flag in ISA_FLAGS if flag in self.cpu_flags) or "unknown"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace").replace("\0", "").strip() or None
    except OSError:
        return None


def _ram_bytes(meminfo: str | None) -> int | None:
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo or "", re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _cpu_identity(cpuinfo: str | None) -> tuple[str | None, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo's first processor: x86 "model name"/"flags", ARM "Features"."""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo or "", re.MULTILINE)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", cpuinfo or "", re.MULTILINE)
    return (model.group(1).strip() if model else None), frozenset(flags.group(1).split() if flags else ())


def _affinity(root: Path) -> set[int] | None:
    """The CPUs this process may run on when `root` is this machine's (tests pass a fake tree: None)."""
    real = root.resolve() == Path("/").resolve()
    return set(os.sched_getaffinity(0)) if real and hasattr(os, "sched_getaffinity") else None


def _cpu_topology(root: Path, cpus: set[int] | None) -> tuple[int, int]:
    """(physical cores, logical CPUs) among `cpus` (None: every CPU under root/sys), from each CPU's sibling list."""
    cpu_dir = root / "sys/devices/system/cpu"
    if cpus is None:
        cpus = {int(p.name[3:]) for p in cpu_dir.glob("cpu[0-9]*") if p.name[3:].isdigit()}
    cores = set()
    for cpu in cpus:
        topology = cpu_dir / f"cpu{cpu}/topology"
        siblings = _read_text(topology / "core_cpus_list") or _read_text(topology / "thread_siblings_list")
        cores.add(siblings or f"cpu{cpu}")  # no topology (some containers): count the CPU as a core
    logical = max(1, len(cpus))
    return max(1, min(len(cores), logical)), logical


def _onnxruntime_providers() -> tuple[str, ...]:
    import onnxruntime as ort

    return tuple(ort.get_available_providers())


def _llama_gpu_offload() -> bool:
    from ..llama_backend import supports_gpu_offload  # routes the log of the GPU backends it loads

    return supports_gpu_offload()


def probe_host(
    root: str | os.PathLike = "/",
    *,
    onnxruntime_providers: tuple[str, ...] | None = None,
    llama_gpu_offload: bool | None = None,
) -> HostInfo:
    """Read this machine's facts under `root` (tests pass a fake tree); GPU checks ask onnxruntime and llama.cpp
    unless given."""
    root = Path(root)
    physical, logical = _cpu_topology(root, _affinity(root))
    tegra_release = _read_text(root / "etc/nv_tegra_release")
    cpu_model, cpu_flags = _cpu_identity(_read_text(root / "proc/cpuinfo"))
    return HostInfo(
        device_model=_read_text(root / "proc/device-tree/model"),
        tegra_release=tegra_release.splitlines()[0] if tegra_release else None,
        onnxruntime_providers=tuple(
            _onnxruntime_providers() if onnxruntime_providers is None else onnxruntime_providers
        ),
        llama_gpu_offload=_llama_gpu_offload() if llama_gpu_offload is None else llama_gpu_offload,
        ram_bytes=_ram_bytes(_read_text(root / "proc/meminfo")),
        physical_cores=physical,
        logical_cpus=logical,
        cpu_model=cpu_model,
        cpu_flags=cpu_flags & set(ISA_FLAGS),
    )


def cores_taken_by_others(root: str | os.PathLike = "/") -> int:
    """Physical cores of this process's CPUs that other processes' tasks are running on right now (0 where unknown).

    /proc/loadavg's instantaneous count of running tasks, less this process's own running threads (llama.cpp's still
    polling after a step, the thread asking; read before and after, the larger kept), least of three reads so a task
    that only passes through is not counted; idle SMT siblings take other tasks first. The count is machine-wide, so
    a process pinned to some of the CPUs (taskset, cpuset) cannot tell whether its own are busy: 0 there.
    """
    root = Path(root)
    affinity = _affinity(root)
    if affinity is not None and len(affinity) < (os.cpu_count() or len(affinity)):
        return 0
    own_before = _own_running_threads(root)
    running = []
    for _ in range(3):
        match = re.match(r"\S+ \S+ \S+ (\d+)/", _read_text(root / "proc/loadavg") or "")
        if match is None:
            return 0
        running.append(int(match.group(1)))
    others = min(running) - max(1, own_before, _own_running_threads(root))
    physical, logical = _this_machines_topology(frozenset(affinity)) if affinity else _cpu_topology(root, None)
    return max(0, others - (logical - physical))


@functools.lru_cache(maxsize=4)
def _this_machines_topology(cpus: frozenset[int]) -> tuple[int, int]:
    """(physical cores, logical CPUs) of this machine's `cpus`, read once: a request asks for it every time."""
    return _cpu_topology(Path("/"), set(cpus))


def _own_running_threads(root: Path) -> int:
    """This process's threads in state R (running or runnable), from /proc/self/task/*/stat."""
    states = (_read_text(stat) or "" for stat in (root / "proc/self/task").glob("*/stat"))
    return sum(1 for text in states if text.rpartition(")")[2].split()[:1] == ["R"])


def choose_profile(host: HostInfo) -> tuple[str, str]:
    """The shipped profile `auto` picks for `host`, and why (one sentence)."""
    ram = f"{host.ram_bytes / GIB:.1f} GiB of RAM" if host.ram_bytes else "unknown RAM"
    if host.is_jetson:
        model = host.device_model or "unknown model"
        seen = f"/proc/device-tree/model says {model!r}" + (f", /etc/nv_tegra_release says {host.tegra_release!r}" if host.tegra_release else "")  # fmt: skip
        for needle, name in JETSON_MODELS:
            if needle in model.lower():
                return name, f"a Jetson: {seen}"
        ram_bytes = host.ram_bytes or 0
        name = "jetson-orin-nano" if ram_bytes < LOWMEM_BELOW_BYTES else "jetson-orin-nx" if ram_bytes < 24 * GIB else "jetson-agx-orin"  # fmt: skip
        return name, f"a Jetson that is not a known Orin ({seen}): picked by its {ram}"
    cuda = "CUDAExecutionProvider" in host.onnxruntime_providers
    if cuda or host.llama_gpu_offload:
        found = [what for what, ok in (("onnxruntime has CUDAExecutionProvider", cuda), ("llama.cpp can offload layers to a GPU", host.llama_gpu_offload)) if ok]  # fmt: skip
        return "cuda", " and ".join(found)
    if host.ram_bytes is not None and host.ram_bytes < LOWMEM_BELOW_BYTES:
        return "cpu-lowmem", f"no GPU support in onnxruntime or llama.cpp, and {ram} (under {LOWMEM_BELOW_BYTES // GIB} GiB)"  # fmt: skip
    return "cpu", f"no GPU support in onnxruntime or llama.cpp; {ram}"
