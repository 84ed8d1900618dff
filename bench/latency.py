"""Latency emit → consumer at 1k events/s: through the daemon vs a direct PUB→SUB link.

One publisher process emits paced ppo_updates (TelemetryEmitter) carrying
``bench_t0_ns = time.monotonic_ns()`` taken just before ``emit_ppo_update``; one
subscriber process takes ``time.monotonic_ns()`` after ``protocol.decode``. Both read the
same system-wide CLOCK_MONOTONIC, so each difference is a one-way latency including the
emit, the hop(s) and the decode. Direct, bare-proxy and daemon runs alternate, the order
rotating; p50/p99 are taken per run (the first 5% of each run, connection warm-up,
discarded). The p50 rows are judged on the median of per-round ratios
(:func:`bench.common.paired_ratio_row`): this box's wake-up latency drifts over a group
(direct p50 moved 126-229 µs within one), so a ratio is taken between runs seconds apart.
Nothing is pinned here: a one-way latency is wake-ups, and pinning the forwarder to a
core of its own made every hop into and out of it a cross-core wake-up (direct's
publisher and subscriber then shared a core), which is not the comparison. The bare
``zmq.proxy`` process (:mod:`bench.bare_proxy`) prices the forwarding hop itself (two more
thread hand-offs and a TCP hop, in libzmq), which any forwarder pays: the daemon is judged
against it as well as against the direct link. A last mode, a bare pipe between two processes at the same pacing, measures how
late this machine wakes a blocked process at all: the floor under any p99.
"""

from __future__ import annotations

import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from bench.agents import publisher_main, subscriber_main
from bench.common import (
    SPAWN,
    DaemonProc,
    Row,
    agents,
    median,
    paired_ratio_row,
    percentile,
    running_bare_proxy,
    running_daemon,
    start_agent,
    sync_subscribers,
)

RATE = 1000


def pipe_reader_main(conn: Connection, spec: dict[str, Any]) -> None:
    """The machine's floor: one-way latency of a bare pipe write → blocked read."""
    try:
        pipe: Connection = spec["pipe"]
        conn.send(("ready", None))
        latencies = []
        while True:
            t0 = int.from_bytes(pipe.recv_bytes(), "little")
            if t0 == 0:
                break
            latencies.append(time.monotonic_ns() - t0)
        conn.send(("done", latencies))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _pipe_floor(n: int) -> list[float]:
    """Same pacing and processes, no ZeroMQ, no bus code: how late this box wakes a
    blocked process. A p99 above 1 ms here is the machine, not the bus."""
    read_end, write_end = SPAWN.Pipe(duplex=False)
    with agents() as started:
        reader = start_agent(pipe_reader_main, {"pipe": read_end})
        started.append(reader)
        read_end.close()
        reader.expect("ready")
        start = time.perf_counter()
        try:
            for i in range(n):
                delay = start + i / RATE - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                write_end.send_bytes(time.monotonic_ns().to_bytes(8, "little"))
            write_end.send_bytes((0).to_bytes(8, "little"))
        finally:
            write_end.close()
        lat = [ns / 1e3 for ns in reader.expect("done", 30.0)]
    return lat[len(lat) // 20:]


def _one_run(daemon: DaemonProc | None, n: int, tag: str) -> list[float]:
    """One-way latencies in µs of ``n`` events at RATE ev/s."""
    with agents() as started:
        spec = {"expected": n, "idle_s": 3.0, "latency": True,
                "prefixes": [f"ppo_update/{tag}/".encode()]}
        if daemon is None:
            spec["bind"] = True
        else:
            spec["endpoint"] = daemon.subscribe
        sub = start_agent(subscriber_main, spec)
        started.append(sub)
        endpoint = sub.expect("ready")
        if daemon is not None:
            sync_subscribers(daemon.publish, [sub])
        pub = start_agent(publisher_main, {
            "endpoint": endpoint if daemon is None else daemon.publish, "run": tag,
            "worker": 0, "n": n, "rate": RATE, "stamp": True})
        started.append(pub)
        if not pub.expect("ready", 60.0):
            raise TimeoutError("publisher never saw its subscriber")
        pub.send("go")
        pub.expect("done", 60.0 + n / RATE)
        seen = sub.expect("done", 30.0)
        pub.send("close")
    lat = [ns / 1e3 for ns in seen["latencies_ns"]]
    return lat[len(lat) // 20:]


def run(quick: bool = False) -> list[Row]:
    reps = 1 if quick else 6
    n = 1000 if quick else 2500
    modes = ("direct", "bare", "daemon", "pipe")
    p50: dict[str, list[float]] = {mode: [] for mode in modes}
    p99: dict[str, list[float]] = {mode: [] for mode in modes}
    with running_bare_proxy() as proxy, running_daemon() as daemon:
        forwarders: dict[str, DaemonProc | None] = {"direct": None, "bare": proxy,
                                                    "daemon": daemon}
        for rep in range(reps):
            for mode in modes[rep % 4:] + modes[:rep % 4]:  # rotate the order
                if mode == "pipe":
                    lat = _pipe_floor(n)
                else:
                    lat = _one_run(forwarders[mode], n, f"lat-{mode}-{rep}")
                p50[mode].append(percentile(lat, 50))
                p99[mode].append(percentile(lat, 99))
    d99, x99 = median(p99["daemon"]), median(p99["direct"])
    runs = (f"{reps} runs in rotating order x {n} ev at {RATE} ev/s; per-run p50 daemon "
            f"{', '.join(f'{v:.0f}' for v in p50['daemon'])} / bare proxy "
            f"{', '.join(f'{v:.0f}' for v in p50['bare'])} / direct "
            f"{', '.join(f'{v:.0f}' for v in p50['direct'])} us")
    f50, f99 = median(p50["pipe"]), median(p99["pipe"])
    bare_vs_direct = median([b / x for b, x in zip(p50["bare"], p50["direct"], strict=True)])
    rows = [
        paired_ratio_row("latency p50 via daemon", p50["daemon"], "us", "direct PUB->SUB p50",
                         p50["direct"], max_ratio=1.5,
                         note=f"{runs}; a bare zmq.proxy process gave {bare_vs_direct:.2f}x "
                              "direct (paired)"),
        paired_ratio_row("latency p50 via daemon vs a bare zmq.proxy process", p50["daemon"],
                         "us", "bare zmq.proxy p50", p50["bare"], max_ratio=1.15,
                         note="the same runs: what the daemon adds to the forwarding hop itself"),
        Row("latency p99 via daemon", d99, "us", "direct PUB->SUB p99", x99, d99 / x99,
            "< 1000 us absolute", d99 < 1000.0,
            note=f"per-run p99 daemon {', '.join(f'{v:.0f}' for v in p99['daemon'])} / direct "
                 f"{', '.join(f'{v:.0f}' for v in p99['direct'])} us; this box's own wake-up "
                 f"floor (pipe, same pacing) p99 {f99:.0f} us"),
        Row("machine floor: pipe wake-up p99", f99, "us", "pipe p50", f50, None, "report", None,
            note="two processes, a bare pipe at the same 1k/s pacing, no ZeroMQ: when this p99 "
                 "is near or above 1 ms the box itself cannot show a sub-ms p99; per-run p99 "
                 f"{', '.join(f'{v:.0f}' for v in p99['pipe'])} us"),
    ]
    return rows
