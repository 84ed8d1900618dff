"""Daemon CPU per forwarded event, against a bare ``zmq.proxy`` process on the same traffic.

Why this row: the daemon's cost is paid on the machine that trains, so its CPU (every
thread of the process: libzmq's proxy and I/O threads, the cache thread) per event is
compared with libzmq's floor, a process that only runs ``zmq.proxy(XSUB, XPUB)``
(:mod:`bench.bare_proxy`). Both get the same load: the same publisher processes
(TelemetryEmitter, flat out) and the same subscriber process as the throughput row. CPU
is read from ``/proc/<pid>/task/*/schedstat`` (nanoseconds on CPU, summed over threads)
right before the publishers start and after the subscriber has everything; the order
rotates each round and rows are judged on the median of the per-round ratios
(:func:`bench.common.paired_ratio_row`), since a forwarder's CPU per event moves with the
machine's state. Every forwarder runs pinned to a core of its own and the load to the
other(s) (:class:`bench.common.CoreSplit`): left to the scheduler, the bare proxy alone
spread 1.9-9.6 µs per event within one group, by where its threads landed.

Two loads. Flat out (the publishers as fast as they can) is the stress case: the
forwarder's core is busiest, libzmq batches, and the daemon's own per-event work (the
copy of each payload into its cache) shows at its largest. Paced
at 10k ev/s (2 x 5k/s, what a big job sends: 1000 workers at 10 updates/s), the case a
training machine lives in: forwarders wake per batch of a few events, and the row says
what the daemon costs on top of libzmq's own proxy there.

A last row prices federation: a node daemon (``--upstream`` to a hub daemon of its own)
on the same traffic. Forwarding upstream is one more libzmq proxy hop inside the node's
process (an inproc tap on its PUB, a PUB sending to the hub over TCP), so that hop, the
node's CPU minus the plain daemon's in the same round, should cost what a bare proxy
costs: the bound is 1.25x, as for the daemon's own hop. (Until the cache was compiled this
row compared the node with the daemon, bound 1.5x; with the daemon itself down to a bare
proxy's cost, that quotient says "two hops cost twice one", not whether the second hop is
as cheap as libzmq's. The note keeps node/daemon.)
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from bench.common import (
    CoreSplit,
    DaemonProc,
    Row,
    core_split,
    median,
    paired_ratio_row,
    running_bare_proxy,
    running_daemon,
)
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


def _measure(forwarder: DaemonProc, pubs: int, per_pub: int, tag: str, split: CoreSplit,
             rate: float = 0.0) -> tuple[float, float]:
    """(µs of forwarder CPU per event delivered, delivered ev/s) for one run; ``rate`` per
    publisher, 0 = flat out."""
    marks: dict[str, int] = {}
    result = run_once(forwarder, pubs, 1, per_pub, tag, rate=rate,
                      load_cores=split.load,
                      on_go=lambda: marks.setdefault("start", cpu_ns(forwarder.popen.pid)),
                      on_done=lambda: marks.setdefault("end", cpu_ns(forwarder.popen.pid)))
    received = result["received"][0]
    return (marks["end"] - marks["start"]) / 1e3 / max(received, 1), result["rates"][0]


def _listed(values: list[float], fmt: str = ".2f") -> str:
    return ", ".join(f"{v:{fmt}}" for v in values)


def run(quick: bool = False) -> list[Row]:
    reps = 1 if quick else 9
    pubs = 2
    per_pub = 10_000 if quick else 30_000
    paced_rate = 5_000.0  # per publisher: 10k ev/s in all
    paced_per_pub = 2_000 if quick else 10_000
    cpu: dict[str, list[float]] = {"bare": [], "daemon": [], "node": [],
                                   "bare paced": [], "daemon paced": []}
    rates: dict[str, list[float]] = {mode: [] for mode in cpu}
    split = core_split()
    with ExitStack() as stack:
        proxy = stack.enter_context(running_bare_proxy(cores=split.forwarder))
        daemon = stack.enter_context(running_daemon(cores=split.forwarder))
        # The hub is not measured: it stays off the forwarder's core.
        hub = stack.enter_context(running_daemon(cores=split.load))
        node = stack.enter_context(running_daemon("--upstream", hub.publish, cores=split.forwarder))
        targets = {"bare": proxy, "daemon": daemon, "node": node}
        modes = list(targets)
        for rep in range(reps):
            for mode in modes[rep % 3:] + modes[:rep % 3]:  # rotate the order
                us, rate = _measure(targets[mode], pubs, per_pub, f"cpu-{mode}-{rep}", split)
                cpu[mode].append(us)
                rates[mode].append(rate)
        for rep in range(1 if quick else 3):
            for mode in ("bare", "daemon")[rep % 2:] + ("bare", "daemon")[:rep % 2]:
                us, rate = _measure(targets[mode], pubs, paced_per_pub, f"cpu-paced-{mode}-{rep}",
                                    split, rate=paced_rate)
                cpu[f"{mode} paced"].append(us)
                rates[f"{mode} paced"].append(rate)
    bare, via, node_cpu = cpu["bare"], cpu["daemon"], cpu["node"]
    upstream_hop = [node - daemon for node, daemon in zip(node_cpu, via, strict=True)]
    return [
        paired_ratio_row(
            "daemon CPU per forwarded event", via, "us", "bare zmq.proxy process", bare,
            max_ratio=1.25,
            note=f"{pubs} publisher processes flat out -> forwarder -> 1 subscriber process, "
                 f"{per_pub} ev each; CPU of every thread of the forwarder process; {reps} "
                 f"rounds, the order rotating (daemon {_listed(via)}; bare {_listed(bare)} "
                 f"us/ev; delivered daemon {_listed(rates['daemon'], '.0f')}, bare "
                 f"{_listed(rates['bare'], '.0f')} ev/s)"),
        paired_ratio_row(
            "daemon CPU per forwarded event, paced 10k ev/s", cpu["daemon paced"], "us",
            "bare zmq.proxy process", cpu["bare paced"], max_ratio=1.25,
            note=f"the same processes, each publisher paced at {paced_rate:.0f} ev/s "
                 f"({paced_per_pub} ev each); daemon {_listed(cpu['daemon paced'])}; bare "
                 f"{_listed(cpu['bare paced'])} us/ev"),
        paired_ratio_row(
            "node daemon: CPU of the upstream hop", upstream_hop, "us",
            "bare zmq.proxy process", bare, max_ratio=1.25,
            note=f"the same load through a daemon with --upstream to a hub daemon (the hub's "
                 f"CPU not counted), minus the plain daemon's CPU in the same round; node "
                 f"{_listed(node_cpu)} us/ev, node/daemon {median(node_cpu) / median(via):.2f}x; "
                 f"delivered {_listed(rates['node'], '.0f')} ev/s"),
    ]
