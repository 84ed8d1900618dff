"""The stop flag every trainbus command ends on: set from signal handlers, waited on by loops.

It replaced a threading.Event whose set() could block for ever inside a signal handler
(the handler runs on the main thread, which may hold the Event's lock inside wait()): a
`trainbus publish` once ignored SIGTERM for 90 s. These tests pin what the commands rely
on: the three stop signals set it, a sleeping wait() wakes at once, every waiter wakes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from bus.lifecycle import STOP_SIGNALS, StopFlag, install_stop_handlers


@pytest.fixture
def restored_handlers() -> Iterator[None]:
    """install_stop_handlers() replaces process-wide handlers (pytest's SIGINT one too)."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_wait_times_out_unset_and_returns_at_once_when_set():
    stop = StopFlag()
    started = time.monotonic()
    assert stop.wait(0.05) is False
    assert time.monotonic() - started >= 0.04
    assert not stop.is_set()
    stop.set()
    stop.set()  # idempotent
    assert stop.is_set()
    assert stop.wait(None) is True
    assert stop.wait(0) is True


@pytest.mark.timeout(20)
@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_each_stop_signal_wakes_a_main_thread_asleep_in_wait(restored_handlers, signum):
    stop = install_stop_handlers()
    # Delivered while the main thread sleeps in wait() (the handler runs on it, there).
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signum))
    timer.start()
    try:
        started = time.monotonic()
        assert stop.wait(10.0) is True
        assert time.monotonic() - started < 5.0  # woken by the signal, not the timeout
    finally:
        timer.cancel()
    assert stop.is_set()


@pytest.mark.timeout(20)
def test_set_from_another_thread_wakes_every_waiter_now_and_later():
    stop = StopFlag()
    woke: list[bool] = []
    waiters = [threading.Thread(target=lambda: woke.append(stop.wait(10.0))) for _ in range(4)]
    for waiter in waiters:
        waiter.start()
    stop.set()
    for waiter in waiters:
        waiter.join(10.0)
    assert woke == [True] * 4
    assert stop.wait(10.0) is True  # a later waiter does not sleep either
