"""Health thresholds shared by every consumer (monitor colours, aggregator, alert rules).

Defaults follow the reference telemetry card: post-clip grad norm healthy 0.1..5.0,
warning above 5, critical above 10, vanishing below 0.1 a warning, NaN/inf critical at once.
One table, so that the monitor's colour and the alert's severity can never disagree.

Those absolute levels suit a large clip (the card's source used ``max_grad_norm = 40``).
With PPO's common 0.5 the post-clip norm can never pass 0.5, so an explosion has to show
in the *pre*-clip norm, and no absolute level suits every model there: a :class:`Spike`
judges the latest value against the median of the worker's own recent history instead.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
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
        if self.critical is not None and breaches(self.op, value, self.critical):
            return "critical"
        if self.warning is not None and breaches(self.op, value, self.warning):
            return "warning"
        return "ok"


def breaches(op: str, value: float, level: float) -> bool:
    """``value <op> level``: the one comparison every health and alert level uses."""
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
    # Warning only, and not part of a monitor row's status, and its alert rule is off by
    # default: on recorded healthy CartPole runs that reached return 500, EV was below 0 in
    # 25-57 % of updates (the returns barely vary, so EV is a ratio of two near-zero
    # variances); a negative EV is worth a yellow cell, not a page (README, "Alerts").
    Threshold("explained_variance_low", "explained_variance", "<", 0.0, None,
              "value function predicts the returns worse than their mean"),
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


# ---------------------------------------------------------------------- spikes


@dataclass(frozen=True, slots=True)
class Spike:
    """A value far above its own recent past: ``value / median(previous) > level``.

    ``previous`` is what the 10-entry history held before this value (up to 9 values, the
    oldest first); the ratio is judged only with at least ``min_history`` finite ones, so a
    run's first updates (when every norm moves fast) are left alone. The median rather than
    the mean, so one earlier spike does not hide the next. A relative rule sees *changes*:
    a norm that jumps 20x and stays there is a spike for a few updates, until the median
    catches up; the absolute thresholds above are what judge a level.
    """

    name: str
    metric: str
    warning: float | None
    critical: float | None
    min_history: int = 5
    #: Consecutive updates a level must be exceeded (the alert rule's ``for``).
    sustain: int = 1
    description: str = ""

    def ratio(self, previous: Sequence[float], value: float) -> float | None:
        """``value`` over the median of the finite ``previous`` values; None when there is
        too little history, the value is not finite, or the median is not positive."""
        if not math.isfinite(value):
            return None
        finite = [v for v in previous if math.isfinite(v)]
        if len(finite) < self.min_history:
            return None
        median = statistics.median(finite)
        if median <= 0:
            return None
        return value / median

    def severity(self, ratio: float | None) -> Severity:
        if ratio is None:
            return "ok"
        if self.critical is not None and ratio > self.critical:
            return "critical"
        if self.warning is not None and ratio > self.warning:
            return "warning"
        return "ok"


class SpikeTracker:
    """One stream's view of one :class:`Spike`, fed one value per update.

    Each value is judged on arrival against the (up to 9) values before it — the stream's
    10-entry history minus itself — and its ratio kept, so the alert engine and the monitor,
    which both keep one of these per worker, compute the same ratios from the same values.
    ``sustained()`` is the smallest of the last ``sustain`` ratios: the level every one of
    them exceeded, which is what the alert's ``for`` waits for.
    """

    __slots__ = ("spike", "previous", "ratios")

    def __init__(self, spike: Spike, history_len: int = 10) -> None:
        self.spike = spike
        self.previous: deque[float] = deque(maxlen=history_len - 1)
        self.ratios: deque[float | None] = deque(maxlen=max(1, spike.sustain))

    def observe(self, value: float) -> float | None:
        """Judge ``value`` (then remember it; NaN too, which :meth:`Spike.ratio` skips as
        history and which breaks a streak as a value)."""
        ratio = self.spike.ratio(self.previous, value)
        self.previous.append(value)
        self.ratios.append(ratio)
        return ratio

    @property
    def latest(self) -> float | None:
        return self.ratios[-1] if self.ratios else None

    def sustained(self) -> float | None:
        """Smallest of the last ``sustain`` ratios; None until that many could be judged."""
        if len(self.ratios) < self.ratios.maxlen or any(r is None for r in self.ratios):
            return None
        return min(r for r in self.ratios if r is not None)


#: Levels judged on recorded real runs (README, "Alerts"); see :class:`Spike`. On healthy
#: CartPole runs (3 x 300 updates annealed, 2 x 1200 at constant lr: the demo's setting) a
#: failed episode after many at 500 made the pre-clip norm climb up to 40x and fall back,
#: staying above 5x for at most 4 updates in a row (above 20x: 2). ``sustain = 5`` lets that
#: pass and is the longest a jump that *stays* can be judged new (from the 6th update at the
#: new level, most of the 9 values before it are at that level too): a jump that holds is
#: caught on its 5th update, gradients growing ~1.5x per update or faster within ~8.
DEFAULT_SPIKES: tuple[Spike, ...] = (
    Spike("pre_clip_grad_norm_spike", "pre_clip_grad_norm", 5.0, 20.0, sustain=5,
          description="pre-clip gradient norm far above this worker's recent median: "
                      "gradients are exploding (clipping may hide it from grad_norm)"),
)
