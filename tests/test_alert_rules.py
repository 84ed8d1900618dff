"""Alert rules: defaults derived from the shared health table, TOML overrides, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.alerting.rules import (
    DROPPED_RULE,
    NONFINITE_RULE,
    SILENT_RULE,
    RulesError,
    default_rules,
    load_rules,
)
from consumers.thresholds import DEFAULT_THRESHOLDS, NONFINITE_CRITICAL


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def test_defaults_derive_from_the_health_table():
    rules = default_rules()
    for threshold in DEFAULT_THRESHOLDS:
        rule = rules[threshold.name]
        assert (rule.metric, rule.op, rule.warning, rule.critical) == (
            threshold.metric, threshold.op, threshold.warning, threshold.critical)
    assert rules["grad_norm_high"].clear_level == pytest.approx(4.0)
    assert rules["grad_norm_high"].critical_clear_level == pytest.approx(9.0)
    assert rules["grad_norm_vanishing"].clear_level == pytest.approx(0.11)
    assert set(NONFINITE_CRITICAL) <= set(rules[NONFINITE_RULE].metrics)
    assert rules[SILENT_RULE].warning == 30.0
    assert rules[DROPPED_RULE].warning == 0.0


def test_every_default_level_has_clear_on_the_healthy_side():
    for rule in default_rules().values():
        if rule.kind == "nonfinite":
            continue
        assert not rule.breaches(rule.clear_level, rule.lowest_level), rule.name
        if rule.critical_clear_level is not None:
            assert not rule.breaches(rule.critical_clear_level, rule.critical), rule.name


def test_overrides_by_name_and_additions(tmp_path):
    path = write(tmp_path, """
[defaults]
repeat = 120

[rules.grad_norm_high]
warning = 4.0
critical = 8.0
for = 5

[rules.approx_kl_high]
clear = 0.01

[rules.pre_clip_high]
metric = "pre_clip_grad_norm"
op = ">"
critical = 100
summary = "gradients far above the clip"

[rules.entropy_collapse]
enabled = false

