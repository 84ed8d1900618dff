"""One source of health: with a --rules override, every consumer that colours or judges
agrees on the same values — monitor colour, tail colour, aggregator worst worker and
alert severity — through each command's own argument parsing, and end to end."""

from __future__ import annotations

import pytest

from bus import cli, protocol
from consumers import tail
from consumers.aggregate import Aggregator
from consumers.alerting.engine import AlertEngine
from consumers.alerting.rules import load_rules
from consumers.health import ENV_RULES, health_from_args, load_health
from consumers.monitor_state import CRITICAL, OK, WARNING, MonitorState
from consumers.monitor_view import HEALTH_STYLE, row_value_style
from tests.conftest import ppo_payload, trainbus_cmd

#: The README's own example of an override, plus a vanishing-gradient critical level the
#: defaults do not have (it changes which worker is "worst").
RULES = """
[rules.grad_norm_high]
critical = 8.0

[rules.grad_norm_vanishing]
critical = 0.02
"""


@pytest.fixture
def rules_file(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(RULES)
    return path


def update(worker: int, seq: int, grad: float) -> protocol.Event:
    return protocol.decode(protocol.encode(ppo_payload("agree", worker, f"s{worker}", seq,
                                                       grad_norm=grad, update=seq)))


def parsed(command: str, *args: str):
    """A command's arguments as its real parser reads them."""
    return cli.build_parser(command).parse_args([command, *args])


@pytest.mark.parametrize("command", ["monitor", "tail", "aggregate", "alert"])
def test_every_judging_command_takes_the_same_rules(command, rules_file, monkeypatch):
    health = health_from_args(parsed(command, "--rules", str(rules_file)))
    assert health.table.health("grad_norm", 9.0) == "critical"
    monkeypatch.setenv(ENV_RULES, str(rules_file))  # or once, for all, from the environment
    assert health_from_args(parsed(command)).table.health("grad_norm", 9.0) == "critical"
    monkeypatch.delenv(ENV_RULES)
    assert health_from_args(parsed(command)).table.health("grad_norm", 9.0) == "warning"


def test_override_agrees_across_monitor_tail_aggregator_and_alerts(rules_file):
    health = load_health(rules_file)
    rules = load_rules(rules_file)
    # Worker 0 at 9 (critical by the override, a warning by default); worker 1 at 0.01
    # (critical by the added vanishing level, a warning by default).
    values = {0: 9.0, 1: 0.01, 2: 1.0}
    monitor = MonitorState(health.table, spikes=health.spikes)
    monitor.sync(0.0, connected=True, ever_connected=True)
    aggregator = Aggregator(health.table)
    engine = AlertEngine(rules)
    severities: dict[int, str] = {}
    for seq in range(5):
        for worker, grad in values.items():
            event = update(worker, seq, grad)
            monitor.ingest(event, 0.0)
            aggregator.ingest(event, 0.0)
            for note in engine.observe(event, 0.0):
                if note.state == "firing":
                    severities[worker] = note.severity
    rows = {w: monitor.rows[("agree", w)] for w in values}
    # Alert severity == monitor row status == monitor cell colour == tail colour.
    assert severities == {0: "critical", 1: "critical"}
    assert {w: monitor.row_status(r, 0.0) for w, r in rows.items()} == {0: CRITICAL, 1: CRITICAL, 2: OK}
    for worker, grad in values.items():
        expected = HEALTH_STYLE[health.table.health("grad_norm", grad)]
        assert row_value_style(monitor, rows[worker], "grad_norm") == expected
        line = tail.render_line(update(worker, 9, grad), health.table)
        grad_text = tail._fmt(grad)
        spans = [s for s in line.spans if line.plain[s.start:s.end] == grad_text]
        assert spans and spans[0].style == expected
    assert HEALTH_STYLE["critical"] == "bold red"
    # The aggregator's worst worker is the one the override makes worst (by default it
    # would be worker 0: both warnings, 9 is further out of its band than 0.01).
    summary = aggregator.summary("agree", 0.0)
    assert summary["metrics"]["grad_norm"]["worst_worker"] == 0
    only_low = Aggregator(health.table)
    default_low = Aggregator()
    for worker, grad in ((0, 7.0), (1, 0.01)):
        only_low.ingest(update(worker, 0, grad), 0.0)
        default_low.ingest(update(worker, 0, grad), 0.0)
    assert only_low.summary("agree", 0.0)["metrics"]["grad_norm"]["worst_worker"] == 1
    assert default_low.summary("agree", 0.0)["metrics"]["grad_norm"]["worst_worker"] == 0


def test_disabled_rule_stops_paging_but_keeps_its_colour(tmp_path):
    path = tmp_path / "quiet.toml"
    path.write_text("[rules.grad_norm_high]\nwarning = 6.0\nenabled = false\n")
    assert "grad_norm_high" not in load_rules(path)
    table = load_health(path).table
    assert table.health("grad_norm", 5.5) == "ok" and table.health("grad_norm", 6.5) == WARNING


def test_monitor_process_colours_by_the_rules_in_the_environment(procs, daemon, rules_file):
    from emitter.telemetry import TelemetryEmitter
    from tests.conftest import ppo_fields

    with TelemetryEmitter("agree", 0, daemon.publish, heartbeat_interval=None) as worker:
        assert worker.wait_for_bus(10)
        for u in range(3):
            worker.emit_ppo_update(**ppo_fields(u, grad_norm=9.0))
        env = {**daemon.env, ENV_RULES: str(rules_file)}
        mon = procs.start(trainbus_cmd("monitor", "--once", "--wait", "1", "--width", "120"),
                          env=env)
        assert mon.wait(20) == 0
        plain = procs.start(trainbus_cmd("monitor", "--once", "--wait", "1", "--width", "120"),
                            env=daemon.env)
        assert plain.wait(20) == 0
    assert "CRITICAL" in mon.stdout.text(), mon.stdout.text()
    assert "WARNING" in plain.stdout.text() and "CRITICAL" not in plain.stdout.text()


def test_bad_rules_file_is_a_one_line_error_for_every_command(procs, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[rules.grad_norm_high]\ncritical = 'high'\n")
    for command in ("monitor", "tail", "aggregate"):
        proc = procs.start(trainbus_cmd(command, "--rules", str(bad)))
        assert proc.wait(20) == 2
        err = proc.stderr.text().strip()
        assert "rules.grad_norm_high.critical" in err and len(err.splitlines()) == 1, err
    missing = procs.start(trainbus_cmd("tail", "--rules", str(tmp_path / "nope.toml")))
    assert missing.wait(20) == 2 and "cannot read" in missing.stderr.text()
