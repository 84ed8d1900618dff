"""Shared pieces of ``make bench``: result rows, statistics, a real daemon, process hygiene.

Why this shape: every target in DESIGN.md is a *ratio* against a baseline measured in the
same run, because these machines are shared and noisy; absolute numbers from different
moments are not comparable. So each row carries its baseline next to it, figures are
medians over repetitions, and subject and baseline are interleaved. Processes started
here (daemons, spawned publishers and subscribers) are registered and always reaped, so
an interrupted bench leaves nothing behind.
"""

from __future__ import annotations

import atexit
import json
import math
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: ``spawn`` everywhere: a forked child would inherit the parent's ZeroMQ context and
#: torch thread pools, which is neither safe nor what a real deployment looks like.
SPAWN = multiprocessing.get_context("spawn")
EPHEMERAL = "tcp://127.0.0.1:*"


@dataclass
class Row:
    """One line of the table / one object of results.json.

    ``ratio`` is ``value / baseline_value`` (so "50x cheaper" is a ratio <= 0.02), except
    where ``target`` says "paired per round": then it is the median of per-round ratios
    of subject and baseline (bench/emit.py), and the note gives the plain quotient too;
    ``target`` states the bound in words. ``passed`` is None for rows that only inform
    (no target in DESIGN.md), shown as INFO.
    """

    name: str
    value: float | None
    unit: str
    baseline_name: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "value": _finite_or_none(self.value), "unit": self.unit,
            "baseline_name": self.baseline_name,
            "baseline_value": _finite_or_none(self.baseline_value),
            "ratio": _finite_or_none(self.ratio), "target": self.target, "pass": self.passed,
            "note": self.note,
        }


def _finite_or_none(x: float | None) -> float | None:
    """results.json is strict JSON: a figure that could not be measured is null."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def ratio_row(name: str, value: float, unit: str, baseline_name: str, baseline_value: float,
              *, max_ratio: float | None = None, min_ratio: float | None = None,
              target: str | None = None, note: str = "") -> Row:
    """A row judged on ``value / baseline_value`` against an upper and/or lower bound."""
    ratio = value / baseline_value if baseline_value else math.inf
    passed = True
    if max_ratio is not None:
        passed &= ratio <= max_ratio
    if min_ratio is not None:
        passed &= ratio >= min_ratio
    if target is None:
        parts = []
        if min_ratio is not None:
            parts.append(f">= {min_ratio:g}x")
        if max_ratio is not None:
            parts.append(f"<= {max_ratio:g}x")
        target = " and ".join(parts)
    return Row(name, value, unit, baseline_name, baseline_value, ratio, target, passed, note)


def unavailable(name: str, unit: str, target: str, why: str) -> Row:
    """A row whose subject does not exist (yet): reported, never faked, never a PASS."""
    return Row(name, None, unit, "", None, None, target, False, f"not available: {why}")


def paired_ratio_row(name: str, subject: Sequence[float], unit: str, baseline_name: str,
                     baseline: Sequence[float], *, max_ratio: float | None = None,
                     min_ratio: float | None = None, note: str = "") -> Row:
    """A row judged on the median of per-round ratios: in each round the subject and its
    baseline ran moments apart, under the same load, so slow drift in the machine's state
    cancels. Two separate medians are not robust on these shared 2-core machines: when the
    box switches between a fast and a slow state during a group, each side's values are
    bimodal and a median near the split lands in either mode (seen in the emit row: a ratio
    of medians of 1.27x, first half 1.47x, where the paired median was 1.01x). Value and
    baseline are still each one's median; the note gives their quotient, the IQR of the
    per-round ratios and the ratio per half, so drift shows. Neither bound: INFO."""
    per_round = [s / b if b else math.inf for s, b in zip(subject, baseline, strict=True)]
    ratio = median(per_round)
    half = len(per_round) // 2
    value, base = median(subject), median(baseline)
    stability = (f"ratio = median of the per-round ratios (IQR {percentile(per_round, 25):.2f}-"
                 f"{percentile(per_round, 75):.2f}x; first half {median(per_round[:half]):.2f}x, "
                 f"second half {median(per_round[half:]):.2f}x); ratio of the two medians "
                 f"{value / base if base else math.inf:.2f}x")
    if max_ratio is None and min_ratio is None:
        return Row(name, value, unit, baseline_name, base, ratio, "", None,
                   f"INFO: {stability}; {note}")
    passed = (max_ratio is None or ratio <= max_ratio) and (min_ratio is None or ratio >= min_ratio)
    bounds = " and ".join([*([f">= {min_ratio:g}x"] if min_ratio is not None else []),
                           *([f"<= {max_ratio:g}x"] if max_ratio is not None else [])])
    return Row(name, value, unit, baseline_name, base, ratio, f"{bounds} (paired per round)",
               passed, f"{stability}; {note}")


# ---------------------------------------------------------------------------- statistics


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an unsorted sequence."""
    if not xs:
        return math.nan
    ordered = sorted(xs)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# ---------------------------------------------------------------------------- processes

