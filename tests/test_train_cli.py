"""`trainbus train` as a real process tree against a real SUB socket: events, signals, orphans."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from bus import protocol
from tests.conftest import EPHEMERAL, ProcessGroup, trainbus_cmd, wait_for

pytest.importorskip("torch")


@pytest.fixture
def sub() -> Iterator[tuple[zmq.Socket, str]]:
    """A SUB socket bound on an ephemeral loopback port, standing in for the daemon."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.bind(EPHEMERAL)
    try:
        yield sock, sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    finally:
        sock.close(linger=0)
        ctx.term()


def collect(sock: zmq.Socket, until, timeout: float) -> list[protocol.Event]:
    """Receive and decode events until ``until(events)`` holds or the deadline passes."""
    events: list[protocol.Event] = []
    deadline = time.monotonic() + timeout
    while not until(events):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"timed out after {timeout}s; got {[e.topic for e in events][-20:]}")
        if sock.poll(min(remaining, 0.5) * 1000):
            events.append(protocol.decode(sock.recv_multipart()))
    return events


def _ppid_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if fields[0] != "Z":  # zombies are dead, just not yet reaped
            parents[int(stat.parent.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> set[int]:
    parents = _ppid_map()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def living(pids: set[int]) -> set[int]:
    return pids & set(_ppid_map())


def updates_by_worker(events: list[protocol.Event]) -> dict[int | str, list[protocol.Event]]:
    out: dict[int | str, list[protocol.Event]] = {}
    for event in events:
        if event.type == protocol.PPO_UPDATE:
            out.setdefault(event.worker, []).append(event)
    return out


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@pytest.mark.timeout(90)
def test_two_workers_publish_and_ctrl_c_stops_the_whole_tree(procs: ProcessGroup, sub):
    sock, endpoint = sub
    proc = procs.start(trainbus_cmd("train", "--publish", endpoint, "--workers", "2",
                                    "--envs", "4", "--run", "cli-test", "--seed", "7"))
    events = collect(sock, lambda evs: len(updates_by_worker(evs)) == 2
                     and all(len(v) >= 2 for v in updates_by_worker(evs).values()), timeout=60)

    by_worker = updates_by_worker(events)
    assert set(by_worker) == {0, 1}
    for worker, updates in by_worker.items():
        for event in updates:
            assert event.topic == f"ppo_update/cli-test/{worker}"
            for name in protocol.PPO_UPDATE_REQUIRED:
                assert event.fields[name] is not None
            assert event.fields["max_grad_norm"] == 0.5
        updates_seen = [e.fields["update"] for e in updates]
        assert updates_seen == sorted(updates_seen)
        assert len({e.session for e in updates}) == 1
    assert by_worker[0][0].session != by_worker[1][0].session

    tree = descendants(proc.popen.pid)
    assert len(tree) >= 2  # two workers (plus multiprocessing's resource tracker)
    heartbeat_pids = {e.fields["pid"] for e in events if e.type == protocol.HEARTBEAT}
    assert heartbeat_pids <= tree

    started = time.monotonic()
    proc.signal(signal.SIGINT)  # Ctrl-C: SIGINT to the whole foreground process group
    assert proc.wait(timeout=15) == 130
    wait_for(lambda: not living(tree), timeout=10, message=f"no orphans of {tree}")
    assert time.monotonic() - started < 10
    assert "Traceback" not in proc.stderr.text()


@pytest.mark.timeout(90)
def test_sigterm_to_the_parent_alone_stops_the_worker(procs: ProcessGroup, sub):
    sock, endpoint = sub
    proc = procs.start(trainbus_cmd("train", "--publish", endpoint, "--envs", "4",
                                    "--run", "term-test"))
    collect(sock, lambda evs: len(updates_by_worker(evs)) == 1, timeout=60)
    tree = descendants(proc.popen.pid)
    assert tree  # the worker (plus multiprocessing's resource tracker)

    os.kill(proc.popen.pid, signal.SIGTERM)  # e.g. a supervisor stopping the service
    assert proc.wait(timeout=15) == 143
    wait_for(lambda: not living(tree), timeout=10, message=f"no orphans of {tree}")
    assert "Traceback" not in proc.stderr.text()


@pytest.mark.timeout(60)
def test_finite_run_exits_zero_with_a_default_run_name(procs: ProcessGroup, sub):
    sock, endpoint = sub
    proc = procs.start(trainbus_cmd("train", "--publish", endpoint, "--updates", "3",
                                    "--envs", "4", "--max-grad-norm", "inf",
                                    "--inject-nan-at", "2"))
    events = collect(sock, lambda evs: any(e.type == protocol.PPO_UPDATE
                                           and e.fields["update"] == 3 for e in evs), timeout=45)
    assert proc.wait(timeout=15) == 0
    updates = {e.fields["update"]: e for e in updates_by_worker(events)[0]}
    assert re.fullmatch(r"cartpole-[0-9a-f]{4}", updates[3].run)
    assert updates[3].fields["max_grad_norm"] == float("inf")
    if 2 in updates:  # the earliest events may precede the subscription (slow joiner)
        assert updates[2].fields["nonfinite_grad_count"] >= 1
        assert updates[2].fields["grad_norm"] != updates[2].fields["grad_norm"]  # NaN


@pytest.mark.parametrize("args", [
    ["--workers", "0"],
    ["--envs", "-1"],
    ["--lr", "0"],
    ["--max-grad-norm", "nan"],
    ["--run", "bad/name"],
    ["--inject-nan-at", "zero"],
])
def test_misuse_is_one_line_and_exit_2(procs: ProcessGroup, args):
    proc = procs.start(trainbus_cmd("train", *args))
    assert proc.wait(timeout=20) == 2
    lines = [line for line in proc.stderr.text().splitlines() if line.strip()]
    assert len(lines) == 1 and "trainbus train: error:" in lines[0], lines
