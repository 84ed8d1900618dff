"""A producer's own metrics are first-class: tracked and rolled up by name, exported as
gauges, judged by alert rules (and their Prometheus translation), within a bound."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bus import protocol
from consumers.aggregate import Aggregator
from consumers.alerting.engine import AlertEngine
from consumers.alerting.promrules import prometheus_rules
from consumers.alerting.rules import RulesError, load_rules, parse_rules
from consumers.fleet import Fleet
from consumers.history import MAX_CUSTOM_METRICS, custom_metrics, is_custom_metric
from consumers.prometheus_exporter import BusCollector, ExporterState, custom_series_name
from tests.conftest import ppo_payload


def update(worker: int, seq: int, **fields) -> protocol.Event:
    return protocol.decode(protocol.encode(ppo_payload("own", worker, f"s{worker}", seq,
                                                       update=seq, **fields)))


def test_which_fields_are_custom_metrics():
    fields = update(0, 0, grad_norm_actor=1.5, **{"critic.loss": 2}, tag="x", flag=True).fields
    assert sorted(custom_metrics(fields)) == ["critic.loss", "grad_norm_actor"]
    assert not is_custom_metric("grad_norm") and not is_custom_metric("synthetic")
    assert not is_custom_metric("9lives") and is_custom_metric("_private")


def test_fleet_tracks_rolls_up_and_bounds_custom_metrics():
    fleet = Fleet(custom=True)
    for seq in range(12):
        fleet.ingest(update(0, seq, grad_norm_actor=float(seq)), 0.0)
        fleet.ingest(update(1, seq, grad_norm_actor=math.nan if seq == 11 else 1.0), 0.0)
    worker = fleet.workers[("own", 0)]
    assert worker.history.values("grad_norm_actor") == [float(v) for v in range(2, 12)]
    rolled = fleet.summary("own", 0.0)["metrics"]["grad_norm_actor"]
    assert rolled["max"] == 11.0 and rolled["nonfinite"] == 1 and rolled["workers"] == 2
    # A producer inventing a field per update: only the first MAX_CUSTOM_METRICS are kept.
    for i in range(100):
        fleet.ingest(update(0, 100 + i, **{f"made_up_{i}": 1.0}), 0.0)
    assert len(fleet.custom_metrics) == MAX_CUSTOM_METRICS
    assert len(worker.history.series) <= len(fleet.metrics) + MAX_CUSTOM_METRICS
    assert fleet.custom_refused  # noticed, not tracked
    # Off by default (the monitor shows only the columns it is asked for).
    plain = Fleet()
    plain.ingest(update(0, 0, grad_norm_actor=1.0), 0.0)
    assert plain.custom_metrics == [] and "grad_norm_actor" not in plain.workers[("own", 0)].history.series


def test_aggregator_summary_and_exporter_gauge_carry_custom_metrics():
    agg = Aggregator()
    state = ExporterState()
    registry = CollectorRegistry()
    registry.register(BusCollector(state))
    for worker, value in ((0, 0.25), (1, 4.0)):
        event = update(worker, 0, **{"critic.grad_norm": value})
        agg.ingest(event, 0.0)
        state.observe(event, 0.0)
    assert agg.summary("own", 0.0)["metrics"]["critic.grad_norm"]["max"] == 4.0
    family = custom_series_name("critic.grad_norm")
    assert family == "trainbus_custom_critic_grad_norm"
    text = generate_latest(registry).decode()
    assert f'{family}{{run="own",worker="1"}} 4.0' in text


def test_alert_rule_targets_a_custom_metric_and_its_prometheus_rule(tmp_path):
    path = tmp_path / "own.toml"
    path.write_text('[rules.critic_grad_high]\nmetric = "critic.grad_norm"\nwarning = 3.0\n'
                    'critical = 6.0\nfor = 2\ncustom = true\n'
                    'summary = "critic gradients too large"\n')
    rules = load_rules(path)
    engine = AlertEngine(rules)
    notes = []
    for seq, value in enumerate([1.0, 7.0, 7.5]):
        notes += engine.observe(update(0, seq, **{"critic.grad_norm": value}), float(seq))
    fired = [n for n in notes if n.rule == "critic_grad_high" and n.state == "firing"]
    assert fired and fired[0].severity == "critical" and fired[0].metric == "critic.grad_norm"
    text = prometheus_rules(rules.values(), 1.0)
    assert "trainbus_custom_critic_grad_norm" in text
    with pytest.raises(RulesError, match="nor a name"):
        parse_rules({"rules": {"bad": {"metric": "9x", "warning": 1.0, "custom": True}}})
    # Without custom = true, an unknown name is a typo until said otherwise.
    with pytest.raises(RulesError, match="add custom = true"):
        parse_rules({"rules": {"typo": {"metric": "critic.grad_norm", "warning": 1.0}}})


def test_monitor_column_keeps_the_history_of_a_chosen_field():
    from consumers.monitor_state import MonitorState

    state = MonitorState(columns=["grad_norm_actor", "grad_norm"])
    assert state.columns == ("grad_norm_actor",)  # a protocol field is already a column
    for seq in range(3):
        state.ingest(update(0, seq, grad_norm_actor=seq + 0.5), 0.0)
    assert state.rows[("own", 0)].history.values("grad_norm_actor") == [0.5, 1.5, 2.5]


def test_monitor_draws_a_chosen_column_with_its_sparkline():
    from consumers.monitor_state import MonitorState
    from consumers.monitor_view import render_text, table_width, tier_for

    state = MonitorState(columns=["critic.grad_norm"])
    state.sync(0.0, connected=True, ever_connected=True)
    for seq, value in enumerate([1.0, 2.0, 3.0, math.inf]):
        state.ingest(update(0, seq, **{"critic.grad_norm": value}), 0.0)
    for width in (120, 160):
        frame = render_text(state, 0.0, width=width)
        assert "critic.grad_n…" in frame and "inf" in frame, frame
        assert "NaN×1" in frame  # the fleet row: one worker non-finite
        assert "×" in frame  # the non-finite cell of its sparkline
        assert max(len(line) for line in frame.splitlines()) <= width
    # At 80 columns the essentials take the whole width: the frame says what it left out.
    narrow = render_text(state, 0.0, width=80)
    assert "--column critic.grad_norm: no room at 80" in narrow and "status" in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert table_width(0, ("critic.grad_norm",)) > table_width(0)
    assert tier_for(160, ("critic.grad_norm",)) <= tier_for(160)


def test_monitor_refuses_a_column_that_cannot_be_a_field(procs):
    from tests.conftest import trainbus_cmd

    proc = procs.start(trainbus_cmd("monitor", "--once", "--column", "9 bad"))
    assert proc.wait(20) == 2 and "--column" in proc.stderr.text()
