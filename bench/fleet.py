"""A fleet of 1000 workers on one machine: does every process keep up, and at what cost?

What the rows measure. A real ``trainbus daemon`` (ephemeral loopback ports), and what an
operator runs beside a big job: ``trainbus monitor`` (on a pseudo-terminal, 160 x 60, so it
really draws its fleet view 4 times a second), ``trainbus aggregate`` and ``trainbus
alert``. Four ``trainbus publish`` processes (``--workers 250 --worker-offset 0/250/500/750``)
play one run of 1000 workers at 1 update/s each, for DURATION_S seconds. Per process: its
CPU share of one core over the steady part of the run (after a warm-up), and its lag — how
long after the last event it was still working its backlog off (the bench waits until
every process is idle again: less than 10 % of a core, the monitor's footer count still).
Lost: the monitor's own footer ("lost N": sequence gaps it saw); taken in: the monitor's
event count and the aggregator's exit line, against what the publishers sent.

Why these rows. DESIGN.md's consumers must hold a fleet's whole stream on a laptop-class
machine; a process that needs more than its share of the two cores shows up here as a lag
that grows with the run, and a lost count above zero is the bus failing its users.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Row, running_daemon, start_cli, stop_cli
from bench.memory import (
    MONITOR_COLS,
    MONITOR_LINES,
    Consumer,
    PtyScreen,
    _cpu_s,
    _wait_drained,
    _wait_ready,
)

WORKERS = 1000
PUBLISHERS = 4
RATE_HZ = 1.0
DURATION_S = 60
QUICK_DURATION_S = 20
WARMUP_S = 8.0
RUN = "fleet1000"
#: How soon after the last event every process should be idle again (informational; the
#: pass/fail is "nothing lost, everything taken in").
LAG_MAX_S = 5.0


def _start(daemon: Any, tmp: Path) -> list[Consumer]:
    bus = ["--subscribe", daemon.subscribe, "--snapshot", daemon.snapshot]
    screen = PtyScreen(MONITOR_COLS, MONITOR_LINES)
    monitor = start_cli(["monitor", *bus, "--width", str(MONITOR_COLS)],
                        stdin=screen.slave, stdout=screen.slave, stderr=screen.slave)
    screen.close_slave()
    consumers = [Consumer("monitor", monitor, screen=screen)]
    for name, extra in (("aggregate", ["--publish", daemon.publish]),
                        ("alert", ["--publish", daemon.publish, "--log", str(tmp / "alerts.jsonl")])):
        out, err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            popen = start_cli([name, *bus, *extra], stdout=stdout, stderr=stderr)
        consumers.append(Consumer(name, popen, stderr_path=err, stdout_path=out))
    return consumers


def _measure(duration: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-fleet-") as tmp_name, \
            running_daemon() as daemon:
        tmp = Path(tmp_name)
        consumers = _start(daemon, tmp)
        publishers = []
        try:
            _wait_ready(consumers, 30.0)
            per = WORKERS // PUBLISHERS
            for i in range(PUBLISHERS):
                with open(tmp / f"pub{i}.out", "wb") as out, open(tmp / f"pub{i}.err", "wb") as err:
                    publishers.append(start_cli(
                        ["publish", "--publish", daemon.publish, "--run", RUN, "--workers",
                         str(per), "--worker-offset", str(i * per), "--rate", f"{RATE_HZ:g}",
                         "--count", str(duration), "--seed", str(i)], stdout=out, stderr=err))
            pids = {"daemon": daemon.popen.pid, **{c.name: c.popen.pid for c in consumers},
                    **{f"publisher {i}": p.pid for i, p in enumerate(publishers)}}
            time.sleep(WARMUP_S)  # the measurement window starts after the warm-up
            t0 = time.monotonic()
            cpu0 = {name: _cpu_s(pid) for name, pid in pids.items()}
            while any(p.poll() is None for p in publishers):
                time.sleep(0.2)  # publishers pace themselves; this only notices their end
            t1 = time.monotonic()
            cpu1 = {name: _cpu_s(pid) for name, pid in pids.items() if not name.startswith("pub")}
            published_at = t1
            drained = _wait_drained(consumers, daemon.popen.pid, timeout=60.0)
            lag = time.monotonic() - published_at
            events, lost = consumers[0].screen.footer() if consumers[0].screen else (None, None)
            shares = {name: (cpu1[name] - cpu0[name]) / (t1 - t0) for name in cpu1}
            for c in consumers:
                stop_cli(c.popen)
            aggregated = None
            m = re.search(r"stopped: (\d+) event\(s\) aggregated", consumers[1].log())
            if m:
                aggregated = int(m.group(1))
            return {"shares": shares, "lag": lag, "drained": drained, "events": events,
                    "lost": lost, "aggregated": aggregated, "sent": WORKERS * duration,
                    "window": t1 - t0}
        finally:
            for p in publishers:
                stop_cli(p)
            for c in consumers:
                if c.popen.poll() is None:
                    stop_cli(c.popen)
                if c.screen is not None:
                    c.screen.close()


def run(quick: bool = False) -> list[Row]:
    duration = QUICK_DURATION_S if quick else DURATION_S
    r = _measure(duration)
    scale = f"{WORKERS} workers x {RATE_HZ:g}/s"
    sent = r["sent"]
    events, lost = r["events"], r["lost"]
    ok = lost == 0 and events is not None and events >= sent and r["drained"]
    took = "?" if events is None else f"{events:,}"
    aggregated = "?" if r["aggregated"] is None else f"{r['aggregated']:,}"
    rows = [Row(f"fleet: lost at the monitor ({scale}, {PUBLISHERS} publishers)",
                float(lost) if lost is not None else math.nan, "events", "sent", float(sent),
                None, "0 lost, all taken in", ok,
                f"monitor took in {took} events (heartbeats included) of {sent:,} updates sent; "
                f"aggregator {aggregated}; backlog worked off {r['lag']:.1f}s after the last event")]
    for name in ("daemon", "monitor", "aggregate", "alert"):
        share = r["shares"].get(name, math.nan)
        rows.append(Row(f"fleet: {name} CPU share ({scale})", share * 100, "% core", "", None,
                        None, "", None,
                        f"over {r['window']:.0f}s of steady state; every process idle again "
                        f"{r['lag']:.1f}s after the last event (a bound on its lag: the idle check "
                        f"itself takes 1 s; {LAG_MAX_S:g}s expected)"))
    return rows
