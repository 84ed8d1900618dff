"""`trainbus alert --list-rules --format prometheus`: the translation, promtool's verdict on
the generated file, and the rules' behaviour under `promtool test rules`."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace

import pytest

from consumers.alerting.engine import AlertEngine
from consumers.alerting.promrules import (
    PromAlert,
    duration,
    number,
    prometheus_rules,
    translate,
)
from consumers.alerting.rules import Rule, default_rules, load_rules
from tests.conftest import ProcessGroup, ppo_fields, trainbus_cmd

pytestmark = pytest.mark.timeout(60)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed: apt-get install prometheus")


def run_cli(procs: ProcessGroup, *args: str) -> tuple[int, str, str]:
    proc = procs.start(trainbus_cmd("alert", *args))
    code = proc.wait(20)
    return code, proc.stdout.text(), proc.stderr.text()


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=30)


def alerts_of(rule: Rule, interval: float = 10.0) -> dict[str, PromAlert]:
    """A rule's Prometheus alerts by severity."""
    return {a.labels["severity"]: a for a in translate(rule, interval)}


# ---------------------------------------------------------------------- translation


def test_durations_and_numbers():
    assert [duration(s) for s in (0, 0.2, 20, 90, 600, 3600, 3661)] == [
        "0s", "1s", "20s", "1m30s", "10m", "1h", "1h1m1s"]
    assert [number(x) for x in (5.0, 0.015, 1e-5, 0.1 + 0.2)] == [
        "5", "0.015", "1e-05", "0.3"]


def test_threshold_rules_one_alert_per_severity_and_for_in_updates():
    rules = default_rules()
    high = alerts_of(rules["grad_norm_high"])
    assert set(high) == {"warning", "critical"}
    assert high["warning"].expr == 'trainbus_ppo_grad_norm{stage="post"} > 5'
    assert high["critical"].expr == 'trainbus_ppo_grad_norm{stage="post"} > 10'
    # for = 3 updates: fires on the 3rd breaching update, two update intervals in.
    assert high["warning"].for_s == 20.0
    assert alerts_of(rules["grad_norm_high"], interval=2.5)["critical"].for_s == 5.0
    vanishing = alerts_of(rules["grad_norm_vanishing"])
    assert set(vanishing) == {"warning"}
    assert vanishing["warning"].expr == 'trainbus_ppo_grad_norm{stage="post"} < 0.1'
    # warmup becomes a join on the update index (the EV rule is off by default; on here).
    ev = alerts_of(replace(rules["explained_variance_low"], enabled=True))
    assert set(ev) == {"warning"}
    assert ev["warning"].expr == "trainbus_ppo_explained_variance < 0 and trainbus_ppo_update >= 20"
    assert ev["warning"].for_s == 90.0
    # Levels are scaled like the exporter scales the series (update_time_ms -> seconds).
    slow = Rule("slow_update", metric="update_time_ms", warning=500.0, critical=2000.0, for_=1)
    slow_alerts = alerts_of(slow)
    assert slow_alerts["warning"].expr == "trainbus_ppo_update_duration_seconds > 0.5"
    assert slow_alerts["critical"].for_s == 0.0
    assert slow_alerts["warning"].annotations["value"] == "{{ $value }}"


def test_other_kinds():
    rules = load_rules(None, silent_after=45)
    [nonfinite] = translate(rules["nonfinite"], 10.0)
    assert nonfinite.labels == {"severity": "critical"} and nonfinite.for_s == 0.0
    assert nonfinite.expr.startswith("max by (run, worker) (")
    # clear_for = 10 updates -> the counters are watched over 10 update intervals.
    assert "increase(trainbus_nonfinite_grads_total[1m40s]) > 0" in nonfinite.expr
    assert "increase(trainbus_nonfinite_grad_elements_total[1m40s]) > 0" in nonfinite.expr
    assert "trainbus_ppo_policy_loss != trainbus_ppo_policy_loss" in nonfinite.expr
    assert "abs(trainbus_ppo_approx_kl) == +Inf" in nonfinite.expr

    spike = alerts_of(rules["pre_clip_grad_norm_spike"])
    selector = 'trainbus_ppo_grad_norm{stage="pre"}'
    assert spike["warning"].expr == (
        f"{selector} / (quantile_over_time(0.5, {selector}[1m30s] offset 10s) > 0) > 5"
        " and ignoring(stage) trainbus_ppo_update >= 5")
    assert spike["critical"].expr.split(" and ")[0].endswith("> 20")

    assert alerts_of(rules["worker_silent"])["warning"].expr == \
        "trainbus_last_event_age_seconds > 45"
    assert alerts_of(rules["events_dropped"])["warning"].expr == \
        "increase(trainbus_dropped_events_total[1m]) > 0"


