"""``trainbus alert --list-rules --format prometheus``: the effective rules as a Prometheus
rule file over the series of ``trainbus prometheus`` (:mod:`consumers.prometheus_exporter`).

Why: a team that already runs Prometheus wants the same alerts evaluated there (one
Alertmanager, one paging policy, history in the TSDB) without copying thresholds by hand;
generating the file from the effective rules (defaults after ``--rules``) keeps the two
from drifting apart. The output is one group, ``trainbus``; check it with
``promtool check rules FILE``.

How each rule translates (Prometheus judges scraped samples on a clock, trainbus judges
every update, so some translations are approximations, said here and in the file):

* ``for`` counts *updates*; Prometheus' ``for:`` is a duration. The engine fires on the
  N-th consecutive breaching update, (N - 1) update intervals after the first breach, so
  ``for = N`` becomes ``for: (N - 1) x U`` with U = ``--update-interval`` (default 10 s,
  set it to your run's seconds per update); N = 1 has no ``for:`` at all.
* ``threshold`` → one alert per severity, ``SERIES op LEVEL`` with a ``severity`` label
  (levels scaled like the series, e.g. ``update_time_ms`` → seconds); ``warmup`` →
  ``and trainbus_ppo_update >= warmup``. Prometheus fires both severities above the
  critical level: "critical suppresses warning" is an Alertmanager inhibit rule (README).
  Hysteresis (``clear``, ``critical_clear``, ``clear_for``) is not translated: Prometheus
  resolves at the first evaluation where the expression is false. ``grad_norm`` is the
  exporter's maximum since the previous scrape, so a spike between scrapes still counts.
* ``nonfinite`` → critical at once when, per (run, worker), the non-finite gradient
  counters increased within ``clear_for`` x U (at least 1 m, so that ``increase`` has two
  samples at common scrape intervals — this window stands in for "10 clean updates"), or a
  watched gauge is NaN (``x != x``) or ±Inf right now.
* ``spike`` → ``SERIES / (quantile_over_time(0.5, SERIES[9 x U] offset U) > 0) > FACTOR``:
  the median of the *samples* scraped over the previous nine update intervals (at least
  1 m) stands in for the median of the previous nine updates; with a scrape interval
  longer than U the newest sample can fall inside the window (a single spike barely moves
  a median, so this errs little). ``min_history`` becomes ``trainbus_ppo_update >=
  min_history`` (a run's first updates are left alone, as in the engine).
* ``silent`` → ``trainbus_last_event_age_seconds > LEVEL`` (the exporter's own clock, like
  the engine's). The exporter keeps a finished worker's series, so unlike the engine this
  also fires for workers that ended cleanly, until the exporter restarts.
* ``dropped`` → ``increase(trainbus_dropped_events_total[window]) > LEVEL`` (window at least 1 m).
* anything else (a kind added later, or a metric the exporter does not export) is skipped
  with a YAML comment saying why, never a crash: the rest of the file stays usable.

The YAML is written by hand (no PyYAML dependency): every string is a JSON string, which
is a valid YAML double-quoted scalar.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

from consumers.alerting.rules import Rule
from consumers.history import HISTORY_LEN, is_custom_metric
from consumers.prometheus_exporter import GAUGE_FIELDS, GRAD_STAGES, custom_series_name

DEFAULT_UPDATE_INTERVAL_S = 10.0
#: Shortest range for increase()/quantile_over_time(): 4 samples at a 15 s scrape.
MIN_RANGE_S = 60.0
GROUP_NAME = "trainbus"

UPDATE_SERIES = "trainbus_ppo_update"
AGE_SERIES = "trainbus_last_event_age_seconds"
DROPPED_SERIES = "trainbus_dropped_events_total"
NONFINITE_GRADS_SERIES = "trainbus_nonfinite_grads_total"
NONFINITE_ELEMENTS_SERIES = "trainbus_nonfinite_grad_elements_total"
_STAGE_OF = {metric: stage for stage, metric in GRAD_STAGES}
_WHO = "{{ $labels.run }}/{{ $labels.worker }}"


class Untranslatable(Exception):
    """A rule with no Prometheus counterpart; the message says why (a YAML comment)."""


@dataclass(frozen=True, slots=True)
class Series:
    """The exporter's series for one ppo_update field."""

    selector: str
    scale: float = 1.0  # exporter value = field value x scale (ms -> s)
    staged: bool = False  # has a ``stage`` label that joins with stage-less series must ignore

    @property
    def join(self) -> str:
        """Vector-matching clause for ``and`` with a per-(run, worker) series."""
        return " and ignoring(stage)" if self.staged else " and"


