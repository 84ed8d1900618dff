"""Memory of the long-running consumers under fleet churn: does RSS stay flat?

What the rows measure. A real ``trainbus daemon`` (ephemeral loopback ports) and the four
consumers an operator leaves running for weeks — ``trainbus monitor`` (on a pseudo-terminal,
``--width 160``, 60 lines, so rich really draws every frame as it would for a person),
``trainbus aggregate``, ``trainbus alert`` and ``trainbus prometheus`` (``--port 0``, scraped
at every sample as Prometheus would) — each as its own process, while one publisher process
plays a fleet's life: **500 runs one after another, ~10 live at a time, 4 workers each, every
worker restarting 4 times (5 sessions: new session id, seq from 0, no closing heartbeat, as a
preempted worker requeued from its checkpoint does), each run's workers closing cleanly at its
end: 10,000 sessions, 1M ppo_update events** (plus heartbeats). One run in ten explodes and one
in ten goes NaN, so alert state comes and goes too. ``--quick``: 100 runs, 2,000 sessions,
100k events.

Each consumer's resident set (``VmRSS`` in ``/proc/<pid>/status``: what ``top`` shows an
operator) is sampled after 2 % of the events (the warm-up: the first runs have started,
restarted and finished, so every code path has allocated what it needs), 10, 25, 50, 75 and
100 %, and once more after the consumers were left idle for their forget time plus a margin.
At each mark the publisher pauses and the sample waits until every consumer is idle (its CPU
time stops growing): otherwise the sample would measure ZeroMQ's receive queue (up to 100k
queued messages, ~70 MB) rather than the consumer's own state, and would depend on how far
behind it happened to be.

The judged figure is **growth in the second half: RSS at the end / RSS at 50 %, target ≤ 1.10x**
per consumer, where "the end" is the idle sample: every event published and worked off, the
forget time passed. (The 100 % sample, taken as soon as the consumers look idle, still caught
a burst's queue in the monitor on a busy machine — 57 MB at 100 %, 40 MB at idle in one run
— so it is shown in the note but not judged.) Why that ratio: the live fleet is the same size all along (~10 runs × 4 workers),
so a consumer whose state follows the live fleet plateaus once the warm-up has passed and the
second half adds nothing; one that keeps something per session, per (run, worker) or per run
ever seen grows in proportion to the churn, and the second half shows it no matter how large
the interpreter and libraries are at the start (an absolute limit would mostly measure
imports). The notes give every sample, the events each consumer took in (from its own count:
the monitor's footer, the aggregator's exit line, the exporter's counter; the alert process
exposes none, so its restarts-seen log lines stand in), the restarts it saw, and for the
exporter the number of series it serves (which should also fall back after idle, not only RSS:
issue 15 asks it to drop series of streams gone away). A daemon row (INFO) shows the
last-value cache's share.

Pacing: the publisher offers ~7k events/s (the whole group runs in ~3 minutes on a 2-core
box); consumers that cannot keep up lose events at their high-water marks, which is counted
and reported, not judged: this row is about memory, not loss. Caveat: a consumer starved of
CPU (a shared machine) queues up to 100k messages inside libzmq before it drops any, and the
allocator keeps most of that memory after the queue is worked off, so a step in RSS that
appears once (rather than at every sample) is a backlog's high-water mark, not state (the
consumers hand freed heap back every 10 s: consumers.runtime.release_freed_memory). The
note's peak RSS and ``$TRAINBUS_BENCH_MEMORY_TRACE=1`` (each process's RSS and CPU share four
times a second, on stderr) tell the two apart; on a quiet machine the steps are small.

Forgetting: consumers are told to forget a stream idle for ``$TRAINBUS_BENCH_FORGET_S`` seconds
(default 5, so that pruning can show within the run; runs here live ~3 s) through every flag
in :data:`IDLE_FLAGS` that their ``--help`` offers (all four have ``--forget-after``; the
alert process gets ``--silent-after`` at half of it, since it refuses to forget a worker
before its silence can be judged).
"""

from __future__ import annotations

import fcntl
import math
import os
import pty
import random
import re
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    DaemonProc,
    Row,
    agents,
    clean_env,
    ratio_row,
    running_daemon,
    start_agent,
    start_cli,
    stop_cli,
)
from consumers.runtime import FORGET_EVERY_S, TRIM_EVERY_S

