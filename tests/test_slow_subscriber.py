"""A stalled subscriber never slows publishers or the other subscribers.

Why real processes and ipc: the daemon's XPUB queue toward each subscriber is bounded
(SNDHWM), and what overflows it is dropped for that subscriber alone. Proving it needs a
subscriber that truly stops reading while the daemon (a separate process) forwards a burst
bigger than every queue between them; ipc keeps the kernel's socket buffers small, so the
overflow comes from ZeroMQ's bounds, not from megabytes of TCP buffer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from consumers.runtime import Subscriber
from tests.conftest import ProcessGroup, start_daemon, wait_for

BURST = 40_000  # > daemon XPUB SNDHWM (20 000) + socket buffers + the stalled RCVHWM
TAIL_EVENTS = 100

RATE = 20_000  # events/s: far above any PPO run, and what a healthy consumer here sustains

#: A training process stand-in: a fast stream (chunks of 100 at full speed, paced to RATE),
#: then (on a stdin line) a slow tail of events, so the stalled subscriber has something to
#: measure its gap against.
BURST_SCRIPT = r"""
import json, sys, time
from emitter.telemetry import TelemetryEmitter
from tests.conftest import ppo_fields

endpoint, burst, tail, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
emitter = TelemetryEmitter("burst", 0, endpoint, sndhwm=200_000, heartbeat_interval=None)
assert emitter.wait_for_bus(10)
fields = ppo_fields(0)
worst = 0.0
busy = 0.0
start = time.perf_counter()
for update in range(burst):
    fields["update"] = update
    t0 = time.perf_counter()
    emitter.emit_ppo_update(**fields)
    cost = time.perf_counter() - t0
    busy += cost
    worst = max(worst, cost)
    if update % 100 == 99:
        delay = start + (update + 1) / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
elapsed = time.perf_counter() - start
print(json.dumps({"phase": "burst", "elapsed": elapsed, "busy": busy, "worst": worst}), flush=True)
sys.stdin.readline()
for update in range(burst, burst + tail):
    fields["update"] = update
    emitter.emit_ppo_update(**fields)
    time.sleep(0.001)
emitter.close()
print(json.dumps({"phase": "done", "sent": emitter.sent, "dropped": emitter.dropped}), flush=True)
"""


def _drain(sub: Subscriber, into: list, until) -> None:
    wait_for(lambda: into.extend(sub.poll(50)) or until(), 30, interval=0,
             message="subscriber to catch up")


def _run_burst(procs: ProcessGroup, publish: str, healthy: Subscriber,
               stalled: Subscriber | None) -> tuple[dict, list, list]:
    """One burst + tail through the daemon; the healthy subscriber is polled throughout,
    the stalled one only once the burst is over."""
    emitter = procs.start([sys.executable, "-c", BURST_SCRIPT, publish, str(BURST),
                           str(TAIL_EVENTS), str(RATE)], stdin=subprocess.PIPE)
    fast: list = []
    started = time.monotonic()
    _drain(healthy, fast, lambda: len(fast) >= BURST)
    healthy_elapsed = time.monotonic() - started
    burst = json.loads(emitter.stdout.wait_for_line(r'"phase": "burst"', 30).string)
    burst["healthy_elapsed"] = healthy_elapsed
    slow: list = []
    if stalled is not None:
        # Reading again: take whatever the bounded queues kept, until nothing more comes.
        def drained() -> bool:
            batch = stalled.poll(200)
            slow.extend(batch)
            return not batch
        wait_for(drained, 30, interval=0, message="stalled subscriber to drain")
    assert emitter.popen.stdin is not None
    emitter.popen.stdin.write("go\n")
    emitter.popen.stdin.flush()
    total = BURST + TAIL_EVENTS
    _drain(healthy, fast, lambda: len(fast) >= total)
    if stalled is not None:
        _drain(stalled, slow, lambda: bool(slow) and slow[-1].seq == total - 1)
    assert emitter.wait(timeout=15) == 0, emitter.stderr.text()
    done = json.loads(emitter.stdout.wait_for_line(r'"phase": "done"', 5).string)
    assert done == {"phase": "done", "sent": total, "dropped": 0}
    return burst, fast, slow


def test_stalled_subscriber_does_not_slow_publisher_or_others(procs: ProcessGroup,
                                                              tmp_path: Path) -> None:
    eps = {role: f"ipc://{tmp_path}/{role}.ipc" for role in ("publish", "subscribe", "snapshot")}
    daemon = start_daemon(procs, "--stats-interval", "0.5", **eps)
    healthy = Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_update"])
    stalled = Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_update"], rcvhwm=100)
    try:
        for sub in (healthy, stalled):
            wait_for(lambda s=sub: s.poll(50) is not None and s.stats.snapshots >= 1, 10,
                     interval=0, message="subscriber connected")
        burst, fast, slow = _run_burst(procs, daemon.publish, healthy, stalled)
    finally:
        healthy.close()
        stalled.close()

    total = BURST + TAIL_EVENTS
    # The healthy subscriber got every event, in order, with nothing counted as lost.
    assert [e.seq for e in fast] == list(range(total))
    assert healthy.stats.dropped_total == 0
    # The stalled one lost part of the burst, and counted exactly what it lost.
    seqs = [e.seq for e in slow]
    assert seqs == sorted(set(seqs)) and seqs[0] == 0 and seqs[-1] == total - 1
    dropped = stalled.streams[("burst", 0)].dropped
    assert dropped > 0, "the burst should have overflowed the stalled subscriber's queues"
    assert len(seqs) + dropped == total
    # ...after the daemon had queued its documented 20 000 events for it (regression: the
    # daemon set its high-water marks after bind(), so ZeroMQ's default of 1000 applied).
    assert len(seqs) >= 20_000
    assert stalled.stats.dropped_by_type["ppo_update"] == dropped
    print(f"stalled subscriber: publisher emitted {BURST} in {burst['elapsed']:.2f} s at "
          f"{RATE}/s target ({burst['busy'] / BURST * 1e6:.1f} us/emit, worst "
          f"{burst['worst'] * 1e3:.2f} ms); healthy subscriber had all {BURST} after "
          f"{burst['healthy_elapsed']:.2f} s; stalled kept {len(seqs)} and counted {dropped} dropped")
    # Never blocked: a send that waited on the stalled queue would wait for ever; the bound
    # only allows for the scheduler of a busy 2-core machine.
    assert burst["worst"] < 1.0
