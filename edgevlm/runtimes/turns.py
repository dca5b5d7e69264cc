"""Turns at one loaded model: requests from any thread run one at a time, first come, first served."""

from __future__ import annotations

import threading
import time
from collections import deque


class Turns:
    """A first-come-first-served lock whose waiters can give up (a cancel event set while they wait).

    `threading.Lock` wakes waiters in no particular order; a kiosk's or robot's clients should be answered in the
    order they asked.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._line: deque[object] = deque()
        self._busy = False
        self._closed = False

    @property
    def n_waiting(self) -> int:
        return len(self._line)

    def take(self, cancel: threading.Event | None = None) -> bool:
        """Wait for this caller's turn; False (without the turn) if `cancel` is set or the line is closed first."""
        me = object()
        with self._changed:
            self._line.append(me)
            try:
                while self._busy or self._line[0] is not me:
                    if self._closed or (cancel is not None and cancel.is_set()):
                        return False
                    self._changed.wait(timeout=None if cancel is None else 0.05)
                if self._closed:
                    return False
                self._busy = True
                return True
            finally:
                self._line.remove(me)
                self._changed.notify_all()

    def give_back(self) -> None:
        with self._changed:
            if not self._busy:
                raise RuntimeError("give_back() without a turn")
            self._busy = False
            self._changed.notify_all()

    def close(self) -> None:
        """Turn away every waiter and every later caller: `take` returns False from now on."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class StopSignal(threading.Event):
    """When a generation stops early: its caller's `cancel` event is set, or `timeout` seconds have passed since this
    signal was made. The runtime checks `is_set()` while waiting for its turn, between prefill pieces and between
    tokens, as it checks a plain `threading.Event`; `timed_out` tells the two reasons apart."""

    def __init__(self, cancel: threading.Event | None = None, timeout: float | None = None):
        super().__init__()
        self.cancel = cancel
        self.ends = None if timeout is None else time.monotonic() + timeout

    @property
    def timed_out(self) -> bool:
        return self.ends is not None and time.monotonic() >= self.ends and not self.cancelled

    @property
    def cancelled(self) -> bool:
        return super().is_set() or (self.cancel is not None and self.cancel.is_set())

    def is_set(self) -> bool:
        return self.cancelled or (self.ends is not None and time.monotonic() >= self.ends)