#: Env var: seconds of silence after which consumers should forget a stream (default 5).
FORGET_ENV = "TRAINBUS_BENCH_FORGET_S"
DEFAULT_FORGET_S = 5.0
#: Flags that tell a consumer to forget idle streams; each is passed (with the forget time)
#: to every consumer whose ``--help`` lists it.
IDLE_FLAGS = ("--forget-after",)
#: After the last event: wait the forget time plus this, so every consumer has had at least
#: one housekeeping pass (monitor: each frame; aggregator: each 0.5 s summary) past it, and
#: then one heap trim (every TRIM_EVERY_S, see consumers.runtime.release_freed_memory):
#: sampled before its trim, a consumer that had forgotten everything still showed the
#: burst's pages (alert: 40.7 MB at 75 %, 51 at 100 %, 50.6 eight seconds after the end).
IDLE_MARGIN_S = FORGET_EVERY_S + TRIM_EVERY_S + 2.0
#: "Flat": RSS at the end over RSS at 50 % of the events.
FLAT_MAX = 1.10
MARKS = (0.02, 0.10, 0.25, 0.50, 0.75, 1.0)
WARMUP = MARKS[0]
MONITOR_COLS, MONITOR_LINES = 160, 60
#: A consumer counts as caught up when, over IDLE_WINDOWS windows in a row, it used less than
#: this share of a core (a consumer working off a backlog uses all it is given); the monitor,
#: which keeps redrawing, when its own event count stops moving.
IDLE_CPU_SHARE = 0.10
IDLE_WINDOW_S = 0.5
IDLE_WINDOWS = 2
#: The monitor also counts the bus's own traffic (aggregator summaries of runs turning
#: stale, bus_stats, alerts), which goes on while the publisher pauses: a few per window.
MONITOR_QUIET_EVENTS = 20
DRAIN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Shape:
    """The fleet the publisher plays: ``runs`` runs started one after another, ``live_runs``
    at a time, each with ``workers`` workers of ``sessions`` sessions × ``updates`` updates."""

    runs: int
    workers: int
    sessions: int
    updates: int
    live_runs: int
    rate: float  # events/s offered

    @property
    def total(self) -> int:
        return self.runs * self.workers * self.sessions * self.updates

    @property
    def total_sessions(self) -> int:
        return self.runs * self.workers * self.sessions


FULL = Shape(runs=500, workers=4, sessions=5, updates=100, live_runs=10, rate=7000.0)
QUICK = Shape(runs=100, workers=4, sessions=5, updates=50, live_runs=10, rate=7000.0)


# ---------------------------------------------------------------------------- publisher


