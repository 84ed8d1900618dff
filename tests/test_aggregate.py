"""Aggregator rollups (pure, against hand computations) and `trainbus aggregate` end to end."""

from __future__ import annotations

import json
import math
import os

import pytest

from bus import protocol
from consumers.aggregate import Aggregator, write_atomic
from consumers.fleet import band_distance, rollup
from consumers.runtime import Subscriber
from emitter.telemetry import TelemetryEmitter
from tests.conftest import ppo_fields, ppo_payload, trainbus_cmd, wait_for


def event(run: str = "r", worker: int | str = 0, seq: int = 0, session: str | None = None,
          event_type: str = "ppo_update", **fields) -> protocol.Event:
    session = session or f"{run}.s{worker}"  # one emitter per (run, worker), as in life
    if event_type == "ppo_update":
        payload = ppo_payload(run, worker, session, seq, **fields)
    else:
        payload = {"v": 1, "type": event_type, "run": run, "worker": worker, "session": session,
                   "seq": seq, "ts": 1.0, **fields}
    return protocol.decode(protocol.encode(payload))


def test_band_distance():
    assert band_distance("grad_norm", 7.0) == pytest.approx(2.0)  # 2 above the 5.0 edge
    assert band_distance("grad_norm", 0.05) == pytest.approx(0.05)  # below the 0.1 edge
    assert band_distance("grad_norm", 1.0) == pytest.approx(-0.9)  # inside: nearest edge 0.1
    assert band_distance("grad_norm", math.nan) == math.inf
    assert band_distance("explained_variance", -0.2) == pytest.approx(0.2)  # below 0.0
    assert band_distance("policy_loss", 3.0) is None  # no thresholds: no "worst"
    assert band_distance("policy_loss", math.inf) == math.inf


def test_rollup_matches_hand_computation():
    values = {0: 1.0, 1: 7.0, 2: 12.0, 3: 0.05}
    result = rollup("grad_norm", values)
    assert result["mean"] == pytest.approx((1.0 + 7.0 + 12.0 + 0.05) / 4)
    assert result["min"] == 0.05 and result["max"] == 12.0
    assert result["worst_worker"] == 2 and result["worst_value"] == 12.0  # critical beats warning
    assert result["nonfinite"] == 0 and result["workers"] == 4
    # Two warnings: the one further from the band wins (7 is 2 past 5.0; 0.05 is 0.05 under 0.1).
    assert rollup("grad_norm", {0: 7.0, 1: 0.05})["worst_worker"] == 0
    assert rollup("grad_norm", {0: 6.0, 1: 0.01, 2: 5.5})["worst_worker"] == 0
    # Low-is-bad metric: worst is the lowest explained variance.
    assert rollup("explained_variance", {0: 0.9, 1: 0.2, 2: 0.5})["worst_worker"] == 1
    # All healthy: still the one nearest an edge, ties to the lowest worker id.
    assert rollup("grad_norm", {3: 1.0, 1: 1.0})["worst_worker"] == 1


def test_rollup_keeps_nonfinite_visible():
    result = rollup("grad_norm", {0: 1.0, 1: math.nan, 2: 3.0})
    assert result["mean"] == pytest.approx(2.0) and result["min"] == 1.0 and result["max"] == 3.0
    assert result["nonfinite"] == 1 and result["worst_worker"] == 1
    assert math.isnan(result["worst_value"])
    only_nan = rollup("grad_norm", {0: math.nan})
    assert math.isnan(only_nan["mean"]) and math.isnan(only_nan["max"])
    no_bounds = rollup("policy_loss", {0: -0.1, 1: 0.2})
    assert no_bounds["worst_worker"] is None and no_bounds["mean"] == pytest.approx(0.05)


