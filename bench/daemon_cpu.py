"""Daemon CPU per forwarded event, against a bare ``zmq.proxy`` process on the same traffic.

Why this row: the daemon's cost is paid on the machine that trains, so its CPU (every
thread of the process: libzmq's proxy and I/O threads, the cache thread) per event is
compared with libzmq's floor, a process that only runs ``zmq.proxy(XSUB, XPUB)``
(:mod:`bench.bare_proxy`). Both get the same load: the same publisher processes
(TelemetryEmitter, flat out) and the same subscriber process as the throughput row. CPU
is read from ``/proc/<pid>/task/*/schedstat`` (nanoseconds on CPU, summed over threads)
right before the publishers start and after the subscriber has everything; runs
alternate bare/daemon and medians are compared.

A second row prices federation: a node daemon (``--upstream`` to a hub daemon of its own)
on the same traffic, against the plain daemon in the same run. Forwarding upstream is one
more libzmq proxy hop inside the node's process (an inproc tap on its PUB, a PUB sending
to the hub over TCP), so it should cost about what a bare proxy costs, not a Python loop:
the bound is 1.5x the daemon alone.
"""

from __future__ import annotations

from contextlib import ExitStack
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
    cpu: dict[str, list[float]] = {"bare": [], "daemon": [], "node": []}
    rates: dict[str, list[float]] = {"bare": [], "daemon": [], "node": []}
    with ExitStack() as stack:
        proxy = stack.enter_context(running_bare_proxy())
        daemon = stack.enter_context(running_daemon())
        hub = stack.enter_context(running_daemon())
        node = stack.enter_context(running_daemon("--upstream", hub.publish))
        targets = {"bare": proxy, "daemon": daemon, "node": node}
        modes = list(targets)
        for rep in range(reps):
            for mode in modes[rep % 3:] + modes[:rep % 3]:  # rotate the order
                us, rate = _measure(targets[mode], pubs, per_pub, f"cpu-{mode}-{rep}")
                cpu[mode].append(us)
                rates[mode].append(rate)
    bare, via, node_cpu = cpu["bare"], cpu["daemon"], cpu["node"]
    return [
        ratio_row(
            "daemon CPU per forwarded event", median(via), "us", "bare zmq.proxy process",
            median(bare), max_ratio=1.25,
            note=f"{pubs} publisher processes flat out -> forwarder -> 1 subscriber process, "
                 f"{per_pub} ev each; CPU of every thread of the forwarder process; median of "
                 f"{reps} runs in rotating order (daemon {', '.join(f'{v:.2f}' for v in via)}; "
                 f"bare {', '.join(f'{v:.2f}' for v in bare)} us/ev; delivered daemon "
                 f"{', '.join(f'{r:.0f}' for r in rates['daemon'])}, bare "
                 f"{', '.join(f'{r:.0f}' for r in rates['bare'])} ev/s)"),
        ratio_row(
            "node daemon CPU per event, forwarding upstream", median(node_cpu), "us",
            "the same daemon without --upstream", median(via), max_ratio=1.5,
            note=f"the same load through a daemon with --upstream to a hub daemon (the hub's "
                 f"CPU not counted); node {', '.join(f'{v:.2f}' for v in node_cpu)} us/ev; "
                 f"delivered {', '.join(f'{r:.0f}' for r in rates['node'])} ev/s"),
    ]
