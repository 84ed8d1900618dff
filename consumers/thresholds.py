"""Health thresholds shared by every consumer (monitor colours, aggregator, alert rules).

Defaults follow the reference telemetry card: post-clip grad norm healthy 0.1..5.0,
warning above 5, critical above 10, vanishing below 0.1 a warning, NaN/inf critical at once.
One table, so that the monitor's colour and the alert's severity can never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

Severity = Literal["ok", "warning", "critical"]
SEVERITY_RANK: dict[str, int] = {"unknown": 0, "ok": 1, "warning": 2, "critical": 3}


@dataclass(frozen=True, slots=True)
class Threshold:
    """One bound on one metric: breached when ``value <op> level``.

    ``op`` is ">" (too high) or "<" (too low); ``warning``/``critical`` may be None when a
    severity does not apply (vanishing gradients are only ever a warning).
    """

    name: str
    metric: str
    op: Literal[">", "<"]
    warning: float | None
    critical: float | None
    description: str = ""

    def severity(self, value: float) -> Severity:
        """Severity of one finite value against this bound."""
        if self.critical is not None and _breaches(self.op, value, self.critical):
            return "critical"
        if self.warning is not None and _breaches(self.op, value, self.warning):
            return "warning"
        return "ok"


def _breaches(op: str, value: float, level: float) -> bool:
    return value > level if op == ">" else value < level


DEFAULT_THRESHOLDS: tuple[Threshold, ...] = (
    Threshold("grad_norm_high", "grad_norm", ">", 5.0, 10.0,
              "post-clip gradient norm above the healthy band"),
    Threshold("grad_norm_vanishing", "grad_norm", "<", 0.1, None,
              "post-clip gradient norm below 0.1: learning has stalled"),
    Threshold("approx_kl_high", "approx_kl", ">", 0.015, 0.03,
              "policy moved too far from the behaviour policy in one update"),
    Threshold("clip_fraction_high", "clip_fraction", ">", 0.25, 0.3,
              "too many samples hit the PPO clip"),
    Threshold("explained_variance_low", "explained_variance", "<", 0.3, 0.0,
              "value function explains little of the returns"),
    Threshold("entropy_collapse", "entropy", "<", 0.05, 0.01,
              "policy entropy collapsed: exploration has stopped"),
)

#: Metrics whose non-finite value is critical at once (NaN/inf anywhere in the update
#: means the optimizer applied garbage or is about to).
NONFINITE_CRITICAL = ("grad_norm", "pre_clip_grad_norm", "policy_loss", "value_loss",
                      "entropy", "approx_kl")


class HealthTable:
    """Thresholds by metric, with per-run overrides applied by name."""

    def __init__(self, thresholds: tuple[Threshold, ...] | list[Threshold] = DEFAULT_THRESHOLDS):
        self.thresholds = tuple(thresholds)
        self._by_metric: dict[str, list[Threshold]] = {}
        for threshold in self.thresholds:
            self._by_metric.setdefault(threshold.metric, []).append(threshold)

    def with_levels(self, name: str, warning: float | None, critical: float | None) -> HealthTable:
        """A copy with one threshold's levels changed (configuration)."""
        return HealthTable([replace(t, warning=warning, critical=critical) if t.name == name else t
                            for t in self.thresholds])

    def for_metric(self, metric: str) -> list[Threshold]:
        return self._by_metric.get(metric, [])

    def health(self, metric: str, value: float | None) -> str:
        """"unknown" for a missing value, "critical" for NaN/inf, else the worst bound."""
        if value is None:
            return "unknown"
        if not math.isfinite(value):
            return "critical"
        worst: str = "ok"
        for threshold in self._by_metric.get(metric, ()):
            severity = threshold.severity(value)
            if SEVERITY_RANK[severity] > SEVERITY_RANK[worst]:
                worst = severity
        return worst


DEFAULT_HEALTH = HealthTable()
