"""Child-process supervision shared by ``trainbus demo`` and ``trainbus train``.

Both commands start children and promise that none outlives them: a child asks the kernel
for SIGTERM when its parent dies (even by SIGKILL), and stopping is SIGTERM, a bounded
grace period, then SIGKILL for whatever is left. Written once here so that the two cannot
drift apart (they had: one used ``CDLL(None)``, the other ``CDLL("libc.so.6")``, with
different error handling). ``bus/`` is the only package both ``emitter/`` and the CLI
depend on, so it lives here; it imports nothing from emitter/ or consumers/.

The children differ — the demo's are ``subprocess.Popen`` leaders of their own process
groups, train's are ``multiprocessing`` processes — so :func:`stop_all` works on a small
:class:`Stoppable` protocol with an adapter for each (:class:`PopenChild`,
:class:`MultiprocessingChild`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
#: How long a SIGKILLed child may take to be reaped before we give up waiting on it.
KILL_WAIT_S = 5.0


def _prctl(option: int, arg: int) -> bool:
    """Linux prctl(2) through libc; False where unavailable (not Linux, no libc). Never
    raises: it also runs in a forked child before exec, where an exception is fatal."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0) == 0
    except Exception:
        return False


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Linux: have the kernel send ``signum`` to this process when its parent dies, so a
    killed supervisor leaves no orphan running. Call it in the child (a Popen
    ``preexec_fn``, or first thing in a multiprocessing target); then check ``os.getppid()``
    against the expected parent, since the parent may have died before this took effect."""
    return _prctl(_PR_SET_PDEATHSIG, int(signum))


def become_subreaper() -> bool:
    """Linux: adopt orphaned descendants (e.g. a training worker's helper processes whose
    parent has exited), so that this process can reap them and know they are gone instead
    of leaving zombies for whatever PID 1 the machine has."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def group_exists(pgid: int) -> bool:
    """Whether any process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_adopted() -> None:
    """Collect exit statuses of exited children and adopted orphans (never blocks)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_groups(pgids: Sequence[int], timeout_s: float = KILL_WAIT_S) -> list[int]:
    """SIGKILL every process in each group until all groups are empty (reaping adopted
    orphans meanwhile), for at most ``timeout_s``; returns the groups still present."""
    deadline = time.monotonic() + timeout_s
    while True:
        reap_adopted()
        left = [pgid for pgid in pgids if group_exists(pgid)]
        if not left or time.monotonic() > deadline:
            return left
        for pgid in left:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)  # a poll interval while the kernel tears the groups down


class Stoppable(Protocol):
    """What :func:`stop_all` needs of a child process."""

    name: str

    def exited(self) -> bool: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s``; True once the child has exited."""
        ...


class PopenChild:
    """A ``subprocess.Popen`` child; with ``group=True`` (it was started with
    ``start_new_session=True``) SIGKILL goes to its whole process group."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], *, group: bool = True) -> None:
        self.name = name
        self.popen = popen
        self.group = group

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def terminate(self) -> None:
        try:
            self.popen.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        try:
            if self.group:
                os.killpg(self.popen.pid, signal.SIGKILL)
            else:
                self.popen.kill()
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout_s: float) -> bool:
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True


class MultiprocessingChild:
    """A ``multiprocessing`` process (any start method)."""

    def __init__(self, process: ProcessLike) -> None:
        self.process = process
        self.name = process.name

    def exited(self) -> bool:
        return self.process.exitcode is not None

    def terminate(self) -> None:
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout_s: float) -> bool:
        self.process.join(timeout=timeout_s)
        return self.process.exitcode is not None


class ProcessLike(Protocol):
    """The part of ``multiprocessing.process.BaseProcess`` used here."""

    name: str

    @property
    def exitcode(self) -> int | None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...


def stop_all(children: Sequence[Stoppable], grace_s: float, *, in_order: bool = False,
             min_wait_s: float = 0.0,
             on_kill: Callable[[Stoppable], None] | None = None) -> list[Stoppable]:
    """SIGTERM every live child, wait within one shared ``grace_s``, then SIGKILL (and
    reap, for at most :data:`KILL_WAIT_S` each) whatever is still alive.

    ``in_order``: terminate and wait for each child before the next (the demo stops its
    monitor first, so its last frame is printed, and the daemon last, so no consumer sees
    the bus vanish); each then gets at least ``min_wait_s`` even when the shared grace is
    spent. Otherwise all are asked at once (train's workers each finish their update in
    parallel). ``on_kill`` is told about each child about to be killed. Returns the
    killed ones.
    """
    deadline = time.monotonic() + grace_s
    if in_order:
        for child in children:
            if not child.exited():
                child.terminate()
                child.wait(max(min_wait_s, deadline - time.monotonic()))
    else:
        for child in children:
            if not child.exited():
                child.terminate()
        for child in children:
            child.wait(max(min_wait_s, deadline - time.monotonic()))
    killed = []
    for child in children:
        if not child.exited():
            if on_kill is not None:
                on_kill(child)
            child.kill()
            killed.append(child)
            if not child.wait(KILL_WAIT_S):
                log.error("%s did not die after SIGKILL", child.name)
    return killed
