"""Alert rules: what is watched, at which levels, and how patiently.

The model is a Prometheus alerting rule with the knobs a training run needs:

* ``kind = "threshold"``: one numeric ``ppo_update`` field compared with ``op`` (">" too
  high, "<" too low) against a ``warning`` and/or ``critical`` level. ``for`` is the number
  of breaching updates (Prometheus' ``for:``, counted in updates because training time is
  measured in updates, not seconds). ``clear`` is the hysteresis level: a firing alert
  resolves only once the value is back past it, so a value wobbling around the warning
  level cannot flap. ``critical_clear`` is the same for de-escalation critical → warning.
* ``kind = "nonfinite"``: NaN/inf in any of ``metrics`` (or ``nonfinite_grad_count > 0``)
  is critical at once — no pending, because a NaN gradient has already been applied.
* ``kind = "spike"``: one numeric field judged against the worker's own recent past
  (:class:`consumers.thresholds.Spike`): ``warning``/``critical`` are *factors* of the
  median of the previous values in the 10-entry history (none before ``min_history``).
  It makes an exploding gradient visible at any clip, where ``grad_norm`` (post-clip) is
  pinned at ``max_grad_norm``; defaults come from :data:`consumers.thresholds.DEFAULT_SPIKES`.
* ``kind = "silent"``: no event (update or heartbeat) from a worker for ``warning``
  seconds, judged on this process's own clock (StreamState.last_received).
* ``kind = "dropped"``: events lost (sequence gaps) within the last ``window`` seconds.

Every rule also has a ``group_interval`` (Alertmanager's knob of that name): once a key
has paged, its next paging notification waits until that many seconds have passed, and
then only the net change goes out (a key that went critical and back to warning in the
meantime sends nothing new). So a metric that truly oscillates across a level yields one
notification and, while it keeps firing, a reminder every ``repeat`` seconds.

Defaults are *derived* from :data:`consumers.thresholds.DEFAULT_THRESHOLDS` so that the
monitor's colour and the alert's severity can never disagree. ``--rules FILE`` (TOML)
overrides defaults by name, key by key, or adds rules; every mistake in that file raises
:class:`RulesError` whose one-line message names the offending key, because a typo in an
alert rule silently watching nothing is worse than refusing to start.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from bus import protocol
from consumers.history import is_custom_metric
from consumers.thresholds import (
    DEFAULT_SPIKES,
    DEFAULT_THRESHOLDS,
    NONFINITE_CRITICAL,
    Spike,
    Threshold,
    breaches,
)

RuleKind = Literal["threshold", "spike", "nonfinite", "silent", "dropped"]
RULE_KINDS: tuple[str, ...] = ("threshold", "spike", "nonfinite", "silent", "dropped")
#: Kinds that watch one ppo_update metric per observation (``for`` counts updates).
METRIC_KINDS: tuple[str, ...] = ("threshold", "spike")

#: Numeric ppo_update fields a threshold rule may watch (the schema is the source of truth).
NUMERIC_METRICS: frozenset[str] = frozenset(
    name for name, kind in {**protocol.PPO_UPDATE_REQUIRED, **protocol.PPO_UPDATE_OPTIONAL}.items()
    if kind in ("int", "float"))

#: Default hysteresis: the clear level sits this fraction of the rule's largest level
#: magnitude back from the level (grad_norm_high 5/10 -> clear 4.0, critical_clear 9.0).
DEFAULT_CLEAR_FRACTION = 0.1
#: Seconds between reminders while an alert keeps firing (Alertmanager's repeat_interval;
#: shorter than its 4 h default because a training run is hours, not weeks).
DEFAULT_REPEAT_S = 600.0
DEFAULT_FOR = 3
#: Least time between two paging notifications of one key (Alertmanager's group_interval;
#: its default is 5 min, shorter here because a training incident is minutes, not hours).
DEFAULT_GROUP_INTERVAL_S = 60.0
DEFAULT_SILENT_AFTER_S = 30.0
DEFAULT_DROPPED_WINDOW_S = 60.0
#: A NaN leaves the monitor's 10-value history only after 10 clean updates; the alert
#: resolves at the same moment, so the console and the alert agree and a run that NaNs
#: every few updates stays one firing alert instead of a fire/resolve storm.
DEFAULT_NONFINITE_CLEAR_FOR = 10

NONFINITE_RULE = "nonfinite"
SILENT_RULE = "worker_silent"
DROPPED_RULE = "events_dropped"

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# Per-threshold defaults beyond the shared table: patience and warm-up. Explained
# variance starts near zero in every run, so it is not judged during the first updates.
_THRESHOLD_EXTRAS: dict[str, dict[str, Any]] = {
    "grad_norm_vanishing": {"for_": 5},
    "entropy_collapse": {"for_": 5},
    # Off by default (see consumers.thresholds): on solved CartPole EV is noise around 0.
    "explained_variance_low": {"for_": 10, "warmup": 20, "clear": 0.1, "enabled": False},
}


class RulesError(ValueError):
    """A rules file (or rule) that cannot be used; the message is one line naming the key."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One alerting rule. Levels compare as ``value <op> level``; see the module doc."""

    name: str
    kind: RuleKind = "threshold"
    metric: str = ""
    op: Literal[">", "<"] = ">"
    warning: float | None = None
    critical: float | None = None
    for_: int = DEFAULT_FOR
    clear: float | None = None
    critical_clear: float | None = None
    clear_for: int | None = None
    repeat: float = DEFAULT_REPEAT_S
    warmup: int = 0
    window: float = DEFAULT_DROPPED_WINDOW_S
    group_interval: float = DEFAULT_GROUP_INTERVAL_S
    min_history: int = 5
    metrics: tuple[str, ...] = ()
    summary: str = ""
    enabled: bool = True
    #: ``metric`` (or ``metrics``) names a producer's own field, not a protocol one.
    custom: bool = False

    # ------------------------------------------------------------------ levels

    @property
    def clear_after(self) -> int:
        """Consecutive cleared observations needed to resolve: ``clear_for``, else as
        patient to resolve as to fire (``for``) for threshold rules, 1 for the others.
        Debouncing the way out as well as the way in is what keeps a noisy metric that
        crosses the whole hysteresis band from paging on every crossing."""
        if self.clear_for is not None:
            return self.clear_for
        return self.for_ if self.kind in METRIC_KINDS else 1

    @property
    def lowest_level(self) -> float | None:
        """The level that starts an alert: warning if set, else critical."""
        return self.warning if self.warning is not None else self.critical

    def _band(self, level: float) -> float:
        """Default hysteresis width below ``level``: a fraction of the largest level for
        absolute rules; of the level itself for spike factors (a factor stays above 1)."""
        if self.kind == "spike":
            return DEFAULT_CLEAR_FRACTION * abs(level)
        levels = [abs(x) for x in (self.warning, self.critical) if x is not None]
        return DEFAULT_CLEAR_FRACTION * max(levels) if levels else 0.0

    @property
    def clear_level(self) -> float | None:
        """Where a firing (or pending) alert resolves: ``clear`` or the derived default."""
        if self.clear is not None:
            return self.clear
        level = self.lowest_level
        if level is None:
            return None
        return level - self._band(level) if self.op == ">" else level + self._band(level)

    @property
    def critical_clear_level(self) -> float | None:
        """Where a critical alert de-escalates to warning (only with both levels set)."""
        if self.critical is None or self.warning is None:
            return None
        if self.critical_clear is not None:
            return self.critical_clear
        band = self._band(self.critical)
        return self.critical - band if self.op == ">" else self.critical + band

    def breaches(self, value: float, level: float | None) -> bool:
        return level is not None and breaches(self.op, value, level)

    @property
    def threshold(self) -> Threshold:
        """The health threshold with this rule's levels: what the monitor, tail and
        aggregator colour by (consumers.health), and what :meth:`level_of` asks, so the
        two can never disagree on a value."""
        return Threshold(self.name, self.metric, self.op, self.warning, self.critical,
                         self.summary)

    @property
    def spike(self) -> Spike:
        """The shared spike definition of a spike rule (``for`` is its ``sustain``)."""
        return Spike(self.name, self.metric, self.warning, self.critical, self.min_history,
                     sustain=self.for_, description=self.summary)

    def level_of(self, value: float) -> str | None:
        """"critical", "warning" or None for one finite value (or, for a spike rule, one
        ratio to the recent median), judged by the shared threshold code."""
        severity = self.threshold.severity(value)
        return None if severity == "ok" else severity

    def past(self, value: float, level: float | None) -> bool:
        """True when ``value`` is back on the healthy side of ``level`` (inclusive)."""
        if level is None:
            return True
        return value <= level if self.op == ">" else value >= level

    def level_value(self, severity: str) -> float | None:
        return self.critical if severity == "critical" else self.warning

    def describe(self) -> str:
        """One line for ``--help``-style listings and the README table."""
        if self.kind == "nonfinite":
            return f"{self.name}: NaN/inf in {', '.join(self.metrics)} -> critical at once"
        if self.kind == "silent":
            return f"{self.name}: no event for > {self.lowest_level:g} s (clear {self.clear_level:g} s)"
        if self.kind == "dropped":
            return f"{self.name}: > {self.lowest_level:g} events lost in {self.window:g} s"
        if self.kind == "spike":
            levels = ", ".join(f"{sev} > {lvl:g}x" for sev, lvl in
                               (("warning", self.warning), ("critical", self.critical))
                               if lvl is not None)
            return (f"{self.name}: {self.metric} over the median of its previous "
                    f"{self.min_history}+ values: {levels} (for {self.for_}, "
                    f"clear {self.clear_level:g}x)")
        levels = ", ".join(f"{sev} {self.op} {lvl:g}" for sev, lvl in
                           (("warning", self.warning), ("critical", self.critical)) if lvl is not None)
        return f"{self.name}: {self.metric} {levels} (for {self.for_}, clear {self.clear_level:g})"