@dataclass(frozen=True, slots=True)
class PromAlert:
    """One alerting rule of the generated group."""

    alert: str
    expr: str
    for_s: float
    labels: dict[str, str]
    annotations: dict[str, str]


def series_for(metric: str) -> Series | None:
    """The exporter series of a ppo_update field, None when it is not exported."""
    stage = _STAGE_OF.get(metric)
    if stage is not None:
        return Series(f'trainbus_ppo_grad_norm{{stage="{stage}"}}', staged=True)
    spec = GAUGE_FIELDS.get(metric)
    if spec is not None:
        return Series(spec[0], scale=spec[2])
    return Series(custom_series_name(metric)) if is_custom_metric(metric) else None


def duration(seconds: float) -> str:
    """A Prometheus duration, rounded up to whole seconds: 90 -> "1m30s", 600 -> "10m"."""
    total = max(0, math.ceil(seconds - 1e-9))
    if total == 0:
        return "0s"
    out = ""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        count, total = divmod(total, size)
        if count:
            out += f"{count}{unit}"
    return out


def number(value: float) -> str:
    """A PromQL number literal without float noise (0.015, 1e-05, 10)."""
    return format(float(value), ".15g")


def _for(rule: Rule, interval: float) -> float:
    return max(0, rule.for_ - 1) * interval


def _annotations(rule: Rule, description: str) -> dict[str, str]:
    return {"summary": f"{_WHO}: {rule.summary or rule.name}",
            "description": f"{description} (trainbus rule {rule.name})",
            "value": "{{ $value }}"}


def _levels(rule: Rule) -> list[tuple[str, float]]:
    return [(sev, level) for sev in ("warning", "critical")
            if (level := rule.level_value(sev)) is not None]


def _series(rule: Rule) -> Series:
    series = series_for(rule.metric)
    if series is None:
        raise Untranslatable(f"{rule.metric!r} is not exported by `trainbus prometheus`")
    return series


def _threshold(rule: Rule, interval: float) -> list[PromAlert]:
    series = _series(rule)
    out = []
    for severity, level in _levels(rule):
        expr = f"{series.selector} {rule.op} {number(level * series.scale)}"
        if rule.warmup:
            expr += f"{series.join} {UPDATE_SERIES} >= {rule.warmup}"
        what = f"{rule.metric} {rule.op} {level:g} for {rule.for_} update(s)"
        out.append(PromAlert(rule.name, expr, _for(rule, interval), {"severity": severity},
                             _annotations(rule, what)))
    return out


def _spike(rule: Rule, interval: float) -> list[PromAlert]:
    series = _series(rule)
    window = duration(max((HISTORY_LEN - 1) * interval, MIN_RANGE_S))
    median = f"quantile_over_time(0.5, {series.selector}[{window}] offset {duration(interval)})"
    min_history = int(getattr(rule, "min_history", 0) or 0)
    out = []
    for severity, factor in _levels(rule):
        expr = f"{series.selector} / ({median} > 0) > {number(factor)}"
        if min_history:
            expr += f"{series.join} {UPDATE_SERIES} >= {min_history}"
        what = (f"{rule.metric} above {factor:g}x its recent median "
                f"for {rule.for_} update(s); value = the ratio")
        out.append(PromAlert(rule.name, expr, _for(rule, interval), {"severity": severity},
                             _annotations(rule, what)))
    return out