_started_popen: list[subprocess.Popen[Any]] = []
_started_mp: list[BaseProcess] = []


def track(proc: BaseProcess) -> BaseProcess:
    """Register a multiprocessing child so :func:`reap_all` ends it whatever happens."""
    _started_mp.append(proc)
    return proc


def stop_process(proc: BaseProcess, timeout: float = 3.0) -> None:
    """Join, then terminate, then kill: one child, by its own handle."""
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(2.0)
    if proc.is_alive():
        proc.kill()
        proc.join(2.0)


def reap_all() -> None:
    """End every process this bench started (idempotent; runs at exit too)."""
    for popen in list(_started_popen):
        if popen.poll() is None:
            try:
                os.killpg(popen.pid, signal.SIGCONT)
                os.killpg(popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _started_popen.remove(popen)
    for proc in list(_started_mp):
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
        _started_mp.remove(proc)


atexit.register(reap_all)


def clean_env() -> dict[str, str]:
    """This environment without TRAINBUS_* endpoints, so children use what we pass them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINBUS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def start_cli(args: list[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """Start ``python -m bus.cli ARGS`` (a real ``trainbus`` command) in its own process
    group, registered so that :func:`reap_all` ends it whatever happens. Output goes where
    ``popen_kwargs`` say (default: discarded), never to an unread pipe that could fill."""
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    popen_kwargs.setdefault("stdout", subprocess.DEVNULL)
    popen_kwargs.setdefault("stderr", subprocess.DEVNULL)
    popen: subprocess.Popen[bytes] = subprocess.Popen(
        [sys.executable, "-m", "bus.cli", *args], env=clean_env(), cwd=REPO,
        start_new_session=True, **popen_kwargs)
    _started_popen.append(popen)
    return popen


def stop_cli(popen: subprocess.Popen[Any], timeout: float = 10.0) -> int | None:
    """SIGTERM (a consumer's clean stop: it logs its exit line), then SIGKILL after
    ``timeout``; returns the exit code (None if it could not be reaped)."""
    if popen.poll() is None:
        try:
            os.kill(popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                return None
    if popen in _started_popen:
        _started_popen.remove(popen)
    return popen.returncode


@dataclass
class DaemonProc:
    """A real ``trainbus daemon`` subprocess on ephemeral loopback ports."""

    popen: subprocess.Popen[str]
    publish: str
    subscribe: str
    snapshot: str

    def pause(self) -> None:
        """SIGSTOP: the daemon stops reading, as a wedged or swapped-out daemon would."""
        os.kill(self.popen.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.popen.pid, signal.SIGCONT)


@dataclass(frozen=True)
class CoreSplit:
    """Which cores a forwarder gets and which its load (publishers, subscribers) gets.

    Why: on a machine with few cores, where the scheduler puts a forwarder's threads
    (its I/O thread, its proxy thread) next to the processes it serves decides how it
    works, not only how fast: how many events each wake-up finds, whether a hand-off
    between its threads crosses cores. Left to the scheduler, each run landed in another
    state: flat out, a bare proxy alone read 1.9-8.3 µs of CPU per event within one group
    of nine runs, and a forwarder row compared states as often as forwarders. Pinned,
    every forwarder and every baseline runs in one state: the forwarder on a core of its
    own, as a daemon runs on a training machine with cores to spare, and the load on the
    others, in every mode, direct included (the bare proxy then read 0.9-1.5 µs).
    """

    #: None: not pinned (one core only, or no way to pin).
    forwarder: frozenset[int] | None
    load: frozenset[int] | None


def core_split() -> CoreSplit:
    """The last core this process may use for forwarders, the rest for their load; nothing
    pinned where there is only one core, or no way to pin (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return CoreSplit(None, None)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return CoreSplit(None, None)
    return CoreSplit(frozenset(cores[-1:]), frozenset(cores[:-1]))


def pin_process(pid: int, cores: frozenset[int]) -> None:
    """Pin every thread of ``pid`` (affinity is per thread on Linux; threads started later
    inherit it from the thread that starts them)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return  # the process has ended; whoever waits for it says so
    for task in tasks:
        try:
            os.sched_setaffinity(int(task.name), cores)
        except (ProcessLookupError, FileNotFoundError):
            continue  # a thread that ended while we looked


@contextmanager
def running_daemon(*extra: str, cores: frozenset[int] | None = None) -> Iterator[DaemonProc]:
    """Start ``python -m bus.cli daemon`` and yield once its ready line names the ports;
    ``cores`` pins it."""
    with _running_forwarder([sys.executable, "-m", "bus.cli", "daemon", "--publish", EPHEMERAL,
                             "--subscribe", EPHEMERAL, "--snapshot", EPHEMERAL, *extra],
                            cores) as daemon:
        yield daemon


@contextmanager
def running_bare_proxy(cores: frozenset[int] | None = None) -> Iterator[DaemonProc]:
    """Start :mod:`bench.bare_proxy` (a bare ``zmq.proxy`` process, no snapshot port),
    driven like a daemon: the baseline of the daemon CPU row."""
    with _running_forwarder([sys.executable, "-m", "bench.bare_proxy"], cores) as proxy:
        yield proxy


@contextmanager
def _running_forwarder(cmd: list[str], cores: frozenset[int] | None) -> Iterator[DaemonProc]:
    """Start ``cmd`` and yield once its ready line (``publish=EP subscribe=EP ...``) is in."""
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL, text=True, env=clean_env(), cwd=REPO,
                             start_new_session=True)
    _started_popen.append(popen)
    try:
        if cores is not None:
            # Before the interpreter has started any thread, so all inherit it; pinned
            # again below for any that was quicker than this line.
            pin_process(popen.pid, cores)
        line = _read_line_with_timeout(popen, 20.0)
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if "publish" not in fields:
            raise RuntimeError(f"daemon did not start: {line!r}")
        if cores is not None:
            pin_process(popen.pid, cores)
        daemon = DaemonProc(popen, fields["publish"], fields["subscribe"], fields["snapshot"])
        yield daemon
    finally:
        if popen.poll() is None:
            try:
                os.kill(popen.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            popen.terminate()
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=5)
        if popen in _started_popen:
            _started_popen.remove(popen)


def _read_line_with_timeout(popen: subprocess.Popen[str], timeout: float) -> str:
    result: list[str] = []

    def read() -> None:
        assert popen.stdout is not None
        result.append(popen.stdout.readline())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        raise RuntimeError(f"daemon printed no ready line within {timeout}s")
    return result[0]


def free_tcp_endpoint() -> str:
    """A loopback endpoint nothing listens on (for the "no daemon" case)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def expect(conn: Connection, tag: str, timeout: float) -> Any:
    """Receive ``(tag, payload)`` from a child within ``timeout`` or raise."""
    if not conn.poll(timeout):
        raise TimeoutError(f"no {tag!r} from child within {timeout}s")
    try:
        got_tag, payload = conn.recv()
    except EOFError:
        raise RuntimeError(f"child exited before sending {tag!r}") from None
    if got_tag == "error":
        raise RuntimeError(f"child failed: {payload}")
    if got_tag != tag:
        raise RuntimeError(f"expected {tag!r} from child, got {got_tag!r}")
    return payload


# ---------------------------------------------------------------------------- output


def fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1e5 or ax < 1e-3:
        return f"{x:.2e}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def render_table(rows: list[Row]) -> str:
    """One fixed-width table: name, value, unit, baseline, ratio, target, PASS/MISS."""
    header = ("name", "value", "unit", "baseline", "base value", "ratio", "target", "result")
    lines = [header]
    for r in rows:
        result = "INFO" if r.passed is None else ("PASS" if r.passed else "MISS")
        ratio = "-" if r.ratio is None else f"{fmt(r.ratio)}x"
        lines.append((r.name, fmt(r.value), r.unit, r.baseline_name or "-",
                      fmt(r.baseline_value), ratio, r.target or "-", result))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) if j in (0, 2, 3, 6) else str(c).rjust(w)
                             for j, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"  [{r.name}] {r.note}" for r in rows if r.note]
    if notes:
        out.append("")
        out.append("notes:")
        out.extend(notes)
    return "\n".join(out)


def write_results(rows: list[Row], path: Path) -> None:
    """results.json: a plain list of rows (the machine is named on stdout and in README)."""
    path.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")


@dataclass
class Agent:
    """A spawned child (see :mod:`bench.agents`) and the parent's end of its pipe."""

    proc: BaseProcess
    conn: Connection

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def expect(self, tag: str, timeout: float = 30.0) -> Any:
        return expect(self.conn, tag, timeout)

    def close(self) -> None:
        try:
            self.conn.send("stop")
        except (OSError, BrokenPipeError):
            pass
        stop_process(self.proc, 3.0)
        self.conn.close()


def start_agent(target: Any, spec: dict[str, Any]) -> Agent:
    """Spawn ``target(conn, spec)`` as a tracked daemonic child process."""
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=target, args=(child, spec), daemon=True)
    track(proc)
    proc.start()
    child.close()
    return Agent(proc, parent)


