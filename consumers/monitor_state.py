"""What the live views show, fed with events and knowing nothing about drawing.

Split the way rich itself is split: :class:`MonitorState` holds the state (pure, testable,
cheap per event); :mod:`consumers.monitor_view` builds rich renderables from it at draw
time; :mod:`consumers.monitor` is the process (the subscriber loop and the CLI). Imports
run one way: monitor -> monitor_view -> monitor_state -> fleet.

Per-worker facts are the fleet model's (:class:`consumers.fleet.Fleet`: histories, spike
trackers, status, rollups, with the runtime's accounting read by reference); this state
adds what a screen needs beyond workers: firing alerts, aggregator summaries, the daemon's
bus_stats, connection state, the event rate and the last log lines. All of it is capped
(rows by the fleet's ``max_workers`` and ``forget_after``, alerts and summaries by count).

Status banner, worst first: DISCONNECTED (no daemon connection) > STALE (a worker silent
longer than ``stale_after`` on this process's clock: what is shown may be old news) >
NaN DETECTED (a non-finite loss/gradient value or ``nonfinite_grad_count`` > 0) > CRITICAL >
WARNING (health of the latest values, a pre-clip norm spike, or a firing alert of that
severity) > LEARNING (all healthy) > WAITING (connected, no worker yet) > FINISHED (every
worker has closed). Counts of every other condition are shown next to it, so the banner
never hides a second problem.

With PPO's usual ``max_grad_norm = 0.5`` the post-clip norm cannot pass 0.5, so its
absolute thresholds never fire; an explosion shows in the pre-clip norm instead, judged by
the shared :class:`consumers.thresholds.Spike` rules (latest value over the median of the
worker's previous ones): a spike makes the row warning/critical like any other metric.

A worker whose emitter closed (its closing heartbeat arrived: ``StreamState.finished``)
is *done*: its silence is the end of its work, so it is never STALE and never raises the
banner; it is counted apart ("2 done"), its row is dimmed, and it is the first to leave
the screen when rows do not fit.
"""

from __future__ import annotations

import math
import sys
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bus import protocol
from consumers.fleet import (
    CRITICAL,
    DEFAULT_STALE_AFTER_S,
    DONE,
    NAN,
    OK,
    STALE,
    STATUS_RANK,
    WAITING,
    WARNING,
    Fleet,
    Worker,
    WorkerId,
    WorkerKey,
)
from consumers.runtime import DEFAULT_FORGET_AFTER_S, StreamBook
from consumers.thresholds import DEFAULT_HEALTH, DEFAULT_SPIKES, HealthTable, Spike

__all__ = ["CRITICAL", "DONE", "NAN", "OK", "STALE", "STATUS_RANK", "WAITING", "WARNING",
           "AlertEntry", "Banner", "MonitorState", "MAX_ALERTS", "ROW_METRICS", "FLEET_METRICS"]

#: Rows kept (least recently heard from dropped first): far more than any screen shows.
DEFAULT_MAX_ROWS = 4096
MAX_ALERTS = 256
MAX_SUMMARIES = 256

#: Metrics each row keeps a 10-entry history of: what the views draw, plus what decides
#: NaN DETECTED. The latest value shown is the last *measured* one (as TensorBoard shows).
ROW_METRICS: tuple[str, ...] = (
    "grad_norm", "pre_clip_grad_norm", "pre_clip_grad_norm_max", "approx_kl", "clip_fraction",
    "entropy", "explained_variance", "episode_return_mean", "policy_loss", "value_loss", "lr",
    "sps", "nonfinite_grad_count")
#: Metrics rolled up in the fleet row when no aggregator publishes ppo_summary.
FLEET_METRICS: tuple[str, ...] = ("grad_norm", "pre_clip_grad_norm", "approx_kl", "clip_fraction",
                                  "entropy", "explained_variance", "episode_return_mean", "sps")

BANNERS = ("FINISHED", "WAITING", "LEARNING", "WARNING", "CRITICAL", "NaN DETECTED", "STALE",
           "DISCONNECTED")
_BANNER_OF_STATUS = {DONE: "FINISHED", WAITING: "WAITING", OK: "LEARNING", WARNING: "WARNING",
                     CRITICAL: "CRITICAL", NAN: "NaN DETECTED", STALE: "STALE"}


