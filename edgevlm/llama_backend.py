"""llama.cpp's process-wide setup and what it can do: its log routed to `logging` (errors collected for messages,
Ctrl-C delivered after C calls), its backend initialised once on first need, and the capability queries the host
probe and the runtime ask. Importing this module calls nothing in llama.cpp (`edgevlm plan` loads no model)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Iterator

import llama_cpp

_llama_logger = logging.getLogger("edgevlm.llama_cpp")

# ggml_log_level (NONE, DEBUG, INFO, WARN, ERROR) -> logging levels; CONT (5) continues the previous message.
_GGML_LOG_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_last_level = logging.DEBUG
_error_sinks: list[list[str]] = []
# Exceptions raised inside the log callback, i.e. by a signal handler (Ctrl-C) that ran there: ctypes cannot pass
# them through llama.cpp's C frames and would drop them. `deliver_interrupts` raises them once the C call returns.
_interrupts: list[BaseException] = []
_init_lock = threading.Lock()
_initialized = False


@llama_cpp.llama_log_callback
def _forward_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    try:
        _log_llama_message(level, text)
    except BaseException as exc:  # noqa: BLE001 (kept for `deliver_interrupts`, which raises it)
        if _interrupts is not None:  # None at interpreter exit, while llama.cpp still logs its teardown
            _interrupts.append(exc)


@contextlib.contextmanager
def deliver_interrupts() -> Iterator[None]:
    """Raise, when the block ends, the first interruption (KeyboardInterrupt, a signal handler's exception) that
    arrived while llama.cpp's C code ran inside the block: there it reached only the log callback."""
    init_llama()
    _interrupts.clear()
    yield
    if _interrupts:
        exc = _interrupts[0]
        _interrupts.clear()
        raise exc


def _log_llama_message(level: int, text: bytes) -> None:
    global _last_level
    _last_level = _GGML_LOG_LEVELS.get(level, _last_level)
    message = text.decode("utf-8", errors="replace").rstrip("\n")
    if _last_level >= logging.ERROR:
        for sink in _error_sinks:
            sink.append(message)
    if message and _llama_logger.isEnabledFor(_last_level):
        _llama_logger.log(_last_level, "%s", message)


@contextlib.contextmanager
def collect_llama_errors() -> Iterator[list[str]]:
    """Collect llama.cpp's error lines logged inside the block (to put them in an exception message)."""
    init_llama()
    sink: list[str] = []
    _error_sinks.append(sink)
    try:
        yield sink
    finally:
        _error_sinks.remove(sink)


def init_llama() -> None:
    """Route llama.cpp's log to `logging` instead of stderr and initialise its backend: once per process, before the
    first call into llama.cpp that may log. Importing this module does neither (`edgevlm plan` loads no model)."""
    global _initialized
    with _init_lock:
        if not _initialized:
            llama_cpp.llama_log_set(_forward_llama_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _initialized = True


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp can offload layers to a GPU (asking loads its GPU backends, which log)."""
    init_llama()
    return bool(llama_cpp.llama_supports_gpu_offload())


def system_info() -> str:
    """llama.cpp's own line on the kernels it built and runs here, e.g. "CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | ..."."""
    init_llama()
    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()


def cpu_has_amx() -> bool:
    """Whether llama.cpp's CPU backend was built for and runs on a CPU with AMX int8 tiles."""
    init_llama()
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()