[rules.worker_silent_long]
kind = "silent"
warning = 60
critical = 300
""")
    rules = load_rules(path)
    high = rules["grad_norm_high"]
    assert (high.warning, high.critical, high.for_, high.repeat) == (4.0, 8.0, 5, 120.0)
    assert high.clear_after == 5  # as patient to resolve as to fire, unless clear_for is set
    assert high.clear_level == pytest.approx(3.2)  # re-derived from the new levels
    assert rules["approx_kl_high"].clear == 0.01 and rules["approx_kl_high"].warning == 0.015
    added = rules["pre_clip_high"]
    assert (added.metric, added.warning, added.critical, added.for_) == (
        "pre_clip_grad_norm", None, 100.0, 3)
    assert added.clear_level == pytest.approx(90.0)
    assert "entropy_collapse" not in rules
    assert rules["worker_silent_long"].kind == "silent"
    assert rules["grad_norm_vanishing"].repeat == 120.0  # [defaults] reaches untouched rules


def test_silent_after_flag_overrides(tmp_path):
    rules = load_rules(write(tmp_path, "[rules.worker_silent]\nwarning = 50\n"), silent_after=5.0)
    assert rules[SILENT_RULE].warning == 5.0
    assert rules[SILENT_RULE].clear_level == pytest.approx(4.5)


@pytest.mark.parametrize(("text", "key"), [
    ("[rules.grad_norm_high]\nwarnin = 3\n", "rules.grad_norm_high.warnin"),
    ("[rules.grad_norm_high]\nwarning = \"high\"\n", "rules.grad_norm_high.warning"),
    ("[rules.grad_norm_high]\nfor = 0\n", "rules.grad_norm_high.for"),
    ("[rules.grad_norm_high]\nfor = 2.5\n", "rules.grad_norm_high.for"),
    ("[rules.grad_norm_high]\nop = \">=\"\n", "rules.grad_norm_high.op"),
    ("[rules.grad_norm_high]\nrepeat = -1\n", "rules.grad_norm_high.repeat"),
    ("[rules.grad_norm_high]\nclear_for = 0\n", "rules.grad_norm_high.clear_for"),
    ("[rules.grad_norm_high]\nclear = 6.0\n", "rules.grad_norm_high.clear"),
    ("[rules.grad_norm_high]\ncritical = 2.0\n", "rules.grad_norm_high.critical"),
    ("[rules.grad_norm_high]\ncritical_clear = 11\n", "rules.grad_norm_high.critical_clear"),
    ("[rules.grad_norm_high]\nenabled = \"no\"\n", "rules.grad_norm_high.enabled"),
    ("[rules.grad_norm_high]\nkind = \"silent\"\n", "rules.grad_norm_high.kind"),
    ("[rules.my_rule]\nwarning = 1.0\n", "rules.my_rule.metric"),
    ("[rules.my_rule]\nmetric = \"grad_nrom\"\nwarning = 1.0\n", "rules.my_rule.metric"),
    ("[rules.my_rule]\nmetric = \"grad_norm\"\n", "rules.my_rule.warning"),
    ("[rules.my_rule]\nkind = \"magic\"\n", "rules.my_rule.kind"),
    ("[rules.my_rule]\nmetric = \"lr\"\nop = \"<\"\nwarning = 1e-6\ncritical = 1e-5\n",
     "rules.my_rule.critical"),
    ("[rules.nonfinite]\nmetrics = []\n", "rules.nonfinite.metrics"),
    ("[rules.nonfinite]\nmetrics = [\"grad_norm\", \"bogus\"]\n", "rules.nonfinite.metrics"),
    ("[rules.worker_silent]\nwindow = 0\n", "rules.worker_silent.window"),
    ("[rules]\ngrad_norm_high = 5\n", "rules.grad_norm_high"),
    ("[rule.grad_norm_high]\nwarning = 5\n", "rule"),
    ("[defaults]\nwarning = 5\n", "defaults.warning"),
    ("[defaults]\nfor = -2\n", "defaults.for"),
    ("[defaults]\ngroup_interval = -1\n", "defaults.group_interval"),
    ("[rules.grad_norm_high]\ngroup_interval = \"1m\"\n", "rules.grad_norm_high.group_interval"),
    ("[rules.pre_clip_grad_norm_spike]\nwarning = 0.5\n", "rules.pre_clip_grad_norm_spike.warning"),
    ("[rules.pre_clip_grad_norm_spike]\nmin_history = 0\n",
     "rules.pre_clip_grad_norm_spike.min_history"),
    ("[rules.pre_clip_grad_norm_spike]\nop = \"<\"\n", "rules.pre_clip_grad_norm_spike.op"),
    ("[rules.my_spike]\nkind = \"spike\"\nwarning = 3\n", "rules.my_spike.metric"),
])
def test_bad_rules_file_names_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(RulesError) as info:
        load_rules(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert f"{key}:" in message or f"{key} " in message, message


def test_invalid_toml_is_one_line(tmp_path):
    path = write(tmp_path, "[rules.grad_norm_high\nwarning = 5\n")
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert "invalid TOML" in str(info.value) and "\n" not in str(info.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_rules(tmp_path / "nope.toml")


def test_spike_rules_and_paging_floor_from_toml(tmp_path):
    path = write(tmp_path, """
[defaults]
group_interval = 120

[rules.pre_clip_grad_norm_spike]
warning = 4
min_history = 7

[rules.value_loss_spike]
kind = "spike"
metric = "value_loss"
critical = 50
""")
    rules = load_rules(path)
    spike = rules["pre_clip_grad_norm_spike"]
    assert (spike.kind, spike.warning, spike.critical, spike.min_history) == ("spike", 4.0, 20.0, 7)
    assert spike.clear_level == pytest.approx(3.6)  # hysteresis re-derived from the new level
    added = rules["value_loss_spike"]
    assert (added.kind, added.metric, added.warning, added.critical) == ("spike", "value_loss", None, 50.0)
    assert all(rule.group_interval == 120.0 for rule in rules.values())
    assert "value_loss over the median" in added.describe()