@contextmanager
def agents() -> Iterator[list[Agent]]:
    """A list to put started agents in; all of them are closed on the way out."""
    started: list[Agent] = []
    try:
        yield started
    finally:
        for agent in started:
            agent.close()


def sync_subscribers(publish_endpoint: str, subscribers: list[Agent], timeout: float = 20.0) -> None:
    """Block until each subscriber (connected to a daemon) sees a probe through it.

    A SUB's subscription reaches the daemon asynchronously after connect; events sent
    before that are filtered away. Rows that count loss must not count that start-up
    race, so publishers start only once a probe went end to end for every subscriber.
    """
    import zmq

    from bench.agents import PROBE_RUN
    from bus import protocol, transport

    sock = transport.publisher(publish_endpoint)
    try:
        if not transport.wait_for_subscriber(sock, timeout):
            raise TimeoutError("daemon never subscribed to the probe publisher")
        topic = protocol.make_topic(protocol.HEARTBEAT, PROBE_RUN, 0)
        payload = protocol.pack({"v": protocol.PROTOCOL_VERSION, "probe": True})
        pending = list(subscribers)
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} subscriber(s) never saw the probe")
            try:
                sock.send_multipart([topic, payload], zmq.NOBLOCK)
            except zmq.Again:
                pass
            time.sleep(0.02)
            for agent in list(pending):
                if agent.conn.poll(0):
                    agent.expect("synced", 1.0)
                    pending.remove(agent)
    finally:
        sock.close(linger=0)


