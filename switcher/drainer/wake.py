"""The drain loop's wake-up, which a signal handler may set."""

from __future__ import annotations

import contextlib
import queue


class Wake:
    """Like ``threading.Event`` for one waiter, but ``set`` is safe in a signal handler, which runs between
    two bytecodes of the waiting thread itself: ``Event.set`` takes a lock that ``Event.wait`` may be
    holding at that instant, and the drainer then hung on SIGTERM. ``SimpleQueue.put`` is reentrant."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[None] = queue.SimpleQueue()

    def set(self) -> None:
        self._queue.put(None)

    def clear(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()

    def wait(self, timeout: float) -> bool:
        """True when set (before or during the wait), False when ``timeout`` seconds passed."""
        try:
            self._queue.get(timeout=timeout)
        except queue.Empty:
            return False
        return True
