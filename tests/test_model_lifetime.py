"""EdgeVLM.close() and use after it (issue 17, row 5): closing while another thread generates ends that generation,
and every later call raises a clear error, never a crash. Each case runs in a child process, so a crash fails the
test instead of killing pytest."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

import edgevlm
from edgevlm.errors import ModelClosedError

ENDLESS = 'root ::= "a" root'  # a grammar no answer can finish: only max_new_tokens, a cancel or close end it


def run_child(script: str, bundle) -> subprocess.CompletedProcess:
    code = f"import edgevlm, sys, threading, time\nvlm = edgevlm.load({str(bundle)!r}, n_ctx=1024, n_threads=1)\n"
    return subprocess.run([sys.executable, "-c", code + textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=180)  # fmt: skip


def test_close_while_another_thread_generates(tiny_bundles):
    child = run_child(f"""
        started, result = threading.Event(), {{}}
        def generate():
            steps = []
            for step in vlm.generate("Go on.", max_tokens=100000, grammar={ENDLESS!r}):
                steps.append(step)
                started.set()
            result["finish"], result["n"] = steps[-1].finish_reason, len(steps)
        def wait_in_line():
            try:
                vlm.chat([{{"role": "user", "content": "Hi"}}], max_tokens=2)
            except edgevlm.EdgeVLMError as err:
                result["waiting"] = type(err).__name__
        worker, waiter = threading.Thread(target=generate), threading.Thread(target=wait_in_line)
        worker.start()
        started.wait(60)
        waiter.start()
        time.sleep(0.3)
        vlm.close()
        worker.join(60)
        waiter.join(60)
        print(result["finish"], result["n"] > 1, result["waiting"])
    """, tiny_bundles["F32"])
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split() == ["cancelled", "True", "ModelClosedError"]


@pytest.mark.parametrize("call", [
    'vlm.chat([{"role": "user", "content": "Hi"}])',
    'list(vlm.generate("Hi", max_tokens=2))',
    'vlm.chat([{"role": "user", "content": "Hi"}], response_format={"type": "json_object"})',
    'vlm.plan("Hi")',
    'vlm.prompt_logits("Hi")',
    'vlm.clear_caches()',
])  # fmt: skip
def test_every_call_after_close_raises_a_clear_error(tiny_bundles, call):
    child = run_child(f"""
        vlm.close()
        vlm.close()  # twice is fine
        try:
            {call}
        except edgevlm.EdgeVLMError as err:
            print(type(err).__name__, err)
    """, tiny_bundles["F32"])
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.startswith("ModelClosedError this model was closed"), child.stdout


def test_a_model_is_a_context_manager(tiny_bundles):
    with edgevlm.load(tiny_bundles["F32"], n_ctx=1024, n_threads=1) as vlm:
        assert vlm.chat([{"role": "user", "content": "Hi"}], max_tokens=2).finish_reason in ("stop", "length")
    with pytest.raises(ModelClosedError, match="load the bundle again"):
        vlm.chat([{"role": "user", "content": "Hi"}])


def test_ctrl_c_while_llama_cpp_loads_is_not_lost(tiny_bundles):
    """Loading logs a lot, so a Ctrl-C's handler often runs inside llama.cpp's log callback, where ctypes used to drop
    the KeyboardInterrupt and the load went on. It now interrupts once the C call returns. (The handler below raises
    as a signal handler that ran there would.)"""
    from edgevlm.profiles import LlamaSettings
    from edgevlm.runtimes.llm import LlamaLM

    class Interrupting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise KeyboardInterrupt

    bundle = edgevlm.Bundle.open(tiny_bundles["F32"])
    llama_logger = logging.getLogger("edgevlm.llama_cpp")
    handler, level = Interrupting(), llama_logger.level
    llama_logger.addHandler(handler)
    llama_logger.setLevel(logging.DEBUG)
    try:
        with pytest.raises(KeyboardInterrupt):
            LlamaLM(bundle.file(bundle.manifest.llm.file), LlamaSettings(n_ctx=256))
    finally:
        llama_logger.removeHandler(handler)
        llama_logger.setLevel(level)
