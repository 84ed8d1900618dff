"""Shared fixtures: real daemons and real subprocesses on ephemeral loopback endpoints.

Every process a test starts is registered with ``procs`` and killed at teardown (also on
failure); every wait is a poll with a deadline, never a sleep used as synchronisation.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
EPHEMERAL = "tcp://127.0.0.1:*"


def trainbus_cmd(*args: str) -> list[str]:
    """The `trainbus` command line, run with this interpreter (no PATH dependence)."""
    return [sys.executable, "-m", "bus.cli", *args]


def snapshot_reply(snapshot: str, prefix: bytes = b"", timeout_ms: int = 10_000) -> list[bytes]:
    """A raw snapshot request to the daemon (DEALER): the reply's frames, checked to be a
    SNAPSHOT reply (``[b"SNAPSHOT", n, topic_1, payload_1, ...]``)."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(snapshot)
        sock.send_multipart([b"SNAPSHOT", prefix])
        assert sock.poll(timeout_ms), "no snapshot reply"
        reply = sock.recv_multipart()
    finally:
        sock.close(linger=0)
    assert reply[0] == b"SNAPSHOT", reply[:2]
    return reply


def compiled_or_skip() -> None:
    """Skip (visibly) where the daemon's compiled cache could not be built for want of a C
    compiler; fail where a compiler is present but it is unavailable anyway."""
    from bus import cache

    try:
        cache.compiled_library()
    except OSError as exc:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail(f"a C compiler is here but the compiled cache is unavailable: {exc}")
        pytest.skip(f"no C compiler, so no compiled cache: {exc}")


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until truthy or the deadline passes (then fail the test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class LineReader:
    """Collects a subprocess stream's lines on a thread, so tests can wait on content."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            with self._lock:
                self.lines.append(line.rstrip("\n"))
        stream.close()

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def text(self) -> str:
        return "\n".join(self.snapshot())

    def wait_for_line(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            for line in self.snapshot():
                match = regex.search(line)
                if match:
                    return match
            return None

        return wait_for(found, timeout, message=f"a line matching {pattern!r}; got:\n{self.text()[-2000:]}")

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


@dataclass
class Proc:
    """A started subprocess with its output collected line by line."""

    popen: subprocess.Popen[str]
    stdout: LineReader
    stderr: LineReader

    def wait(self, timeout: float = 10.0) -> int:
        code = self.popen.wait(timeout=timeout)
        self.stdout.join()
        self.stderr.join()
        return code

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signum)


@dataclass
class ProcessGroup:
    """Starts subprocesses in their own process groups and kills them all at teardown."""

    started: list[Proc] = field(default_factory=list)

    def start(self, args: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None, stdin: Any = subprocess.DEVNULL) -> Proc:
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env.pop("TRAINBUS_PUBLISH", None)
        full_env.pop("TRAINBUS_SUBSCRIBE", None)
        full_env.pop("TRAINBUS_SNAPSHOT", None)
        full_env.update(env or {})
        popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=stdin, text=True, env=full_env, cwd=cwd or REPO,
                                 start_new_session=True)
        proc = Proc(popen, LineReader(popen.stdout), LineReader(popen.stderr))
        self.started.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.started:
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # Also reap anything the process groups left behind (e.g. spawned workers).
        for proc in self.started:
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.cleanup()


@dataclass
class DaemonHandle:
    proc: Proc
    publish: str
    subscribe: str
    snapshot: str

    @property
    def env(self) -> dict[str, str]:
        return {"TRAINBUS_PUBLISH": self.publish, "TRAINBUS_SUBSCRIBE": self.subscribe,
                "TRAINBUS_SNAPSHOT": self.snapshot}


def start_daemon(procs: ProcessGroup, *extra: str, publish: str = EPHEMERAL,
                 subscribe: str = EPHEMERAL, snapshot: str = EPHEMERAL,
                 env: dict[str, str] | None = None) -> DaemonHandle:
    """Start `trainbus daemon` and wait for its ready line (which names the real ports)."""
    proc = procs.start(trainbus_cmd("daemon", "--publish", publish, "--subscribe", subscribe,
                                    "--snapshot", snapshot, *extra), env=env)
    match = proc.stdout.wait_for_line(r"ready publish=(\S+) subscribe=(\S+) snapshot=(\S+)", 15)
    return DaemonHandle(proc, match.group(1), match.group(2), match.group(3))


@pytest.fixture
def daemon(procs: ProcessGroup) -> DaemonHandle:
    """A running daemon on ephemeral loopback ports, with 0.5 s bus_stats."""
    return start_daemon(procs, "--stats-interval", "0.5")


def ppo_fields(update: int = 1, grad_norm: float = 1.0, **overrides: Any) -> dict[str, Any]:
    """A complete set of ppo_update fields (no envelope), for tests."""
    fields: dict[str, Any] = {
        "update": update, "env_steps": update * 1024, "grad_norm": grad_norm,
        "pre_clip_grad_norm": grad_norm * 1.5, "max_grad_norm": 0.5 if math.isfinite(grad_norm) else math.inf,
        "policy_loss": -0.01, "value_loss": 0.5, "entropy": 0.68, "approx_kl": 0.004,
        "clip_fraction": 0.1, "lr": 2.5e-4,
    }
    fields.update(overrides)
    return fields


def ppo_payload(run: str = "r", worker: int | str = 0, session: str = "s1", seq: int = 0,
                **overrides: Any) -> dict[str, Any]:
    """A complete, valid ppo_update payload (envelope included)."""
    payload = {"v": 1, "type": "ppo_update", "run": run, "worker": worker, "session": session,
               "seq": seq, "ts": time.time()}
    payload.update(ppo_fields())
    payload.update(overrides)
    return payload