def test_unknown_kind_and_unexported_metric_are_skipped_with_a_comment():
    rules = [Rule("from_the_future", kind="histogram", metric="grad_norm",  # type: ignore[arg-type]
                  warning=1.0),
             Rule("count_high", metric="nonfinite_grad_count", warning=1.0),
             default_rules()["grad_norm_high"]]
    text = prometheus_rules(rules)
    assert "      # skipped from_the_future: kind 'histogram' has no Prometheus translation yet" \
        in text
    assert "      # skipped count_high: 'nonfinite_grad_count' is not exported" in text
    assert text.count("- alert: \"grad_norm_high\"") == 2
    only_skipped = prometheus_rules(rules[:2])
    assert "    rules: []" in only_skipped


# ---------------------------------------------------------------------- the command


def test_default_list_rules_output_is_unchanged(procs):
    expected = "\n".join(rule.describe() for rule in load_rules(None).values())
    for extra in ((), ("--format", "text")):
        code, out, err = run_cli(procs, "--list-rules", *extra)
        assert code == 0, err
        assert out == expected


def test_format_without_list_rules_is_a_usage_error(procs):
    code, _out, err = run_cli(procs, "--format", "prometheus")
    assert code == 2 and err.strip().splitlines() == [
        "trainbus alert: error: --format applies to --list-rules only"]


@needs_promtool
def test_promtool_accepts_the_default_rule_file(procs, tmp_path):
    code, out, err = run_cli(procs, "--list-rules", "--format", "prometheus")
    assert code == 0, err
    path = tmp_path / "trainbus.rules.yml"
    path.write_text(out)
    checked = promtool("check", "rules", str(path))
    expected = sum(len(translate(rule)) for rule in load_rules(None).values())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {expected} rules found" in checked.stdout