@dataclass
class DrainedEmitter:
    """What :func:`emitter_into_daemon` yields: the emitter while the block runs, then (after
    it) what the draining subscriber saw (``seen["received"]``) and how many were sent."""

    emitter: Any = None
    sent: int = 0
    seen: dict[str, Any] | None = None


@contextmanager
def emitter_into_daemon(run: str) -> Iterator[DrainedEmitter]:
    """A TelemetryEmitter publishing into a real daemon that a subscriber process drains,
    with torch on one thread — the set-up of every "training with telemetry on vs off" row,
    so each measures the same path (a real socket, a real consumer) and none forgets to
    restore torch's thread count."""
    import torch

    from bench.agents import subscriber_main
    from emitter.telemetry import TelemetryEmitter

    result = DrainedEmitter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with running_daemon() as daemon, agents() as started:
            drain = start_agent(subscriber_main, {
                "endpoint": daemon.subscribe, "idle_s": 1e9,
                "prefixes": [f"ppo_update/{run}/".encode()]})
            started.append(drain)
            drain.expect("ready")
            sync_subscribers(daemon.publish, [drain])
            with TelemetryEmitter(run, 0, daemon.publish) as emitter:
                emitter.wait_for_bus(10.0)
                result.emitter = emitter
                yield result
                result.sent = emitter.sent
            drain.send("drain")
            result.seen = drain.expect("done", 30.0)
    finally:
        torch.set_num_threads(threads_before)
