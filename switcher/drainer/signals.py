"""Stopping a drainer on SIGTERM or SIGINT, with nothing done inside a signal handler.

Python runs a handler in the main thread between two bytecodes: perhaps while that thread holds a lock
(the loop's wake-up's, inside ``Event.wait``) or writes a log line, which the handler then could not take
or write without hanging; and only once the main thread runs, which a signal taken by another thread does
not make it do. The interpreter also writes each signal's number to its wake-up fd
(``signal.set_wakeup_fd``), from whichever thread takes the signal: a thread of our own reads it there and
stops the drainer.

A process has one wake-up fd. The one in use before (an asyncio loop's, for its signal handlers) gets
every byte passed on; a loop that takes the fd later leaves our handlers running in the main thread,
which then write the byte themselves. A forked child (multiprocessing) puts back what it inherited, so
that SIGTERM ends it instead of stopping its parent's drainer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def stop_on_signals(stop: Callable[[signal.Signals], None]) -> None:
    """Call ``stop`` (once, from a thread of its own) on the first SIGTERM or SIGINT. Call it from the
    main thread."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("a drainer's signal handlers can only be installed from the main thread")
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    previous_fd = signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
    owner, live = os.getpid(), [True]  # live: until a forked child has put things back

    def note(signum: int, _frame: Any) -> None:
        if os.getpid() == owner:  # (no lock taken: safe wherever the main thread was)
            with contextlib.suppress(OSError):
                os.write(writer, bytes([signum]))

    previous = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS}

    # The two signals are blocked around a fork, so that none reaches the child before it has put back
    # its inherited handlers and wake-up fd (it would write to our pipe).
    forking = threading.local()

    def before_fork() -> None:
        forking.mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if live else None

    def in_parent() -> None:
        if forking.mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, forking.mask)

    def in_child() -> None:
        if not live:
            return  # a fork of a fork: its parent has done it
        live.clear()
        if (current := signal.set_wakeup_fd(-1)) != writer:
            signal.set_wakeup_fd(current)  # someone else's since: leave it
        elif previous_fd != -1:
            with contextlib.suppress(ValueError, OSError):  # closed by its owner's own fork hook
                signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            if signal.getsignal(sig) is note:
                signal.signal(sig, handler)
        os.close(reader)
        os.close(writer)
        signal.pthread_sigmask(signal.SIG_SETMASK, forking.mask)

    os.register_at_fork(before=before_fork, after_in_parent=in_parent, after_in_child=in_child)
    threading.Thread(
        target=read_signals, args=(reader, previous_fd, stop), name="switcher-signals", daemon=True
    ).start()


def read_signals(signals: int, forward_to: int, stop: Callable[[signal.Signals], None]) -> None:
    """Read signal numbers from ``signals`` until its end, passing them on to ``forward_to`` (-1: none),
    and call ``stop`` on the first SIGTERM or SIGINT; with nothing to pass on, return then."""
    stopped = False
    while data := os.read(signals, 512):  # not byte by byte: keep up with a host's other signals
        if forward_to != -1:
            with contextlib.suppress(OSError):
                os.write(forward_to, data)
        if not stopped and (found := [s for s in data if s in STOP_SIGNALS]):
            stopped = True
            stop(signal.Signals(found[0]))
            if forward_to == -1:
                return