@needs_promtool
def test_promtool_accepts_a_file_with_rules_overrides(procs, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(
        "[rules.grad_norm_high]\nwarning = 4.0\ncritical = 8.0\nfor = 5\n\n"
        "[rules.slow_update]\nmetric = \"update_time_ms\"\nwarning = 500\n"
        "summary = \"updates got slow: \\\"quoted\\\" text survives\"\n\n"
        "[rules.kl_spike]\nkind = \"spike\"\nmetric = \"approx_kl\"\ncritical = 10\n\n"
        "[rules.entropy_collapse]\nenabled = false\n")
    code, out, err = run_cli(procs, "--list-rules", "--format", "prometheus", "--rules",
                             str(rules), "--update-interval", "2", "--silent-after", "12")
    assert code == 0, err
    assert "        expr: 'trainbus_ppo_grad_norm{stage=\"post\"} > 4'\n        for: 8s" in out
    assert "trainbus_ppo_update_duration_seconds > 0.5" in out
    assert "quantile_over_time(0.5, trainbus_ppo_approx_kl[1m] offset 2s) > 0) > 10" in out
    assert "trainbus_last_event_age_seconds > 12" in out
    assert "entropy_collapse" not in out
    path = tmp_path / "override.rules.yml"
    path.write_text(out)
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS:" in checked.stdout


# ---------------------------------------------------------------------- behaviour


def _expected(alert: PromAlert, value: str, **labels: str) -> dict:
    """The alert promtool should report: labels of the series plus severity, annotations
    rendered the way Prometheus' templates render them."""
    def render(text: str) -> str:
        return (text.replace("{{ $labels.run }}", labels["run"])
                .replace("{{ $labels.worker }}", labels["worker"])
                .replace("{{ $value }}", value))

    return {"exp_labels": {**labels, **alert.labels},
            "exp_annotations": {k: render(v) for k, v in alert.annotations.items()}}


def engine_fires_at(rule: Rule, values: list[float], metric: str, interval: float = 10.0) -> float:
    """When trainbus' own engine fires ``rule`` on one update per ``interval`` seconds."""
    engine = AlertEngine([rule])
    for i, value in enumerate(values):
        notes = engine.observe_fields("r", 0, ppo_fields(i, **{metric: value}), now=i * interval)
        if any(n.transition == "fired" for n in notes):
            return i * interval
    raise AssertionError(f"{rule.name} never fired on {values}")


@needs_promtool
def test_generated_rules_fire_when_the_engine_would(tmp_path):
    """Scripted series, one sample per update (10 s), through Prometheus' own rule engine,
    checked against the moment trainbus' engine fires on the same updates."""
    rules = default_rules()
    rules["explained_variance_low"] = replace(rules["explained_variance_low"], enabled=True)
    assert engine_fires_at(rules["grad_norm_high"], [1, 1] + [12] * 4, "grad_norm") == 40
    assert engine_fires_at(rules["pre_clip_grad_norm_spike"], [1] * 10 + [30] * 5,
                           "pre_clip_grad_norm") == 140
    assert engine_fires_at(rules["explained_variance_low"], [-0.1] * 31,
                           "explained_variance") == 290
    (tmp_path / "rules.yml").write_text(prometheus_rules(rules.values(), 10.0))
    high = alerts_of(rules["grad_norm_high"])
    spike = alerts_of(rules["pre_clip_grad_norm_spike"])
    [nonfinite] = translate(rules["nonfinite"], 10.0)
    ev = alerts_of(rules["explained_variance_low"])
    silent = alerts_of(rules["worker_silent"])
    post = {"run": "r", "worker": "0", "stage": "post"}
    pre = {"run": "r", "worker": "3", "stage": "pre"}
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "10s",
        "tests": [{
            "interval": "10s",
            "input_series": [
                {"series": 'trainbus_ppo_grad_norm{run="r",worker="0",stage="post"}',
                 "values": "1 1 12 12 12 12"},
                {"series": 'trainbus_ppo_policy_loss{run="r",worker="1"}',
                 "values": "0.1 NaN 0.1"},
                {"series": 'trainbus_last_event_age_seconds{run="r",worker="2"}',
                 "values": "1 12 40"},
                {"series": 'trainbus_ppo_grad_norm{run="r",worker="3",stage="pre"}',
                 "values": "1x9 30x4"},
                {"series": 'trainbus_ppo_update{run="r",worker="3"}', "values": "0+1x13"},
                {"series": 'trainbus_ppo_explained_variance{run="r",worker="5"}',
                 "values": "-0.1x30"},
                {"series": 'trainbus_ppo_update{run="r",worker="5"}', "values": "0+1x30"},
            ],
            "alert_rule_test": [
                # for = 3 updates: breaching from 20 s, pending at 30 s, firing at 40 s
                # (both severities: suppression is Alertmanager's inhibit rule).
                {"eval_time": "30s", "alertname": "grad_norm_high", "exp_alerts": []},
                {"eval_time": "40s", "alertname": "grad_norm_high", "exp_alerts": [
                    _expected(high["warning"], "12", **post),
                    _expected(high["critical"], "12", **post)]},
                # NaN: critical at the first evaluation that sees it, no pending.
                {"eval_time": "10s", "alertname": "nonfinite", "exp_alerts": [
                    _expected(nonfinite, "NaN", run="r", worker="1")]},
                {"eval_time": "20s", "alertname": "nonfinite", "exp_alerts": []},
                {"eval_time": "20s", "alertname": "worker_silent", "exp_alerts": [
                    _expected(silent["warning"], "40", run="r", worker="2")]},
                # 30x the median of the previous updates from 100 s; firing after 5.
                {"eval_time": "130s", "alertname": "pre_clip_grad_norm_spike", "exp_alerts": []},
                {"eval_time": "140s", "alertname": "pre_clip_grad_norm_spike", "exp_alerts": [
                    _expected(spike["warning"], "30", **pre),
                    _expected(spike["critical"], "30", **pre)]},
                # Ignored before update 20 (t = 200 s), then 10 updates of patience.
                {"eval_time": "280s", "alertname": "explained_variance_low", "exp_alerts": []},
                {"eval_time": "290s", "alertname": "explained_variance_low", "exp_alerts": [
                    _expected(ev["warning"], "-0.1", run="r", worker="5")]},
            ],
        }],
    }
    # JSON is YAML: promtool reads this file as it is.
    (tmp_path / "tests.yml").write_text(json.dumps(tests, indent=1))
    result = promtool("test", "rules", str(tmp_path / "tests.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_generated_file_is_what_the_module_renders(procs):
    """The command prints exactly the module's rendering of the effective rules."""
    code, out, err = run_cli(procs, "--list-rules", "--format", "prometheus",
                             "--update-interval", "4")
    assert code == 0, err
    assert out == prometheus_rules(load_rules(None).values(), 4.0).rstrip("\n")
