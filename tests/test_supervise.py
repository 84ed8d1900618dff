"""bus.supervise, the child-process supervision `trainbus demo` and `trainbus train` share:
real children, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from bus import supervise
from tests.conftest import wait_for

# Prints "ready" once its SIGTERM disposition is set, then waits to be stopped.
CHILD = ("import signal, sys, time; "
         "signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[1] == 'stubborn' else signal.SIG_DFL); "
         "print('ready', flush=True); time.sleep(60)")


def start(kind: str) -> subprocess.Popen[bytes]:
    popen = subprocess.Popen([sys.executable, "-c", CHILD, kind], stdout=subprocess.PIPE,
                             start_new_session=True)
    assert popen.stdout is not None and popen.stdout.readline() == b"ready\n"
    return popen


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("in_order", [False, True])
def test_stop_all_terminates_then_kills_what_ignores_sigterm(in_order):
    polite, stubborn = start("polite"), start("stubborn")
    try:
        told = []
        children = [supervise.PopenChild("polite", polite), supervise.PopenChild("stubborn", stubborn)]
        killed = supervise.stop_all(children, grace_s=0.5, in_order=in_order,
                                    on_kill=lambda child: told.append(child.name))
        assert [c.name for c in killed] == told == ["stubborn"]
        assert polite.returncode == -signal.SIGTERM
        assert stubborn.returncode == -signal.SIGKILL
    finally:
        for popen in (polite, stubborn):
            if popen.poll() is None:
                popen.kill()
                popen.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_parent_death_signal_stops_the_child_when_its_parent_is_killed():
    parent_code = (
        "import subprocess, sys, time; from bus import supervise; "
        f"c = subprocess.Popen([sys.executable, '-c', {CHILD!r}, 'polite'], "
        "stdout=subprocess.PIPE, preexec_fn=supervise.set_parent_death_signal); "
        "c.stdout.readline(); print(c.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE,
                              start_new_session=True)
    child_pid = None
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        parent.kill()  # SIGKILL: the parent cleans up nothing
        parent.wait(10)
        # The orphan is re-parented (to init or a subreaper, which reaps it) once it exits.
        wait_for(lambda: pid_gone(child_pid) or _is_zombie(child_pid), 10,
                 message="the child to get SIGTERM from the kernel")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child_pid is not None and not pid_gone(child_pid):
            try:
                os.kill(child_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