# ---------------------------------------------------------------------- defaults


def rule_from_threshold(threshold: Threshold, **overrides: Any) -> Rule:
    """The alert rule for one shared health threshold (same name, metric, op, levels)."""
    params: dict[str, Any] = {"summary": threshold.description}
    params.update(_THRESHOLD_EXTRAS.get(threshold.name, {}))
    params.update(overrides)
    return Rule(name=threshold.name, kind="threshold", metric=threshold.metric, op=threshold.op,
                warning=threshold.warning, critical=threshold.critical, **params)


def rule_from_spike(spike: Spike, **overrides: Any) -> Rule:
    """The alert rule for one shared spike definition (same name, metric, factors)."""
    params: dict[str, Any] = {"summary": spike.description, "min_history": spike.min_history,
                              "for_": spike.sustain}
    params.update(_THRESHOLD_EXTRAS.get(spike.name, {}))
    params.update(overrides)
    return Rule(name=spike.name, kind="spike", metric=spike.metric, op=">",
                warning=spike.warning, critical=spike.critical, **params)


def default_rules(thresholds: Iterable[Threshold] = DEFAULT_THRESHOLDS,
                  spikes: Iterable[Spike] = DEFAULT_SPIKES) -> dict[str, Rule]:
    """Built-in rules by name: the health table, spikes, non-finite values, silence, loss."""
    rules = {t.name: rule_from_threshold(t) for t in thresholds}
    rules.update({s.name: rule_from_spike(s) for s in spikes})
    rules[NONFINITE_RULE] = Rule(
        name=NONFINITE_RULE, kind="nonfinite", metric="*", op=">", critical=0.0, for_=1,
        clear_for=DEFAULT_NONFINITE_CLEAR_FOR,
        metrics=(*NONFINITE_CRITICAL, "nonfinite_grad_count"),
        summary="non-finite values: the optimizer applied (or is about to apply) garbage")
    rules[SILENT_RULE] = Rule(
        name=SILENT_RULE, kind="silent", metric="silence_s", op=">",
        warning=DEFAULT_SILENT_AFTER_S, for_=1,
        summary="no event from this worker (crashed, hung, or cut off from the bus)")
    rules[DROPPED_RULE] = Rule(
        name=DROPPED_RULE, kind="dropped", metric="dropped_events", op=">", warning=0.0, for_=1,
        summary="events lost between worker and this consumer (sequence gaps)")
    return rules