def test_aggregator_rollups_over_live_workers_only():
    agg = Aggregator(stale_after=5.0)
    grads = {0: [1.0, 2.0], 1: [4.0, 6.0], 2: [0.5, 11.0]}
    for worker, series in grads.items():
        for seq, grad in enumerate(series):
            agg.ingest(event(worker=worker, seq=seq, update=seq, grad_norm=grad,
                             approx_kl=0.01 * (worker + 1)), now=100.0)
    # Worker 2 goes silent; 0 and 1 keep talking (a heartbeat counts as alive).
    agg.ingest(event(worker=0, seq=0, event_type="heartbeat", interval_s=2.0), now=104.0)
    agg.ingest(event(worker=1, seq=2, update=2, grad_norm=8.0, approx_kl=0.02), now=104.0)
    summary = agg.summary("r", now=106.0)
    assert summary["workers_live"] == 2 and summary["workers_stale"] == 1
    assert summary["updates"] == 2
    grad = summary["metrics"]["grad_norm"]
    assert grad["mean"] == pytest.approx((2.0 + 8.0) / 2)  # latest of live workers 0 and 1
    assert (grad["min"], grad["max"], grad["worst_worker"]) == (2.0, 8.0, 1)
    kl = summary["metrics"]["approx_kl"]
    assert kl["mean"] == pytest.approx((0.01 + 0.02) / 2) and kl["worst_worker"] == 1
    assert "explained_variance" not in summary["metrics"]  # nobody measured it
    # Histories are kept per worker (10 deep), the stale one included.
    assert agg.workers[("r", 2)].history.values("grad_norm") == [0.5, 11.0]
    # The summary is valid protocol: it round-trips through the schema check.
    payload = {"v": 1, "type": "ppo_summary", "run": "r", "worker": "all", "session": "a",
               "seq": 0, "ts": 1.0, **summary}
    protocol.decode(protocol.encode(payload))


def test_due_summaries_only_for_changed_runs():
    agg = Aggregator(stale_after=5.0)
    agg.ingest(event("a", 0, 0, update=0), now=0.0)
    agg.ingest(event("b", 0, 0, update=0), now=0.0)
    assert set(agg.due_summaries(1.0)) == {"a", "b"}
    assert agg.due_summaries(1.5) == {}  # nothing new
    agg.ingest(event("a", 0, 1, update=1), now=2.0)
    assert set(agg.due_summaries(2.5)) == {"a"}
    # Run b turns stale: one more summary saying so, then silence.
    due = agg.due_summaries(6.0)
    assert set(due) == {"b"} and due["b"]["workers_live"] == 0 and due["b"]["metrics"] == {}
    assert set(agg.due_summaries(8.0)) == {"a"}  # a's worker went stale too by now
    assert agg.due_summaries(8.5) == {}
    assert agg.forget(10_000.0) == 2 and agg.workers == {}


def test_finished_workers_are_neither_live_nor_stale():
    agg = Aggregator(stale_after=5.0)
    for worker, grad in ((0, 1.0), (1, 9.0), (2, 3.0)):
        agg.ingest(event(worker=worker, seq=0, update=4 + worker, grad_norm=grad), now=0.0)
    assert agg.due_summaries(0.5)["r"]["workers_live"] == 3
    # Worker 2 closes (its closing heartbeat reached the runtime) just after it spoke.
    agg.ingest(event(worker=2, seq=0, event_type="heartbeat", interval_s=2.0, closing=True), now=1.0)
    due = agg.due_summaries(1.0)  # finishing alone makes the run due
    summary = due["r"]
    assert summary["workers_live"] == 2 and summary["workers_stale"] == 0
    assert summary["metrics"]["grad_norm"]["mean"] == pytest.approx(5.0)  # workers 0 and 1 only
    assert summary["updates"] == 5  # the highest update of a live worker
    assert agg.due_summaries(1.5) == {}
    # Much later the other two have gone quiet without closing: stale; worker 2 stays finished.
    summary = agg.due_summaries(10.0)["r"]
    assert (summary["workers_live"], summary["workers_stale"]) == (0, 2)
    snap = agg.state(10.0)
    assert snap["runs"]["r"]["workers"]["2"]["finished"] is True
    assert snap["runs"]["r"]["workers"]["2"]["live"] is False
    # Restarted (new session, not finished): live again as soon as it speaks.
    agg.ingest(event(worker=2, seq=0, session="s2-new", update=0), now=11.0)
    assert agg.workers[("r", 2)].restarts == 1
    summary = agg.due_summaries(11.0)["r"]
    assert (summary["workers_live"], summary["workers_stale"]) == (1, 2)


def test_aggregator_ignores_run_level_and_other_types_and_bounds_workers():
    agg = Aggregator(max_workers=3)
    agg.ingest(event(worker="all", event_type="ppo_summary", workers_live=1, metrics={}), now=0.0)
    agg.ingest(event(worker=0, event_type="alert", state="firing", severity="warning", rule="x",
                     metric="grad_norm", since=1.0), now=0.0)
    assert agg.workers == {}
    for worker in range(5):
        agg.ingest(event(worker=worker), now=float(worker))
    assert [w for _, w in agg.workers] == [2, 3, 4]


