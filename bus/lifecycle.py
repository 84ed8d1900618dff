"""Process lifecycle shared by every trainbus command: a stop flag set by SIGINT/SIGTERM.

Why an Event rather than KeyboardInterrupt: loops that wait on sockets or timers check it
between iterations and then close their sockets and flush their files, so Ctrl-C and a
supervisor's SIGTERM end a process the same clean way.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


def install_stop_handlers() -> threading.Event:
    """An Event set on SIGINT/SIGTERM (call from the main thread)."""
    stop = threading.Event()

    def _handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    return stop
