"""llama.cpp's quantizer in a child process, so that an export can be interrupted while it runs.

`llama_model_quantize` is one C call that takes minutes on a real model. Inside it Python runs only llama.cpp's log
callback, where a signal handler's KeyboardInterrupt is swallowed by ctypes, and nothing else can stop it. Run in a
child process (in its own session, so a terminal's Ctrl-C does not reach it), the parent waits in Python: Ctrl-C or
SIGTERM reaches it at once, it kills the child (SIGKILL) and unwinds, and the export's `with` blocks remove what was
written. The child also dies with its parent (Linux PR_SET_PDEATHSIG) if the parent is killed outright.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
_CHILD_MAIN = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from edgevlm.exporters.quantize_process import quantize_main; sys.exit(quantize_main(*sys.argv[2:]))"
)


def run_quantizer(src: Path, dst: Path, ftype_name: str, n_threads: int | None) -> str | None:
    """Quantize GGUF `src` to `dst` as llama.cpp's `ftype_name` in a child process; None on success, else the
    reason llama.cpp gave. Any exception while waiting (KeyboardInterrupt included) kills the child first."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ImportError("quantizing needs llama-cpp-python: pip install llama-cpp-python")
    level = logging.getLogger("edgevlm.llama_cpp").getEffectiveLevel()
    arguments = [str(src), str(dst), ftype_name, str(n_threads or 0), str(level), str(os.getpid())]
    # the child imports the edgevlm this process runs: it gets this process's sys.path (as multiprocessing does)
    command = [sys.executable, "-c", _CHILD_MAIN, json.dumps(sys.path), *arguments]
    # its own session: a terminal's Ctrl-C reaches this process only, which decides (and kills the child)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)  # fmt: skip
    try:
        reason, _ = child.communicate()
    except BaseException:
        child.kill()
        child.wait()
        raise
    if child.returncode == 0:
        return None
    return reason.strip() or f"the quantizer process ended with exit status {child.returncode}"


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent was gone before prctl took effect
        os._exit(1)


def quantize_main(src: str, dst: str, ftype_name: str, n_threads: str, level: str, parent_pid: str) -> int:
    """The child side of `run_quantizer`: prints llama.cpp's reason on stdout and returns 1 if it fails."""
    _die_with_parent(int(parent_pid))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("edgevlm.llama_cpp").setLevel(int(level))
    import llama_cpp

    from ..llama_backend import collect_llama_errors  # entering it routes llama.cpp's log to `logging`

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    if int(n_threads):
        params.nthread = int(n_threads)
    with collect_llama_errors() as errors:
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        print(" ".join(line.strip() for line in errors) or "no error message from llama.cpp", flush=True)
    return 0 if rc == 0 else 1