def test_snapshot_and_atomic_write(tmp_path):
    agg = Aggregator()
    agg.ingest(event(worker=0, seq=0, grad_norm=math.nan), now=0.0)
    snap = agg.state(1.0, wall_time=123.0)
    worker = snap["runs"]["r"]["workers"]["0"]
    assert worker["live"] and math.isnan(worker["latest"]["grad_norm"])
    path = tmp_path / "state.json"
    write_atomic(path, protocol.to_json(snap))
    loaded = json.loads(path.read_text())
    assert loaded["ts"] == 123.0
    assert loaded["runs"]["r"]["metrics"]["grad_norm"]["nonfinite"] == 1
    assert loaded["runs"]["r"]["workers"]["0"]["history"]["grad_norm"] == ["nan"]
    write_atomic(path, "{}")
    assert path.read_text() == "{}"
    assert os.listdir(tmp_path) == ["state.json"]  # no temp file left behind


def test_aggregate_process_publishes_summaries_and_snapshot_file(procs, daemon, tmp_path):
    snapshot_file = tmp_path / "agg.json"
    agg = procs.start(trainbus_cmd("aggregate", "--state-file", str(snapshot_file)), env=daemon.env)
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_summary"]) as sub, \
            TelemetryEmitter("agg", 0, daemon.publish, heartbeat_interval=None) as w0, \
            TelemetryEmitter("agg", 1, daemon.publish, heartbeat_interval=None) as w1:
        assert w0.wait_for_bus(10) and w1.wait_for_bus(10)
        summaries: list[protocol.Event] = []

        def got_both() -> bool:
            # Keep publishing until the aggregator (which may still be connecting) has seen both.
            w0.emit_ppo_update(**ppo_fields(1, grad_norm=2.0))
            w1.emit_ppo_update(**ppo_fields(1, grad_norm=12.0))
            summaries.extend(sub.poll(100))
            return any(e.get("workers_live") == 2 for e in summaries)

        wait_for(got_both, 20, message="a ppo_summary covering both workers")
        summary = next(e for e in summaries if e.get("workers_live") == 2)
        assert summary.worker == "all" and summary.run == "agg"
        grad = summary.get("metrics")["grad_norm"]
        assert grad["mean"] == pytest.approx(7.0) and grad["worst_worker"] == 1
        wait_for(snapshot_file.exists, 10, message="snapshot file")
        state = json.loads(snapshot_file.read_text())
        assert set(state["runs"]["agg"]["workers"]) == {"0", "1"}
    agg.signal(15)
    assert agg.wait(10) == 0


def test_aggregate_process_stops_counting_a_closed_worker_as_live(procs, daemon):
    agg = procs.start(trainbus_cmd("aggregate"), env=daemon.env)
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_summary"], run="fin") as sub, \
            TelemetryEmitter("fin", 1, daemon.publish, heartbeat_interval=0.2) as staying:
        leaving = TelemetryEmitter("fin", 0, daemon.publish, heartbeat_interval=0.2)
        summaries: list[protocol.Event] = []
        try:
            assert leaving.wait_for_bus(10) and staying.wait_for_bus(10)

            def both_live() -> bool:
                leaving.emit_ppo_update(**ppo_fields(1, grad_norm=2.0))
                staying.emit_ppo_update(**ppo_fields(1, grad_norm=4.0))
                summaries.extend(sub.poll(100))
                return any(e.get("workers_live") == 2 for e in summaries)

            wait_for(both_live, 20, message="a ppo_summary with both workers live")
        finally:
            leaving.close()
        seen = len(summaries)

        def one_left() -> bool:
            summaries.extend(sub.poll(100))
            return any(e.get("workers_live") == 1 for e in summaries[seen:])

        # Well within the aggregator's 5 s stale_after: only the closing heartbeat explains it.
        wait_for(one_left, 4, message="a ppo_summary without the closed worker")
        summary = next(e for e in summaries[seen:] if e.get("workers_live") == 1)
        assert summary.get("workers_stale") == 0
        assert summary.get("metrics")["grad_norm"]["mean"] == pytest.approx(4.0)
    agg.signal(15)
    assert agg.wait(10) == 0
