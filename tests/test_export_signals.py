"""Interrupting `edgevlm export` as a user or a supervisor does (Ctrl-C, SIGTERM), at every stage, in real processes:
a non-zero exit within a bounded time and no partial folder (with its staging files) left behind; and the next
export removes what a killed one left."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# stage -> a line `edgevlm -v export` logs on stderr once that stage runs
STAGE_MARKERS = {
    "loading": "edgevlm.progress: loading ",
    "vision": "edgevlm.progress: exporting the vision encoder",
    "gguf": "edgevlm.progress: writing the language model as F16 GGUF",
    # llama.cpp's own log from inside `llama_model_quantize` (the C call), as it starts on the 39M-value token table
    "quantization": "converting to q6_K",
}
FINISH_WITHIN_S = 30  # after the signal; an export of the tiny model takes about 15 s in all


class Export:
    """`edgevlm -v export` in a child process, its stderr read line by line in a thread."""

    def __init__(self, model_dir: Path, out: Path):
        command = [sys.executable, "-m", "edgevlm.cli", "-v", "export", str(model_dir), "-o", str(out)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line)

    def wait_for(self, marker: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                assert self.process.poll() is None, "export ended before the stage:\n" + "".join(self.log[-20:])
                continue
            self.log.append(line)
            if marker in line:
                return
        pytest.fail(f"no {marker!r} within {timeout} s")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def partial_folders(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text` (an orphaned quantizer would)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(sys.platform != "linux", reason="signals and /proc as on Linux")
@pytest.mark.parametrize(
    "signum,stage",
    [
        (signal.SIGINT, "quantization"),
        (signal.SIGTERM, "quantization"),
        (signal.SIGTERM, "loading"),
        (signal.SIGTERM, "vision"),
        (signal.SIGINT, "gguf"),
        (signal.SIGTERM, "gguf"),
    ],
)
def test_interrupted_export_exits_nonzero_and_leaves_nothing(signum, stage, tiny_qwen2vl_dir, tmp_path):
    out = tmp_path / "bundle"
    export = Export(tiny_qwen2vl_dir, out)
    try:
        export.wait_for(STAGE_MARKERS[stage])
        if stage == "quantization":  # the multi-GB staging file of a real model sits in the partial folder now
            (partial,) = partial_folders(out)
            assert (partial / "llm-F16.gguf.staging").is_file()
        export.process.send_signal(signum)
        returncode = export.process.wait(timeout=FINISH_WITHIN_S)
    finally:
        export.kill()
    assert returncode == 128 + signum, "".join(export.log[-20:])
    assert partial_folders(out) == [] and not out.exists()
    assert list(tmp_path.iterdir()) == []
    assert processes_mentioning(str(out)) == []  # the quantizer child did not outlive the export


def _start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


@pytest.mark.skipif(sys.platform != "linux", reason="process start times from /proc")
def test_next_export_removes_partial_folders_of_dead_exports_only(tiny_qwen2vl_dir, tmp_path):
    out = tmp_path / "bundle"
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        folders = {
            "dead": tmp_path / f".bundle.partial-{finished.pid}-0-abc123",  # its process has exited
            # a live pid whose start time is not the recorded one: the pid was reused after the export died
            "reused": tmp_path / f".bundle.partial-{running.pid}-{_start_ticks(running.pid) - 1}-def456",
            "live": tmp_path / f".bundle.partial-{running.pid}-{_start_ticks(running.pid)}-ghi789",
            "unknown": tmp_path / ".bundle.partial-jkl012",  # older edgevlm: owner not recorded
            "other": tmp_path / f".other.partial-{finished.pid}-0-mno345",  # another output's
        }
        for folder in folders.values():
            folder.mkdir()
            (folder / "llm-F16.gguf.staging").write_bytes(b"\0" * 1024)
        result = subprocess.run([sys.executable, "-m", "edgevlm.cli", "export", str(tiny_qwen2vl_dir), "-o", str(out), "--f32"],
                                check=False, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert (out / "edgevlm.json").is_file()
        assert not folders["dead"].exists() and not folders["reused"].exists()
        assert folders["live"].is_dir() and folders["unknown"].is_dir() and folders["other"].is_dir()
        assert "cannot be told" in result.stderr and str(folders["unknown"]) in result.stderr
    finally:
        running.kill()
        running.wait()