@dataclass(slots=True)
class AlertEntry:
    """A firing alert, keyed by (run, worker, rule) like Alertmanager."""

    run: str
    worker: WorkerId
    rule: str
    severity: str
    metric: str
    since: float
    value: float | None
    threshold: float | None
    summary: str
    received: float


@dataclass(slots=True)
class Banner:
    state: str
    counts: dict[str, int] = field(default_factory=dict)
    detail: str = ""

    @property
    def rank(self) -> int:
        return BANNERS.index(self.state)


def _safe_range(health: HealthTable, metric: str) -> tuple[float, float]:
    """[lo, hi]: the finite values of ``metric`` that breach none of its critical levels
    (``breaches``: above a ">" level, below any other), for :meth:`MonitorState.must_show`."""
    lo, hi = -sys.float_info.max, sys.float_info.max
    for threshold in health.for_metric(metric):
        if threshold.critical is None:
            continue
        if threshold.op == ">":
            hi = min(hi, threshold.critical)
        else:
            lo = max(lo, threshold.critical)
    return lo, hi


class MonitorState:
    """Everything a live view shows, fed with events; no sockets, no drawing.

    ``now`` is always passed in (the caller's ``time.monotonic()``), so tests can drive
    staleness by hand and one frame uses one consistent clock. Fed by a Subscriber, pass
    its ``book`` (the runtime's accounting); fed directly, the fleet keeps its own.
    """

    def __init__(self, health: HealthTable = DEFAULT_HEALTH, *,
                 spikes: Iterable[Spike] = DEFAULT_SPIKES,
                 stale_after: float = DEFAULT_STALE_AFTER_S,
                 forget_after: float = DEFAULT_FORGET_AFTER_S,
                 max_rows: int = DEFAULT_MAX_ROWS,
                 columns: Iterable[str] = (),
                 book: StreamBook | None = None) -> None:
        #: Producers' own fields shown as extra columns (``--column NAME``), in order.
        self.columns = tuple(dict.fromkeys(c for c in columns if c not in ROW_METRICS))
        self.fleet = Fleet(health=health, spikes=spikes, metrics=(*ROW_METRICS, *self.columns),
                           stale_after=stale_after, forget_after=forget_after,
                           max_workers=max_rows, book=book)
        self.alerts: OrderedDict[tuple[str, WorkerId, str], AlertEntry] = OrderedDict()
        self.alert_events = 0
        self.summaries: OrderedDict[str, tuple[dict[str, Any], float]] = OrderedDict()
        self.bus_stats: tuple[dict[str, Any], float] | None = None
        self.events_total = 0
        self.events_by_type: Counter[str] = Counter()
        # Connection and runtime figures, copied in by sync().
        self.connected = False
        self.ever_connected = False
        self.endpoint = ""
        self.rejected = 0
        self.lost = 0
        self.rate_eps = 0.0
        self._rate_mark: tuple[float, int] | None = None
        self.log_lines: deque[str] = deque(maxlen=3)
        #: ppo_updates the process read and accounted for (seq, restarts, age) but did not
        #: show, to keep its redraw rate under load (see :meth:`must_show`).
        self.skipped = 0
        #: (metric, lo, hi) per row metric: a value inside [lo, hi] is finite and at no
        #: critical level, so :meth:`must_show` makes one chained comparison per field
        #: (NaN fails it too) instead of judging every level on every shed update.
        self._safe = tuple((metric, *_safe_range(health, metric)) for metric in ROW_METRICS)

    # ------------------------------------------------------------------ the fleet

    @property
    def rows(self) -> OrderedDict[WorkerKey, Worker]:
        """One row per (run, worker): the fleet's workers."""
        return self.fleet.workers

    @property
    def health(self) -> HealthTable:
        return self.fleet.health

    @property
    def spikes(self) -> tuple[Spike, ...]:
        return self.fleet.spikes

    @property
    def stale_after(self) -> float:
        return self.fleet.stale_after

    # ------------------------------------------------------------------ input

    def ingest(self, event: protocol.Event, now: float) -> None:
        """Take one event. Cheap: called up to tens of thousands of times a second."""
        self.events_total += 1
        kind = event.type
        self.events_by_type[kind] += 1
        if kind == protocol.PPO_UPDATE or kind == protocol.HEARTBEAT:
            self.fleet.ingest(event, now)
        elif kind == protocol.ALERT:
            self._ingest_alert(event, now)
        elif kind == protocol.PPO_SUMMARY:
            self.summaries[event.run] = (event.fields, now)
            self.summaries.move_to_end(event.run)
            if len(self.summaries) > MAX_SUMMARIES:
                self.summaries.popitem(last=False)
        elif kind == protocol.BUS_STATS:
            self.bus_stats = (event.fields, now)

    def ingest_many(self, events: Iterable[protocol.Event], now: float) -> None:
        ingest = self.ingest
        for event in events:
            ingest(event, now)

    def _ingest_alert(self, event: protocol.Event, now: float) -> None:
        fields = event.fields
        self.alert_events += 1
        key = (event.run, event.worker, fields["rule"])
        state = fields["state"]
        if state == "resolved":
            self.alerts.pop(key, None)
            return
        if state != "firing":
            return  # pending: not yet the operator's business
        self.alerts[key] = AlertEntry(
            event.run, event.worker, fields["rule"], fields["severity"], fields["metric"],
            fields["since"], fields.get("value"), fields.get("threshold"),
            fields.get("summary") or "", now)
        self.alerts.move_to_end(key)
        if len(self.alerts) > MAX_ALERTS:
            self.alerts.popitem(last=False)

    def must_show(self, fields: Mapping[str, Any]) -> bool:
        """Whether a ppo_update's payload must reach the rows even when the process sheds
        load (an older update of a stream with a newer one in the same batch): a NaN/inf
        value of any row metric, a value at a critical level, or ``nonfinite_grad_count``
        above 0. Anything else may be skipped: the status is judged on the newest update,
        which is never skipped, so what is skipped can only be a healthy or warning value
        that the next update has already replaced. Cheap (a few dict lookups): it runs on
        payloads that are not fully decoded, to save that work."""
        get = fields.get
        for metric, lo, hi in self._safe:
            value = get(metric)
            if value is None:
                continue
            kind = value.__class__
            if (kind is float or kind is int) and not lo <= value <= hi:
                return True
        count = fields.get("nonfinite_grad_count")
        return isinstance(count, int) and count > 0

    def sync(self, now: float, *, connected: bool, ever_connected: bool, rejected: int = 0,
             lost: int = 0, endpoint: str = "", skipped: int = 0) -> None:
        """Once per frame: the connection state and loss counts from the runtime, the event
        rate, and forgetting long-silent rows (restarts, drops and finished are read from
        the runtime's accounting by reference, so they need no copying)."""
        self.connected = connected
        self.ever_connected = ever_connected
        self.rejected = rejected
        self.lost = lost
        self.endpoint = endpoint
        self.skipped = skipped
        # The rate of events taken in, shown or skipped: under load the monitor still
        # reads every one of them, and a rate of the shown ones alone (a few hundred a
        # second) would hide the load it is shedding.
        taken = self.events_received
        if self._rate_mark is None:
            self._rate_mark = (now, taken)
        elif now - self._rate_mark[0] >= 1.0:
            then, count = self._rate_mark
            self.rate_eps = (taken - count) / (now - then)
            self._rate_mark = (now, taken)
        self.fleet.forget(now)

    @property
    def events_received(self) -> int:
        """Events read: those taken into the state plus updates skipped under load."""
        return self.events_total + self.skipped

    def sync_from(self, sub: Any, now: float) -> None:
        """:meth:`sync` from a :class:`consumers.runtime.Subscriber`."""
        self.sync(now, connected=sub.connected, ever_connected=sub.ever_connected,
                  rejected=sub.stats.rejected_total, lost=sub.stats.dropped_total,
                  endpoint=sub.subscribe_endpoint, skipped=getattr(sub, "skipped", 0))

    # ------------------------------------------------------------------ judgements

    def metric_health(self, metric: str, value: float | None) -> str:
        return self.fleet.health.health(metric, value)

    def spike_named(self, name: str) -> Spike | None:
        return self.fleet.spike_named(name)

    def spike_for(self, metric: str) -> Spike | None:
        return self.fleet.spike_for(metric)

    def spike_verdict(self, row: Worker, spike: Spike) -> tuple[str, float | None]:
        return self.fleet.spike_verdict(row, spike)

    def value_health(self, row: Worker, metric: str) -> str:
        """Health of a row's latest value of ``metric``, as every view colours it:
        "unknown" (not measured), "nonfinite" (NaN/inf, always the red alarm), the
        HealthTable's ok/warning/critical for a metric with thresholds, else the spike
        rule's severity for a metric judged by one ("" while it has too little history),
        else "" (no judgement: return, sps). One function, so the console and the web page
        can never colour the same value differently."""
        value = row.history.latest(metric)
        if value is None:
            return "unknown"
        if not math.isfinite(value):
            return "nonfinite"
        health = self.fleet.health
        if health.for_metric(metric):
            return health.health(metric, value)
        spike = self.fleet.spike_for(metric)
        if spike is not None:
            severity, ratio = self.fleet.spike_verdict(row, spike)
            return "" if ratio is None else severity
        return ""

    def row_status(self, row: Worker, now: float) -> str:
        return self.fleet.status(row, now)

    def row_verdict(self, row: Worker, now: float) -> tuple[str, str | None]:
        return self.fleet.verdict(row, now)

    def sorted_rows(self) -> list[Worker]:
        return self.fleet.sorted_workers()

    def runs(self) -> list[str]:
        return self.fleet.runs()

    def finished_workers(self, run: str) -> int:
        """Workers of ``run`` that have closed (not in a summary's live or stale counts)."""
        return sum(1 for w in self.fleet.run_workers(run) if w.finished)

    def banner(self, now: float) -> Banner:
        """The worst state (see the module docstring) plus counts of every condition."""
        counts: Counter[str] = Counter()
        worst = DONE
        status_of = self.fleet.status
        for row in self.fleet.workers.values():
            status = status_of(row, now)
            counts[status] += 1
            if STATUS_RANK[status] > STATUS_RANK[worst]:
                worst = status
        firing = Counter(alert.severity for alert in self.alerts.values())
        if firing["critical"] and STATUS_RANK[worst] < STATUS_RANK[CRITICAL]:
            worst = CRITICAL
        elif firing["warning"] and STATUS_RANK[worst] < STATUS_RANK[WARNING]:
            worst = WARNING
        shown = {
            "live": sum(counts[s] for s in (WAITING, OK, WARNING, CRITICAL, NAN)),
            "stale": counts[STALE], "NaN": counts[NAN], "critical": counts[CRITICAL],
            "warning": counts[WARNING], "done": counts[DONE], "alerts": len(self.alerts),
        }
        if not self.connected:
            detail = (f"lost the daemon at {self.endpoint}; reconnecting" if self.ever_connected
                      else f"no daemon reachable at {self.endpoint}")
            return Banner("DISCONNECTED", shown, detail)
        if not self.fleet.workers:
            return Banner("WAITING", shown, "connected; no worker has reported yet")
        return Banner(_BANNER_OF_STATUS[worst], shown)

    def fleet_row(self, run: str, now: float) -> tuple[str, dict[str, Any]]:
        """The fleet row of a run: ("aggregator", ppo_summary fields) when a summary arrived
        within ``stale_after``, else ("local", the same rollup computed by the same fleet
        model over the live rows).

        Once every worker of the run has finished: ("final", the rollup of their last
        values), whatever an aggregator said, since summaries cover live workers only and
        an empty row would hide how the run ended."""
        run_rows = self.fleet.run_workers(run)
        if run_rows and all(r.finished for r in run_rows):
            return "final", dict(self.fleet.rollup(run_rows, (*FLEET_METRICS, *self.columns)),
                                 workers_live=0, workers_stale=0)
        entry = self.summaries.get(run)
        if entry is not None and now - entry[1] <= self.stale_after:
            return "aggregator", entry[0]
        return "local", self.fleet.summary(run, now, (*FLEET_METRICS, *self.columns))