def churn_main(conn: Connection, spec: dict[str, Any]) -> None:
    """The fleet's life in one process: runs start every ``K`` ticks, a tick is one update
    from every worker of every live run, workers restart every ``updates`` updates and close
    (closing heartbeat) when their run ends. Pauses at each mark until told "go"."""
    try:
        from bus import protocol
        from bus.publisher import EventPublisher
        from bus.synthetic import HEARTBEAT_INTERVAL_S, SyntheticWorker, synthetic_update

        shape = Shape(**spec["shape"])
        publisher = EventPublisher(spec["endpoint"])
        try:
            conn.send(("ready", publisher.wait_for_bus(10.0)))
            if conn.recv() != "go":
                return
            _churn(conn, shape, publisher, SyntheticWorker, synthetic_update,
                   protocol, HEARTBEAT_INTERVAL_S)
        finally:
            publisher.close(linger_ms=2000)
        conn.send(("done", {"sent": publisher.sent, "dropped": publisher.dropped}))
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _churn(conn: Connection, shape: Shape, publisher: Any, worker_cls: Any, update_fn: Any,
           protocol: Any, heartbeat_s: float) -> None:
    ticks_per_run = shape.sessions * shape.updates
    start_every = max(1, ticks_per_run // shape.live_runs)
    total_ticks = (shape.runs - 1) * start_every + ticks_per_run
    marks = [max(1, round(f * shape.total)) for f in MARKS]
    live: list[tuple[int, str, list[tuple[Any, random.Random]]]] = []
    updates = heartbeats = sessions = runs_started = 0
    paced_from, paced_sent = time.perf_counter(), 0
    next_heartbeat = time.monotonic() + heartbeat_s
    send = publisher.send_frames
    for tick in range(total_ticks):
        if tick % start_every == 0 and tick // start_every < shape.runs:
            i = tick // start_every
            pattern = "explode" if i % 10 == 3 else "nan" if i % 10 == 7 else "healthy"
            name = f"membench-{i:03d}"
            live.append((tick, pattern, [(worker_cls(name, w), random.Random(i * 1000 + w))
                                         for w in range(shape.workers)]))
            runs_started += 1
            sessions += shape.workers
        finished = []
        for started, pattern, workers in live:
            u = tick - started
            restart = u > 0 and u % shape.updates == 0
            for worker, rng in workers:
                if restart:
                    worker.restart()
                    sessions += 1
                send(worker.frames(protocol.PPO_UPDATE, update_fn(pattern, u, rng)))
            updates += len(workers)
            if u == ticks_per_run - 1:
                for worker, _rng in workers:  # the run ends: each worker closes cleanly
                    send(worker.frames(protocol.HEARTBEAT, {"interval_s": heartbeat_s,
                                                            "last_update": u, "closing": True}))
                heartbeats += len(workers)
                finished.append(started)
        if finished:
            live = [entry for entry in live if entry[0] not in finished]
        now = time.monotonic()
        if now >= next_heartbeat:
            for started, _pattern, workers in live:
                for worker, _rng in workers:
                    send(worker.frames(protocol.HEARTBEAT, {"interval_s": heartbeat_s,
                                                            "last_update": tick - started}))
                    heartbeats += 1
            next_heartbeat = now + heartbeat_s
        while marks and updates >= marks[0]:
            marks.pop(0)
            conn.send(("mark", {"updates": updates, "heartbeats": heartbeats,
                                "sessions": sessions, "runs": runs_started,
                                "sent": publisher.sent, "dropped": publisher.dropped}))
            if conn.recv() != "go":
                return
            paced_from, paced_sent = time.perf_counter(), updates  # no burst after a pause
        # Pacing (not synchronisation): hold the offered rate.
        delay = paced_from + (updates - paced_sent) / shape.rate - time.perf_counter()
        if delay > 0.001:
            time.sleep(delay)


# ---------------------------------------------------------------------------- processes


def _forget_seconds() -> float:
    raw = os.environ.get(FORGET_ENV)
    if not raw:
        return DEFAULT_FORGET_S
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{FORGET_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def _idle_flags(command: str, forget_s: float) -> list[str]:
    """The idle-forget flags ``trainbus COMMAND`` understands, with the forget time."""
    help_text = subprocess.run([sys.executable, "-m", "bus.cli", command, "--help"],
                               capture_output=True, text=True, env=clean_env(), cwd=REPO,
                               timeout=60).stdout
    flags: list[str] = []
    for flag in IDLE_FLAGS:
        if re.search(rf"{re.escape(flag)}\b", help_text):
            flags += [flag, f"{forget_s:g}"]
    return flags


_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")


class PtyScreen:
    """The monitor's terminal: a pseudo-terminal of fixed size whose output a thread reads
    (and discards but for the last bytes, where the newest frame's footer is)."""

    KEEP = 512 * 1024

    def __init__(self, cols: int, lines: int) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, cols, 0, 0))
        self._tail = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the last process holding the terminal closed it
                return
            if not chunk:
                return
            with self._lock:
                self._tail += chunk
                if len(self._tail) > 2 * self.KEEP:
                    del self._tail[:-self.KEEP]

    def text(self) -> str:
        with self._lock:
            raw = bytes(self._tail[-self.KEEP:])
        return _ANSI.sub(b"", raw).decode("utf-8", "replace")

    def footer(self) -> tuple[int | None, int | None]:
        """(events, lost) from the newest footer drawn: ``12,345 events · ... lost 6``."""
        found = re.findall(r"([\d,]+) events\b.*?lost (\d+)", self.text())
        if not found:
            return None, None
        events, lost = found[-1]
        return int(events.replace(",", "")), int(lost)

    def close_slave(self) -> None:
        os.close(self.slave)

    def close(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
        os.close(self.master)


@dataclass
class Consumer:
    name: str
    popen: subprocess.Popen[bytes]
    stderr_path: Path | None = None
    stdout_path: Path | None = None
    screen: PtyScreen | None = None
    port: int | None = None
    rss: dict[str, float] = field(default_factory=dict)
    series: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    cpu_s: float = math.nan  # CPU time used while the events were published

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path else ""


def _start_consumers(daemon: DaemonProc, tmp: Path, forget_s: float) -> list[Consumer]:
    bus = ["--subscribe", daemon.subscribe, "--snapshot", daemon.snapshot]
    consumers: list[Consumer] = []

    screen = PtyScreen(MONITOR_COLS, MONITOR_LINES)
    popen = start_cli(["monitor", *bus, "--width", str(MONITOR_COLS),
                       *_idle_flags("monitor", forget_s)],
                      stdin=screen.slave, stdout=screen.slave, stderr=screen.slave)
    screen.close_slave()
    consumers.append(Consumer("monitor", popen, screen=screen))

    for name, extra in (("aggregate", ["--publish", daemon.publish]),
                        # Silence judged before the worker is forgotten (alert refuses otherwise).
                        ("alert", ["--publish", daemon.publish, "--log", str(tmp / "alerts.jsonl"),
                                   "--silent-after", f"{forget_s / 2:g}"]),
                        ("prometheus", ["--port", "0"])):
        out, err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            popen = start_cli([name, *bus, *extra, *_idle_flags(name, forget_s)],
                              stdout=stdout, stderr=stderr)
        consumers.append(Consumer(name, popen, stderr_path=err, stdout_path=out))
    return consumers


def _wait_ready(consumers: list[Consumer], timeout: float) -> None:
    """Until each consumer is connected to the daemon (and the exporter names its port)."""
    deadline = time.monotonic() + timeout
    pending = {c.name for c in consumers}
    while pending:
        for c in consumers:
            if c.name not in pending:
                continue
            if c.popen.poll() is not None:
                raise RuntimeError(f"trainbus {c.name} exited with {c.popen.returncode} at start:"
                                   f" {(c.log() or (c.screen.text() if c.screen else ''))[-1500:]}")
            if c.screen is not None:
                ok = "WAITING" in c.screen.text()
            else:
                ok = "connected to" in c.log()
                if ok and c.name == "prometheus":
                    match = re.search(r"port=(\d+)", c.stdout())
                    ok = match is not None
                    if match:
                        c.port = int(match.group(1))
            if ok:
                pending.discard(c.name)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumer(s) never connected: {', '.join(sorted(pending))}")
        time.sleep(0.05)


def _proc_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return math.nan


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def _wait_drained(consumers: list[Consumer], daemon_pid: int,
                  timeout: float = DRAIN_TIMEOUT_S) -> bool:
    """Until the queued events are worked off: over IDLE_WINDOWS windows in a row, the
    monitor's footer count hardly moved (it redraws at 4 Hz, so its CPU never falls idle) and
    every other process used less than IDLE_CPU_SHARE of a core. Several windows, because
    on a shared machine a process with a backlog can be starved of CPU for a moment and
    look idle. False if the deadline passed first."""
    def progress() -> dict[int, float]:
        out = {daemon_pid: _cpu_s(daemon_pid)}
        for c in consumers:
            if c.screen is not None:
                events, _lost = c.screen.footer()
                out[c.popen.pid] = math.nan if events is None else float(events)
            else:
                out[c.popen.pid] = _cpu_s(c.popen.pid)
        return out

    counted = {c.popen.pid for c in consumers if c.screen is not None}
    deadline = time.monotonic() + timeout
    quiet = 0
    before = progress()
    while True:
        time.sleep(IDLE_WINDOW_S)  # the measurement window itself, not a synchronisation
        after = progress()
        busy = [pid for pid in after
                if not (after[pid] - before[pid] <= MONITOR_QUIET_EVENTS if pid in counted
                        else after[pid] - before[pid] <= IDLE_CPU_SHARE * IDLE_WINDOW_S)]
        quiet = 0 if busy else quiet + 1
        if quiet >= IDLE_WINDOWS:
            return True
        if time.monotonic() > deadline:
            return False
        before = after


class Sampler:
    """Reads every process's RSS and CPU time every ``interval`` seconds on a thread, for the
    peak RSS (what an operator must provision: transients such as a decoded backlog count
    there, but not in the paused samples) and, with ``$TRAINBUS_BENCH_MEMORY_TRACE`` set, a
    trace on stderr for finding where a jump came from."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25) -> None:
        self.pids = pids
        self.peak: dict[str, float] = dict.fromkeys(pids, 0.0)
        self.trace = bool(os.environ.get("TRAINBUS_BENCH_MEMORY_TRACE"))
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last_cpu = {name: _cpu_s(pid) for name, pid in self.pids.items()}
        t0 = time.monotonic()
        while not self._stop.wait(self._interval):
            parts = []
            for name, pid in self.pids.items():
                rss = _proc_rss_mb(pid)
                if rss > self.peak[name]:
                    self.peak[name] = rss
                if self.trace:
                    cpu = _cpu_s(pid)
                    parts.append(f"{name} {rss:.0f}MB {(cpu - last_cpu[name]) / self._interval:.0%}")
                    last_cpu[name] = cpu
            if self.trace:
                print(f"[memory] {time.monotonic() - t0:6.1f}s " + " ".join(parts),
                      file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def _scrape(port: int) -> tuple[int, int | None]:
    """(series served, trainbus_exporter_events_total) from one /metrics scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    series = 0
    events = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series += 1
        if line.startswith("trainbus_exporter_events_total "):
            events = int(float(line.split()[1]))
    return series, events


def _sample(label: str, consumers: list[Consumer], daemon: DaemonProc,
            daemon_rss: dict[str, float]) -> None:
    for c in consumers:
        c.rss[label] = _proc_rss_mb(c.popen.pid)
    daemon_rss[label] = _proc_rss_mb(daemon.popen.pid)
    for c in consumers:  # after the RSS readings: a scrape allocates a reply
        if c.port is not None:
            series, events = _scrape(c.port)
            c.series[label] = series
            if events is not None:
                c.events[label] = events
        elif c.screen is not None:
            events, _lost = c.screen.footer()
            if events is not None:
                c.events[label] = events


# ---------------------------------------------------------------------------- the group


def _label(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _measure(shape: Shape, forget_s: float) -> dict[str, Any]:
    daemon_rss: dict[str, float] = {}
    marks: list[dict[str, Any]] = []
    not_drained: list[str] = []
    exit_codes: dict[str, int | None] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trainbus-membench-") as tmp, \
            running_daemon() as daemon, agents() as started:
        consumers = _start_consumers(daemon, Path(tmp), forget_s)
        try:
            _wait_ready(consumers, 60.0)
            churn = start_agent(churn_main, {"endpoint": daemon.publish,
                                             "shape": shape.__dict__})
            started.append(churn)
            if not churn.expect("ready", 60.0):
                raise TimeoutError("the churn publisher never saw the daemon subscribe")
            churn.send("go")
            t_pub = time.perf_counter()
            pids = [c.popen.pid for c in consumers] + [daemon.popen.pid]
            cpu0 = {pid: _cpu_s(pid) for pid in pids}
            sampler = Sampler({**{c.name: c.popen.pid for c in consumers},
                               "daemon": daemon.popen.pid, "publisher": churn.proc.pid or 0})
            for fraction in MARKS:
                marks.append(churn.expect("mark", 600.0))
                if not _wait_drained(consumers, daemon.popen.pid):
                    not_drained.append(_label(fraction))
                _sample(_label(fraction), consumers, daemon, daemon_rss)
                churn.send("go")
            published = churn.expect("done", 60.0)
            publish_s = time.perf_counter() - t_pub
            for c in consumers:
                c.cpu_s = _cpu_s(c.popen.pid) - cpu0[c.popen.pid]
            daemon_cpu_s = _cpu_s(daemon.popen.pid) - cpu0[daemon.popen.pid]
            # Forgetting is time-based: the idle wait is the condition being measured.
            time.sleep(forget_s + IDLE_MARGIN_S)
            if not _wait_drained(consumers, daemon.popen.pid):
                not_drained.append("idle")
            _sample("idle", consumers, daemon, daemon_rss)
            sampler.stop()
        finally:
            for c in consumers:
                exit_codes[c.name] = stop_cli(c.popen)
            for c in consumers:
                if c.screen is not None:
                    c.screen.close()
        final_events, final_lost = consumers[0].screen.footer() if consumers[0].screen else (None, None)
        logs = {c.name: c.log() for c in consumers}
        notes_out = {c.name: c.stdout() for c in consumers}
    return {"consumers": consumers, "daemon_rss": daemon_rss, "marks": marks,
            "published": published, "publish_s": publish_s, "daemon_cpu_s": daemon_cpu_s, "not_drained": not_drained,
            "exit_codes": exit_codes, "peak": sampler.peak, "logs": logs, "stdout": notes_out,
            "monitor_final": (final_events, final_lost), "seconds": time.perf_counter() - t0}


def _intake(c: Consumer, result: dict[str, Any]) -> str:
    """What this consumer says it took in, from its own count (or the best stand-in)."""
    log = result["logs"][c.name]
    restarts = log.count(" restarted (new session ")
    if c.name == "monitor":
        events, lost = result["monitor_final"]
        return (f"took in {events:,} events, lost {lost} (its footer)" if events is not None
                else "took in ? events (no footer read)")
    if c.name == "aggregate":
        m = re.search(r"stopped: (\d+) event\(s\) aggregated", log)
        took = f"took in {int(m.group(1)):,} events (exit line)" if m else "no exit line"
        return f"{took}, {restarts:,} restarts seen"
    if c.name == "prometheus":
        events = c.events.get("idle")
        series = ", ".join(f"{k} {v:,}" for k, v in c.series.items() if k in ("50%", "100%", "idle"))
        return (f"took in {events:,} events (exporter counter), {restarts:,} restarts seen; "
                f"series served: {series}" if events is not None else f"series: {series}")
    notes = sum(1 for line in result["stdout"][c.name].splitlines() if line.strip())
    return (f"events taken in: not exposed; {restarts:,} restarts seen (log), "
            f"{notes:,} notification line(s)")


def _rows(shape: Shape, forget_s: float, result: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    sent = result["marks"][-1]
    scale = (f"{shape.total // 1000:,}k ev, {shape.total_sessions // 1000:g}k sessions, "
             f"{shape.runs} runs")
    mid, end = _label(0.5), "idle"
    for c in result["consumers"]:
        rss = c.rss
        trail = " → ".join(f"{k} {v:.1f}" for k, v in rss.items())
        note = (f"RSS MB: {trail} (start = after the {WARMUP * 100:g}% warm-up; idle = "
                f"{forget_s + IDLE_MARGIN_S:g}s after the last event, forget {forget_s:g}s); "
                f"{_intake(c, result)}")
        code = result["exit_codes"].get(c.name)
        note += f"; peak RSS {result['peak'][c.name]:.0f} MB; CPU {c.cpu_s:.0f}s ({c.cpu_s / result['publish_s']:.0%} of a core)"
        if code not in (0, None):
            note += f"; exit code {code}"
        rows.append(ratio_row(f"memory: {c.name} RSS end vs 50% ({scale})", rss[end], "MB",
                              "RSS at 50%", rss[mid], max_ratio=FLAT_MAX,
                              target=f"<= {FLAT_MAX:g}x (flat)", note=note))
    d = result["daemon_rss"]
    rows.append(Row(f"memory: daemon RSS end vs 50% ({scale})", d[end], "MB", "RSS at 50%",
                    d[mid], d[end] / d[mid] if d[mid] else None, "-", None,
                    note=(f"RSS MB: {' → '.join(f'{k} {v:.1f}' for k, v in d.items())}; "
                          f"published {sent['updates']:,} ppo_update + {sent['heartbeats']:,} "
                          f"heartbeats in {sent['sessions']:,} sessions over {sent['runs']} runs "
                          f"({result['published']['dropped']} dropped at the sender), "
                          f"{result['publish_s']:.0f}s at ~{shape.rate:g} ev/s offered; daemon CPU "
                          f"{result['daemon_cpu_s'] / result['publish_s']:.0%} of a core; "
                          f"group {result['seconds']:.0f}s"
                          + (f"; not idle within {DRAIN_TIMEOUT_S:g}s at "
                             f"{', '.join(result['not_drained'])}" if result["not_drained"] else ""))))
    return rows


def run(quick: bool = False) -> list[Row]:
    shape = QUICK if quick else FULL
    forget_s = _forget_seconds()
    result = _measure(shape, forget_s)
    return _rows(shape, forget_s, result)
