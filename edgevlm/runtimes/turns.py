"""Turns at one loaded model: requests from any thread run one at a time, first come, first served."""

from __future__ import annotations

import threading
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