def _nonfinite(rule: Rule, interval: float) -> list[PromAlert]:
    window = duration(max(rule.clear_after * interval, MIN_RANGE_S))
    clauses: list[str] = []
    if any(metric in _STAGE_OF for metric in rule.metrics):
        clauses.append(f"increase({NONFINITE_GRADS_SERIES}[{window}]) > 0")
    for metric in rule.metrics:
        if metric == "nonfinite_grad_count":
            clauses.append(f"increase({NONFINITE_ELEMENTS_SERIES}[{window}]) > 0")
            continue
        series = series_for(metric)
        if series is None:
            continue  # not exported: nothing Prometheus could watch
        clauses.append(f"{series.selector} != {series.selector}")
        clauses.append(f"abs({series.selector}) == +Inf")
    if not clauses:
        raise Untranslatable("none of its metrics is exported by `trainbus prometheus`")
    # One alert per (run, worker), whichever clauses hold: without the aggregation two
    # NaN gauges would be two series with the same labels once the names are dropped.
    expr = "max by (run, worker) (\n    " + "\n  or\n    ".join(clauses) + "\n)"
    what = f"NaN/inf in {', '.join(rule.metrics)} within the last {window}"
    return [PromAlert(rule.name, expr, 0.0, {"severity": "critical"}, _annotations(rule, what))]


def _silent(rule: Rule, interval: float) -> list[PromAlert]:
    return [PromAlert(rule.name, f"{AGE_SERIES} > {number(level)}", _for(rule, interval),
                      {"severity": severity},
                      _annotations(rule, f"no event for more than {level:g} s"))
            for severity, level in _levels(rule)]


def _dropped(rule: Rule, interval: float) -> list[PromAlert]:
    window = duration(max(rule.window, MIN_RANGE_S))
    return [PromAlert(rule.name, f"increase({DROPPED_SERIES}[{window}]) > {number(level)}",
                      _for(rule, interval), {"severity": severity},
                      _annotations(rule, f"more than {level:g} events lost in {window}"))
            for severity, level in _levels(rule)]


_TRANSLATORS = {"threshold": _threshold, "spike": _spike, "nonfinite": _nonfinite,
                "silent": _silent, "dropped": _dropped}


def translate(rule: Rule, update_interval: float = DEFAULT_UPDATE_INTERVAL_S) -> list[PromAlert]:
    """The Prometheus alerting rules for one trainbus rule; raises :class:`Untranslatable`."""
    if not rule.enabled:
        raise Untranslatable("disabled")
    translator = _TRANSLATORS.get(rule.kind)
    if translator is None:
        raise Untranslatable(f"kind {rule.kind!r} has no Prometheus translation yet")
    return translator(rule, update_interval)


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _comment(text: str) -> str:
    return " ".join(text.split())  # one line, whatever a rule name or kind contained


def prometheus_rules(rules: Iterable[Rule],
                     update_interval: float = DEFAULT_UPDATE_INTERVAL_S) -> str:
    """The rule file (YAML text) for ``rules``, in their order."""
    body: list[str] = []
    count = 0
    for rule in rules:
        try:
            alerts = translate(rule, update_interval)
        except Untranslatable as exc:
            body.append(f"      # skipped {_comment(rule.name)}: {_comment(str(exc))}")
            continue
        for alert in alerts:
            count += 1
            body.append(f"      - alert: {_quote(alert.alert)}")
            if "\n" in alert.expr:
                body.append("        expr: |-")
                body.extend(f"          {line}" for line in alert.expr.splitlines())
            else:  # single-quoted: PromQL's double quotes stay readable
                body.append("        expr: '" + alert.expr.replace("'", "''") + "'")
            if alert.for_s > 0:
                body.append(f"        for: {duration(alert.for_s)}")
            for section, mapping in (("labels", alert.labels), ("annotations", alert.annotations)):
                body.append(f"        {section}:")
                body.extend(f"          {key}: {_quote(value)}" for key, value in mapping.items())
    head = [
        "# Prometheus alerting rules generated by `trainbus alert --list-rules --format prometheus`",
        "# over the series of `trainbus prometheus`. `for` (counted in updates by trainbus) is",
        f"# translated at {update_interval:g} s per update (--update-interval); see",
        "# consumers/alerting/promrules.py for how each kind maps. Check: promtool check rules FILE",
        "groups:",
        f"  - name: {_quote(GROUP_NAME)}",
        "    rules:" if count else "    rules: []",
    ]
    return "\n".join(head + body) + "\n"
