"""Process lifecycle shared by every trainbus command: a stop flag set by SIGINT, SIGTERM
and SIGHUP.

Why a flag rather than KeyboardInterrupt: loops that wait on sockets or timers check it
between iterations and then close their sockets and flush their files, so Ctrl-C, a
supervisor's SIGTERM and a closed terminal (SIGHUP) end a process the same clean way.
"""

from __future__ import annotations

import os
import select
import signal
from typing import Any

#: What ends a trainbus command cleanly: Ctrl-C, a supervisor, the terminal going away
#: (closing a terminal window or `tmux kill-session` sends SIGHUP; by default that kills
#: the process with no cleanup, leaving its children and half-written files behind).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopFlag:
    """Set once (by a signal handler or any thread); loops read it, sleeps wait on it.

    The same interface as the ``threading.Event`` it replaces (``set``, ``is_set``,
    ``wait``), without its lock. Why: a signal handler runs on the main thread between
    two bytecodes, possibly while that thread is inside ``Event.wait()`` holding the
    Event's (non-reentrant) lock, and ``Event.set()`` then waits for ever for a lock its
    own thread holds: a `trainbus publish` was seen ignoring SIGTERM for 90 s that way.
    Here ``set`` assigns a bool and writes one byte to a pipe: no lock anywhere. The byte
    is never read, so the pipe stays readable and wakes every waiter, now and later.
    """

    def __init__(self) -> None:
        self._set = False
        # Non-inheritable (Python's default): children started with subprocess or spawn
        # never hold it.
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def set(self) -> None:
        """Mark stopped and wake every ``wait``; safe inside a signal handler."""
        if self._set:
            return
        self._set = True
        try:
            os.write(self._write_fd, b"\0")
        except BlockingIOError:  # cannot happen (one byte, once); the flag is set anyway
            pass

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until set or ``timeout`` seconds passed; True when set (as Event.wait).

        A signal arriving during the sleep runs its handler, whose ``set`` makes the pipe
        readable, so the interrupted select (retried by Python, PEP 475) returns at once."""
        if self._set:
            return True
        select.select([self._read_fd], [], [], timeout)
        return self._set


def install_stop_handlers() -> StopFlag:
    """A StopFlag set on SIGINT/SIGTERM/SIGHUP (call from the main thread)."""
    stop = StopFlag()

    def _handler(signum: int, frame: Any) -> None:
        stop.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, _handler)
    return stop
