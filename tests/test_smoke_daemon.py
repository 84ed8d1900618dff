"""Daemon forwarding and snapshot, end to end with real sockets."""

from __future__ import annotations

import signal

from consumers.runtime import Subscriber
from emitter.telemetry import TelemetryEmitter
from tests.conftest import ppo_fields, wait_for


def test_events_flow_through_daemon_and_late_joiner_gets_history(daemon):
    with TelemetryEmitter("smoke", 0, daemon.publish, heartbeat_interval=None) as emitter:
        assert emitter.wait_for_bus(10)
        for update in range(25):
            emitter.emit_ppo_update(**ppo_fields(update))
        # A consumer started after 25 events sees the last 10 at once, from the snapshot.
        with Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_update"]) as sub:
            got = []
            wait_for(lambda: got.extend(sub.poll(50)) or len(got) >= 10, 10, message="snapshot")
            assert [e.get("update") for e in got[:10]] == list(range(15, 25))
            assert sub.stats.snapshot_events == 10
            emitter.emit_ppo_update(**ppo_fields(25))
            wait_for(lambda: got.extend(sub.poll(50)) or len(got) >= 11, 10, message="live event")
            assert got[10].get("update") == 25
            assert sub.streams[("smoke", 0)].dropped == 0


def test_daemon_exits_promptly_on_sigterm(daemon):
    daemon.proc.signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=2) == 0
