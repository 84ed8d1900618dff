"""The fleet model and the runtime's accounting: one per-worker state for every view, and
memory that follows the live workers, not every session a long-lived consumer ever saw."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bus import protocol
from consumers.alerting.engine import AlertEngine
from consumers.alerting.rules import default_rules
from consumers.fleet import CRITICAL, DONE, NAN, OK, STALE, WARNING, Fleet, percentile
from consumers.prometheus_exporter import BusCollector, ExporterState
from consumers.runtime import StreamBook
from tests.conftest import ppo_payload


def update(run: str, worker: int, session: str, seq: int, **fields) -> protocol.Event:
    fields.setdefault("update", seq)
    return protocol.decode(protocol.encode(ppo_payload(run, worker, session, seq, **fields)))


def heartbeat(run: str, worker: int, session: str, seq: int, **fields) -> protocol.Event:
    payload = {"v": 1, "type": "heartbeat", "run": run, "worker": worker, "session": session,
               "seq": seq, "ts": 1.0, "interval_s": 2.0, **fields}
    return protocol.decode(protocol.encode(payload))


# --------------------------------------------------------------------- StreamBook


def test_book_memory_follows_live_sessions_not_history():
    """10,000 sessions over 500 runs: once idle ones are forgotten, what is left is what
    is live; restarts counted meanwhile, and nothing is lost or doubled by the pruning."""
    book = StreamBook(forget_after=30.0)
    now = 0.0
    for session_index in range(10_000):
        run = f"run{session_index % 500}"
        worker = (session_index // 500) % 4
        session = f"s{session_index}"
        for seq in range(3):
            assert book.record(update(run, worker, session, seq), now) == 0
        now += 0.01
        if session_index % 1000 == 999:
            book.forget(now)
    # A (run, worker) restarts every 20 s of this clock (2000 of them, each kept), and a
    # session's sequence book goes 30 s after its last event: about 3000 books, not 10,000.
    assert len(book.streams) == 2000 and len(book) <= 3100
    stream = book.streams[("run499", 3)]
    assert stream.restarts >= 1 and stream.updates_received == 3 * stream.sessions_seen
    book.forget(now + 31)
    assert book.forgotten == 2000
    assert len(book.streams) == 0 and len(book) == 0


def test_book_bounds_streams_and_sequences_under_a_flood():
    book = StreamBook(max_streams=100)
    for i in range(5000):
        book.record(update(f"flood{i}", 0, f"x{i}", 0), float(i))
    assert len(book.streams) == 100 and len(book) <= book.max_sequences
    assert ("flood4999", 0) in book.streams and ("flood0", 0) not in book.streams


def test_straggler_of_an_earlier_session_is_passed_on_but_changes_nothing():
    book = StreamBook()
    assert book.record(update("r", 0, "A", 0), 1.0) == 0
    assert book.record(heartbeat("r", 0, "B", 0), 2.0) == 0  # restarted
    stream = book.streams[("r", 0)]
    assert (stream.session, stream.restarts) == ("B", 1)
    # A late closing heartbeat and update of A: delivered (not duplicates), no effect.
    assert book.record(heartbeat("r", 0, "A", 0, closing=True), 3.0) == 0
    assert book.record(update("r", 0, "A", 1), 3.0) == 0
    assert (stream.session, stream.restarts, stream.finished) == ("B", 1, False)
    assert stream.last_received == 2.0 and stream.updates_received == 1
    assert book.record(update("r", 0, "A", 1), 3.0) is None  # a true duplicate still is one
    # Even once A's sequence books are forgotten, A is remembered as retired.
    book.forget(3.0 + book.forget_after - 0.5)
    book._last_seq.pop(("A", "ppo_update"))
    assert book.record(update("r", 0, "A", 2), 4.0) == 0
    assert (stream.session, stream.restarts) == ("B", 1)


# --------------------------------------------------------------------- Fleet


def test_fleet_judges_rolls_up_and_ranks_workers():
    fleet = Fleet(stale_after=5.0)
    grads = {0: 1.0, 1: 6.0, 2: 12.0, 3: math.nan, 4: 0.5, 5: 2.0}
    for worker, grad in grads.items():
        fleet.ingest(update("r", worker, f"s{worker}", 0, grad_norm=grad), 100.0)
    fleet.ingest(update("r", 5, "s5", 1, grad_norm=2.0), 90.0)  # heard from 10 s ago: stale
    statuses = {w.worker: fleet.status(w, 100.0) for w in fleet.run_workers("r")}
    assert statuses == {0: OK, 1: WARNING, 2: CRITICAL, 3: NAN, 4: OK, 5: STALE}
    dist = fleet.distribution("r", "grad_norm", 100.0)
    # Live workers only (5 is stale): finite 0.5, 1, 6, 12 and one NaN.
    assert (dist["p50"], dist["p90"], dist["max"]) == (1.0, 12.0, 12.0)
    assert dist["nonfinite"] == 1 and dist["workers"] == 5
    assert dist["health"] == {"ok": 2, "warning": 1, "critical": 2}
    assert [w.worker for w in fleet.worst("r", 100.0, 3)] == [5, 3, 2]
    summary = fleet.summary("r", 100.0)
    assert (summary["workers_live"], summary["workers_stale"]) == (5, 1)
    assert summary["metrics"]["grad_norm"]["worst_worker"] == 3  # NaN is the worst
    assert summary["metrics"]["grad_norm"]["nonfinite"] == 1
    assert fleet.workers[("r", 3)].nonfinite_updates == 1
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN for no values


def test_fleet_worst_by_distance_ranks_ties_by_how_far_out_of_band():
    fleet = Fleet(stale_after=5.0)
    grads = {0: 1.0, 1: 6.0, 2: 9.0, 3: 4.9, 4: 0.05, 5: 1.0}
    for worker, grad in grads.items():
        kl = 0.045 if worker == 5 else 0.004  # 3x its 0.015 edge: critical
        fleet.ingest(update("r", worker, f"s{worker}", 0, grad_norm=grad, approx_kl=kl), 100.0)
    # Plain worst: by status only, ties by id (unchanged behaviour).
    assert [w.worker for w in fleet.worst("r", 100.0, 6)] == [5, 1, 2, 4, 0, 3]
    # By distance: the critical first; the warnings by how far out relative to their edge
    # (grad 9: 0.8 of 5 above; 0.05: 0.5 of 0.1 below; 6: 0.2 of 5 above); then the ok
    # ones nearest an edge first (4.9 is 2% under 5; worker 0's nearest is clip, 60%).
    ranked = [w.worker for w in fleet.worst("r", 100.0, 6, by_distance=True)]
    assert ranked == [5, 2, 4, 1, 3, 0]
    assert fleet.distance(fleet.workers[("r", 3)]) == pytest.approx((4.9 - 5.0) / 5.0)
    assert fleet.rank_key(fleet.workers[("r", 5)], 100.0) == (4, pytest.approx(2.0))


def test_fleet_follows_the_runtime_accounting_by_reference():
    book = StreamBook()
    fleet = Fleet(book=book)  # fed after the runtime accounted, as with a Subscriber

    def feed(event: protocol.Event, now: float) -> None:
        if book.record(event, now) is not None:
            fleet.ingest(event, now)

    feed(update("r", 0, "A", 0, grad_norm=1.0), 1.0)
    feed(update("r", 0, "A", 3, grad_norm=2.0), 1.0)  # two lost
    worker = fleet.workers[("r", 0)]
    assert (worker.dropped, worker.restarts, worker.updates) == (2, 0, 2)
    feed(heartbeat("r", 0, "A", 0, closing=True), 2.0)
    assert worker.finished and fleet.status(worker, 100.0) == DONE
    feed(update("r", 0, "B", 0, grad_norm=3.0), 3.0)  # restarted
    assert worker.restarts == 1 and not worker.finished
    feed(update("r", 0, "A", 4, grad_norm=99.0), 3.0)  # straggler: not the worker's state
    assert worker.history.values("grad_norm") == [1.0, 2.0, 3.0]
    assert fleet.forget(3.0 + fleet.forget_after + 1) == [("r", 0)]
    assert fleet.runs() == [] and len(fleet) == 0


def test_fleet_bounds_workers():
    fleet = Fleet(max_workers=10)
    for worker in range(100):
        fleet.ingest(update("r", worker, f"s{worker}", 0), float(worker))
    assert sorted(w for _, w in fleet.workers) == list(range(90, 100))
    assert [w.worker for w in fleet.run_workers("r")] == list(range(90, 100))


# --------------------------------------------------------------------- views forget too


def test_exporter_drops_series_of_forgotten_workers():
    state = ExporterState(forget_after=60.0)
    registry = CollectorRegistry()
    registry.register(BusCollector(state))
    state.observe(update("gone", 0, "g", 0), now=0.0)
    state.observe(update("kept", 0, "k", 0), now=50.0)
    state.sync(30.0, True, {})
    assert 'run="gone"' in generate_latest(registry).decode()
    state.sync(70.0, True, {})
    text = generate_latest(registry).decode()
    assert 'run="gone"' not in text and 'run="kept"' in text
    assert state.fleet.book.streams.keys() == {("kept", 0)}


def test_exporter_leaves_out_the_age_of_a_finished_worker():
    state = ExporterState()
    registry = CollectorRegistry()
    registry.register(BusCollector(state))
    state.observe(update("r", 0, "s", 0), now=0.0)
    assert "trainbus_last_event_age_seconds{" in generate_latest(registry).decode()
    state.observe(heartbeat("r", 0, "s", 0, closing=True), now=1.0)
    text = generate_latest(registry).decode()
    assert "trainbus_last_event_age_seconds{" not in text  # no silence alert for the done
    assert 'trainbus_ppo_updates_total{run="r",worker="0"} 1.0' in text


def test_alert_engine_resolves_and_forgets_workers_the_runtime_forgot():
    engine = AlertEngine(default_rules())
    book = StreamBook(forget_after=100.0)
    notes = []
    for seq in range(6):
        event = update("r", 0, "s", seq, grad_norm=20.0)
        book.record(event, float(seq))
        notes += engine.observe(event, float(seq))
    assert any(n.state == "firing" for n in notes)
    assert engine._trackers  # the spike rule's per-worker state
    book.forget(200.0)
    notes = engine.tick(200.0, streams=book.streams)
    assert [(n.rule, n.state) for n in notes if n.pages] == [("grad_norm_high", "resolved")]
    assert engine.active() == [] and not engine._trackers and not engine._drops


@pytest.mark.parametrize("workers", [1, 64])
def test_fleet_rollup_is_the_aggregator_and_monitor_row(workers):
    """The monitor's local fleet row and the aggregator's summary are one computation."""
    from consumers.aggregate import Aggregator
    from consumers.monitor_state import FLEET_METRICS, MonitorState

    monitor = MonitorState()
    aggregator = Aggregator()
    for worker in range(workers):
        event = update("r", worker, f"s{worker}", 0, grad_norm=0.5 + worker)
        monitor.ingest(event, 0.0)
        aggregator.ingest(event, 0.0)
    source, row = monitor.fleet_row("r", 0.0)
    summary = aggregator.summary("r", 0.0)
    assert source == "local"
    assert row["metrics"] == {m: v for m, v in summary["metrics"].items() if m in FLEET_METRICS}
    assert row["workers_live"] == summary["workers_live"] == workers
