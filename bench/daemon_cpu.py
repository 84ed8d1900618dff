"""Daemon CPU per forwarded event, against a bare ``zmq.proxy`` process on the same traffic.

Why this row: the daemon's cost is paid on the machine that trains, so its CPU (every
thread of the process: libzmq's proxy and I/O threads, the cache thread) per event is
compared with libzmq's floor, a process that only runs ``zmq.proxy(XSUB, XPUB)``
(:mod:`bench.bare_proxy`). Both get the same load: the same publisher processes
(TelemetryEmitter, flat out) and the same subscriber process as the throughput row. CPU
is read from ``/proc/<pid>/task/*/schedstat`` (nanoseconds on CPU, summed over threads)
right before the publishers start and after the subscriber has everything; runs
alternate bare/daemon and medians are compared.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import DaemonProc, Row, median, ratio_row, running_bare_proxy, running_daemon
from bench.throughput import run_once


def cpu_ns(pid: int) -> int:
    """Nanoseconds every live thread of ``pid`` has run (schedstat's first field)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended while we looked
    return total


def _measure(forwarder: DaemonProc, pubs: int, per_pub: int, tag: str) -> tuple[float, float]:
    """(µs of forwarder CPU per event delivered, delivered ev/s) for one run."""
    marks: dict[str, int] = {}
    result = run_once(forwarder, pubs, 1, per_pub, tag,
                      on_go=lambda: marks.setdefault("start", cpu_ns(forwarder.popen.pid)),
                      on_done=lambda: marks.setdefault("end", cpu_ns(forwarder.popen.pid)))
    received = result["received"][0]
    return (marks["end"] - marks["start"]) / 1e3 / max(received, 1), result["rates"][0]


def run(quick: bool = False) -> list[Row]:
    reps = 1 if quick else 3
    pubs = 2
    per_pub = 10_000 if quick else 30_000
    bare: list[float] = []
    via: list[float] = []
    rates: dict[str, list[float]] = {"bare": [], "daemon": []}
    with running_bare_proxy() as proxy, running_daemon() as daemon:
        for rep in range(reps):
            order = ("bare", "daemon") if rep % 2 == 0 else ("daemon", "bare")
            for mode in order:
                target = proxy if mode == "bare" else daemon
                us, rate = _measure(target, pubs, per_pub, f"cpu-{mode}-{rep}")
                (bare if mode == "bare" else via).append(us)
                rates[mode].append(rate)
    return [ratio_row(
        "daemon CPU per forwarded event", median(via), "us", "bare zmq.proxy process",
        median(bare), max_ratio=1.25,
        note=f"{pubs} publisher processes flat out -> forwarder -> 1 subscriber process, "
             f"{per_pub} ev each; CPU of every thread of the forwarder process; median of "
             f"{reps} alternating runs (daemon {', '.join(f'{v:.2f}' for v in via)}; bare "
             f"{', '.join(f'{v:.2f}' for v in bare)} us/ev; delivered daemon "
             f"{', '.join(f'{r:.0f}' for r in rates['daemon'])}, bare "
             f"{', '.join(f'{r:.0f}' for r in rates['bare'])} ev/s)")]