# ---------------------------------------------------------------------- TOML

_KEYS: dict[str, str] = {  # TOML key -> expected kind (the dataclass field is "for_" for "for")
    "kind": "kind", "metric": "metric", "metrics": "metrics", "op": "op",
    "warning": "number", "critical": "number", "for": "posint", "clear": "number",
    "critical_clear": "number", "clear_for": "posint", "repeat": "nonneg", "warmup": "nonnegint",
    "window": "pos", "group_interval": "nonneg", "min_history": "posint", "summary": "str",
    "enabled": "bool", "custom": "bool",
}
_DEFAULTS_KEYS = ("for", "repeat", "clear_for", "group_interval")
_TOP_KEYS = ("rules", "defaults")


def is_metric(name: str) -> bool:
    """What a rule may watch: a numeric ppo_update field, or a producer's own field (a
    custom metric, tracked by name by every consumer: consumers.history)."""
    return name in NUMERIC_METRICS or is_custom_metric(name)


def _attr(key: str) -> str:
    return "for_" if key == "for" else key


def _check_value(where: str, kind: str, value: Any) -> Any:
    """Type-check one TOML value; returns it normalised (ints for numbers become floats)."""
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "number":
        if not is_num or not math.isfinite(value):
            raise RulesError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if kind in ("nonneg", "pos"):
        if not is_num or not math.isfinite(value) or value < 0 or (kind == "pos" and value == 0):
            word = "a number > 0" if kind == "pos" else "a number >= 0"
            raise RulesError(f"{where}: expected {word}, got {value!r}")
        return float(value)
    if kind in ("posint", "nonnegint"):
        low = 1 if kind == "posint" else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise RulesError(f"{where}: expected an integer >= {low}, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise RulesError(f"{where}: expected a string, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise RulesError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind == "kind":
        if value not in RULE_KINDS:
            raise RulesError(f"{where}: expected one of {', '.join(RULE_KINDS)}, got {value!r}")
        return value
    if kind == "op":
        if value not in (">", "<"):
            raise RulesError(f"{where}: expected \">\" or \"<\", got {value!r}")
        return value
    if kind == "metric":
        if not isinstance(value, str) or not is_metric(value):
            raise RulesError(f"{where}: {value!r} is neither a numeric ppo_update field "
                             f"(one of {', '.join(sorted(NUMERIC_METRICS))}) nor a name a "
                             "producer's own field can have ([A-Za-z_][A-Za-z0-9_.-]*)")
        return value
    if kind == "metrics":
        if not isinstance(value, list) or not value:
            raise RulesError(f"{where}: expected a non-empty list of ppo_update fields")
        for item in value:
            _check_value(where, "metric", item)
        return tuple(value)
    raise AssertionError(kind)


def validate_rule(rule: Rule, where: str | None = None) -> Rule:
    """Check a rule's consistency; raise RulesError naming the key at fault."""
    where = where or f"rules.{rule.name}"
    if rule.kind in METRIC_KINDS and not is_metric(rule.metric):
        raise RulesError(f"{where}.metric: required for a {rule.kind} rule "
                         f"(a numeric ppo_update field), got {rule.metric or 'nothing'!r}")
    # A producer's own field must be declared as such: a misspelt protocol field
    # ("grad_nrom") would otherwise be a rule that silently watches nothing.
    for metric in (rule.metric, *rule.metrics) if rule.kind != "silent" and \
            rule.kind != "dropped" else ():
        if metric not in NUMERIC_METRICS and metric != "*" and not rule.custom:
            key = "metric" if metric == rule.metric else "metrics"
            raise RulesError(f"{where}.{key}: {metric!r} is not a numeric ppo_update field "
                             f"(one of {', '.join(sorted(NUMERIC_METRICS))}); for a "
                             "producer's own field, add custom = true")
    if rule.kind == "spike":
        if rule.op != ">":
            raise RulesError(f"{where}.op: a spike rule is always \">\" (a factor above the median)")
        for key in ("warning", "critical", "clear", "critical_clear"):
            level = getattr(rule, key)
            if level is not None and level <= 1.0:
                raise RulesError(f"{where}.{key}: a spike level is a factor of the recent "
                                 f"median and must be > 1, got {level:g}")
    if rule.kind == "nonfinite":
        if not rule.metrics:
            raise RulesError(f"{where}.metrics: a nonfinite rule needs at least one metric")
        return rule
    if rule.warning is None and rule.critical is None:
        raise RulesError(f"{where}.warning: set warning and/or critical")
    if rule.kind == "silent" and rule.op != ">":
        raise RulesError(f"{where}.op: a silent rule is always \">\" (seconds of silence)")
    if rule.warning is not None and rule.critical is not None and \
            not rule.breaches(rule.critical, rule.warning):
        raise RulesError(f"{where}.critical: must be {'above' if rule.op == '>' else 'below'} "
                         f"warning ({rule.critical:g} vs {rule.warning:g}) for op {rule.op!r}")
    lowest = rule.lowest_level
    if rule.clear is not None and lowest is not None and rule.breaches(rule.clear, lowest):
        raise RulesError(f"{where}.clear: must be on the healthy side of {lowest:g} "
                         f"({'<=' if rule.op == '>' else '>='} it), got {rule.clear:g}")
    if rule.critical_clear is not None:
        if rule.critical is None or rule.warning is None:
            raise RulesError(f"{where}.critical_clear: needs both warning and critical")
        if rule.breaches(rule.critical_clear, rule.critical):
            raise RulesError(f"{where}.critical_clear: must be on the healthy side of critical "
                             f"{rule.critical:g}, got {rule.critical_clear:g}")
    return rule


def _parse_rule(name: str, table: Any, base: Rule | None, defaults: Mapping[str, Any]) -> Rule:
    where = f"rules.{name}"
    if not _NAME.fullmatch(name):
        raise RulesError(f"rules.{name!r}: rule names match [A-Za-z0-9_.-]{{1,64}}")
    if not isinstance(table, dict):
        raise RulesError(f"{where}: expected a table ([{where}]), got {table!r}")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _KEYS:
            raise RulesError(f"{where}.{key}: unknown key (known: {', '.join(_KEYS)})")
        changes[_attr(key)] = _check_value(f"{where}.{key}", _KEYS[key], value)
    if base is not None and "kind" in changes and changes["kind"] != base.kind:
        raise RulesError(f"{where}.kind: cannot change the kind of built-in rule {name!r} "
                         f"({base.kind}); add a rule under a new name instead")
    for key, value in defaults.items():
        changes.setdefault(_attr(key), value)
    if base is None:
        kind = changes.get("kind", "threshold")
        if kind in METRIC_KINDS and "metric" not in changes:
            raise RulesError(f"{where}.metric: required for a new {kind} rule")
        if kind == "nonfinite":
            changes.setdefault("clear_for", DEFAULT_NONFINITE_CLEAR_FOR)
            changes.setdefault("metric", "*")
        if kind in ("nonfinite", "silent", "dropped"):
            changes.setdefault("for_", 1)
        if kind == "silent":
            changes.setdefault("metric", "silence_s")
        if kind == "dropped":
            changes.setdefault("metric", "dropped_events")
        rule = Rule(name=name, **changes)
    else:
        if "metric" in changes and base.kind not in METRIC_KINDS:
            raise RulesError(f"{where}.metric: only threshold rules watch one metric")
        rule = replace(base, **changes)
        # Levels moved but the hysteresis did not: re-derive it from the new levels.
        if ("warning" in changes or "critical" in changes or "op" in changes):
            if "clear" not in changes:
                rule = replace(rule, clear=None)
            if "critical_clear" not in changes:
                rule = replace(rule, critical_clear=None)
    return validate_rule(rule, where)


def parse_rules(data: Mapping[str, Any], base: Mapping[str, Rule] | None = None, *,
                include_disabled: bool = False) -> dict[str, Rule]:
    """Apply a parsed rules document to ``base`` (the defaults); disabled rules removed
    unless ``include_disabled`` (consumers.health keeps their levels for colours)."""
    rules = dict(default_rules() if base is None else base)
    for key in data:
        if key not in _TOP_KEYS:
            raise RulesError(f"{key}: unknown top-level key (known: {', '.join(_TOP_KEYS)})")
    defaults_table = data.get("defaults", {})
    if not isinstance(defaults_table, dict):
        raise RulesError("defaults: expected a table ([defaults])")
    defaults: dict[str, Any] = {}
    for key, value in defaults_table.items():
        if key not in _DEFAULTS_KEYS:
            raise RulesError(f"defaults.{key}: unknown key (known: {', '.join(_DEFAULTS_KEYS)})")
        defaults[key] = _check_value(f"defaults.{key}", _KEYS[key], value)
    rule_tables = data.get("rules", {})
    if not isinstance(rule_tables, dict):
        raise RulesError("rules: expected tables ([rules.<name>])")
    if defaults:  # [defaults] applies to built-in rules the file does not mention too
        for name, rule in list(rules.items()):
            if name not in rule_tables:
                rules[name] = replace(rule, **{_attr(k): v for k, v in defaults.items()})
    for name, table in rule_tables.items():
        rules[name] = _parse_rule(name, table, rules.get(name), defaults)
    return {name: rule for name, rule in rules.items() if rule.enabled or include_disabled}


def load_rules(path: str | Path | None = None, *, silent_after: float | None = None,
               include_disabled: bool = False) -> dict[str, Rule]:
    """Defaults, overridden by ``path`` (TOML) and then by ``--silent-after``; rules with
    ``enabled = false`` left out unless ``include_disabled``.

    Raises RulesError (one line, naming the file and key) for any bad content, and
    FileNotFoundError for a missing file.
    """
    rules = default_rules()
    if path is not None:
        path = Path(path)
        with path.open("rb") as fh:
            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise RulesError(f"{path}: invalid TOML: {exc}") from None
        try:
            rules = parse_rules(data, rules, include_disabled=True)
        except RulesError as exc:
            raise RulesError(f"{path}: {exc}") from None
    if silent_after is not None:
        for name, rule in list(rules.items()):
            if rule.kind == "silent" and name == SILENT_RULE:
                rules[name] = validate_rule(replace(rule, warning=silent_after, clear=None,
                                                    critical_clear=None))
    return {name: rule for name, rule in rules.items() if rule.enabled or include_disabled}


def rules_table(rules: Mapping[str, Rule]) -> list[dict[str, Any]]:
    """Rows for documentation (README) and ``--list-rules``."""
    rows = []
    for rule in rules.values():
        row = {f.name.rstrip("_"): getattr(rule, f.name) for f in fields(rule)}
        row["clear"] = rule.clear_level
        row["critical_clear"] = rule.critical_clear_level
        rows.append(row)
    return rows
