"""The one place that shows progress of long work (export, quantization) — only on a terminal."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


def _on_terminal() -> bool:
    return sys.stderr.isatty()


class Bar:
    """A progress bar (tqdm on a terminal, nothing elsewhere)."""

    def __init__(self, total: int, desc: str, unit: str = "it"):
        self._bar = None
        if _on_terminal():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def stage(desc: str) -> Iterator[None]:
    """A named step of long work: logged with its duration, and shown on a terminal."""
    start = time.perf_counter()
    if _on_terminal():
        print(f"• {desc} …", file=sys.stderr, flush=True)
    logger.info("%s …", desc)
    yield
    elapsed = time.perf_counter() - start
    if _on_terminal():
        print(f"  done in {elapsed:.1f} s", file=sys.stderr, flush=True)
    logger.info("%s: done in %.1f s", desc, elapsed)
