"""The one model of the fleet that every view reads: per-(run, worker) state and rollups.

The monitor, the aggregator and the Prometheus exporter (and the web view after them) are
views over a :class:`Fleet`; none of them keeps per-worker facts of its own. Who owns what:

* :class:`consumers.runtime.StreamBook` (every consumer has one, tail and record too):
  the *accounting* of a producer — its session, restarts, sequence gaps, whether it
  finished, when this process last heard from it (own clock), its newest ``ts``.
* :class:`Fleet`: what views show per worker — a rolling 10-entry :class:`History` of the
  tracked metrics (NaN/inf kept, absent values skipped), a :class:`SpikeTracker` per spike
  rule, the latest ``update``/``env_steps``, non-finite counts — plus a *reference* to the
  worker's :class:`StreamState` (never a copy, so there is nothing to keep in sync and a
  view can never lag behind the runtime). It also judges (:meth:`Fleet.verdict`, by one
  :class:`HealthTable` and one set of spikes: the same ones the alert rules are built
  from, see consumers.health) and rolls up (:meth:`Fleet.summary`, :meth:`Fleet.distribution`,
  :meth:`Fleet.worst`).

Fed by a :class:`consumers.runtime.Subscriber`, a fleet shares the subscriber's book
(``Fleet(book=sub.book)``: the runtime has accounted each event already); fed directly
(tests, a recording replayed offline) it keeps and feeds a book of its own, so both
paths see the same accounting.

Memory is bounded whatever the producers do: at most ``max_workers`` workers (least
recently heard from dropped first), each with a fixed set of 10-entry deques and no
reference to any payload; a worker silent for ``forget_after`` seconds is forgotten
(:meth:`Fleet.forget`), and the book forgets its accounting on the same clock.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bus import protocol
from consumers.history import (
    HISTORY_LEN,
    MAX_CUSTOM_METRICS,
    TRACKED_METRICS,
    History,
    custom_metrics,
)
from consumers.runtime import DEFAULT_FORGET_AFTER_S, StreamBook, StreamState
from consumers.thresholds import (
    DEFAULT_HEALTH,
    DEFAULT_SPIKES,
    NONFINITE_CRITICAL,
    SEVERITY_RANK,
    HealthTable,
    Spike,
    SpikeTracker,
)

WorkerId = int | str
WorkerKey = tuple[str, WorkerId]

DEFAULT_STALE_AFTER_S = 5.0
#: Upper bound on remembered workers (least recently heard from are forgotten first).
DEFAULT_MAX_WORKERS = 10_000

#: Metrics whose health decides a worker's status. Explained variance only colours its
#: cell: on healthy solved runs it is noise around 0 (consumers.thresholds).
HEALTH_METRICS: tuple[str, ...] = ("grad_norm", "approx_kl", "clip_fraction", "entropy")

# Worker status, worst last (ranks used for sorting and for banners). DONE ranks lowest:
# a finished worker is no one's problem.
DONE, WAITING, OK, WARNING, CRITICAL, NAN, STALE = (
    "done", "waiting", "ok", "warning", "critical", "nan", "stale")
STATUS_RANK = {DONE: 0, WAITING: 1, OK: 2, WARNING: 3, CRITICAL: 4, NAN: 5, STALE: 6}

# Which count of a run summary a worker is in.
LIVE, FINISHED = "live", "finished"


@dataclass(slots=True, eq=False)
class Worker:
    """One (run, worker) as every view sees it; accounting read through ``stream``."""

    run: str
    worker: WorkerId
    history: History
    stream: StreamState
    spikes: dict[str, SpikeTracker] = field(default_factory=dict)
    update: int | None = None
    env_steps: int | None = None
    updates: int = 0  # ppo_update events this fleet took in for the worker
    nonfinite_updates: int = 0  # of those, with a NaN/inf pre- or post-clip grad norm
    nonfinite_elements: int = 0  # sum of nonfinite_grad_count where reported

    @property
    def key(self) -> WorkerKey:
        return (self.run, self.worker)

    @property
    def restarts(self) -> int:
        return self.stream.restarts

    @property
    def dropped(self) -> int:
        return self.stream.dropped

    @property
    def finished(self) -> bool:
        """Its current session closed (see StreamState.finished)."""
        return self.stream.finished

    @property
    def session(self) -> str | None:
        return self.stream.session

    @property
    def last_ts(self) -> float | None:
        """Producer wall clock of its newest event (shown, never used for staleness)."""
        return self.stream.last_ts

    @property
    def last_seen(self) -> float:
        """When this process last heard from it (its own monotonic clock)."""
        return self.stream.last_received

    def age(self, now: float) -> float:
        return now - self.stream.last_received

    def latest(self, metric: str) -> float | None:
        return self.history.latest(metric)


def add_fleet_arguments(parser: argparse.ArgumentParser, *, stale: bool = True,
                        forget_after: float = DEFAULT_FORGET_AFTER_S) -> None:
    """``--stale-after`` and ``--forget-after``, the same for every view over a fleet."""
    from bus.cli import positive_float

    if stale:
        parser.add_argument("--stale-after", metavar="S", type=positive_float,
                            default=DEFAULT_STALE_AFTER_S,
                            help="a worker silent this long is stale: STALE on screens, left "
                                 f"out of rollups (default {DEFAULT_STALE_AFTER_S:g})")
    parser.add_argument("--forget-after", metavar="S", type=positive_float, default=forget_after,
                        help="forget a worker (its row, its series, its accounting) after this "
                             f"long without a word (default {forget_after:g})")


def worker_order(worker: WorkerId) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then named ones (the "all"-style ids) by name."""
    return (0, worker, "") if isinstance(worker, int) else (1, 0, str(worker))


# --------------------------------------------------------------------- pure rollups


def band_distance(metric: str, value: float, health: HealthTable = DEFAULT_HEALTH) -> float | None:
    """How far ``value`` is beyond the healthy band's nearest edge (negative: inside).

    The edge of a bound is its warning level (its critical level when it has no warning).
    +inf for a non-finite value; None for a metric without thresholds.
    """
    thresholds = health.for_metric(metric)
    if not thresholds:
        return None if math.isfinite(value) else math.inf
    if not math.isfinite(value):
        return math.inf
    best = -math.inf
    for threshold in thresholds:
        level = threshold.warning if threshold.warning is not None else threshold.critical
        if level is None:
            continue
        distance = value - level if threshold.op == ">" else level - value
        best = max(best, distance)
    return best


def relative_band_distance(metric: str, value: float | None,
                           health: HealthTable = DEFAULT_HEALTH) -> float | None:
    """:func:`band_distance` as a fraction of the edge it is measured from (the absolute
    distance for an edge at 0), so that metrics of different scales can be compared: a
    KL of 0.045 (3x its 0.015 edge) is further out than a grad norm of 6 (1.2x its 5).
    +inf for a non-finite value; None for a missing value or a metric without thresholds."""
    if value is None:
        return None
    if not math.isfinite(value):
        return math.inf
    best: float | None = None
    for threshold in health.for_metric(metric):
        level = threshold.warning if threshold.warning is not None else threshold.critical
        if level is None:
            continue
        distance = value - level if threshold.op == ">" else level - value
        if level:
            distance /= abs(level)
        best = distance if best is None else max(best, distance)
    return best


def rollup(metric: str, values: Mapping[WorkerId, float],
           health: HealthTable = DEFAULT_HEALTH) -> dict[str, Any]:
    """One metric across workers: mean/min/max of the finite values, the worst worker.

    Pure and deterministic (ties go to the lowest worker id). ``worst_worker`` is the
    worker furthest out of health: first by health (critical > warning > ok, NaN/inf
    critical), then by :func:`band_distance`; None for a metric with no thresholds when
    every value is finite, because "worst" has no meaning there.
    """
    finite = [v for v in values.values() if math.isfinite(v)]
    worst_worker: WorkerId | None = None
    worst_value: float | None = None
    worst_key: tuple[int, float] | None = None
    for worker in sorted(values, key=worker_order):
        value = values[worker]
        distance = band_distance(metric, value, health)
        if distance is None:
            continue
        key = (SEVERITY_RANK[health.health(metric, value)], distance)
        if worst_key is None or key > worst_key:
            worst_key, worst_worker, worst_value = key, worker, value
    return {
        "mean": math.fsum(finite) / len(finite) if finite else math.nan,
        "min": min(finite) if finite else math.nan,
        "max": max(finite) if finite else math.nan,
        "worst_worker": worst_worker,
        "worst_value": worst_value,
        "nonfinite": len(values) - len(finite),
        "workers": len(values),
    }


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty): a value some worker
    really has, never an interpolation between two workers."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


# --------------------------------------------------------------------- the model


class Fleet:
    """Every worker's state, judged and rolled up; fed with events, no sockets.

    ``now`` is always passed in (the caller's ``time.monotonic()``), so tests drive
    staleness by hand and one frame or summary uses one consistent clock.
    """

    def __init__(self, *, health: HealthTable = DEFAULT_HEALTH,
                 spikes: Iterable[Spike] = DEFAULT_SPIKES,
                 metrics: Iterable[str] = TRACKED_METRICS,
                 stale_after: float = DEFAULT_STALE_AFTER_S,
                 forget_after: float = DEFAULT_FORGET_AFTER_S,
                 max_workers: int = DEFAULT_MAX_WORKERS,
                 custom: bool = False,
                 book: StreamBook | None = None) -> None:
        self.health = health
        self.metrics = tuple(metrics)
        #: ``custom``: also track producers' own numeric fields (issue "your own metrics"),
        #: the first MAX_CUSTOM_METRICS names seen; later names are counted, not tracked.
        self.custom = custom
        self.custom_metrics: list[str] = []
        self.custom_refused: set[str] = set()
        self.spikes = tuple(s for s in spikes if s.metric in self.metrics)  # needs a history
        self._spike_by_name = {s.name: s for s in self.spikes}
        self.stale_after = stale_after
        self.forget_after = forget_after
        self.max_workers = max_workers
        self._owns_book = book is None
        self.book = StreamBook(forget_after=forget_after, max_streams=max_workers) \
            if book is None else book
        self.workers: OrderedDict[WorkerKey, Worker] = OrderedDict()
        self._by_run: dict[str, dict[WorkerId, Worker]] = {}
        self.events = 0  # producer events taken in
        self._verdicts: dict[WorkerKey, tuple[str, str | None]] = {}
        self._verdict_now: float | None = None

    # ------------------------------------------------------------------ input

    def ingest(self, event: protocol.Event, now: float) -> Worker | None:
        """Take one event; returns the worker it concerns (None for other types, for
        run-level ids, and for a duplicate when this fleet keeps its own book). Cheap:
        called up to tens of thousands of times a second."""
        if self._verdicts:
            self._verdicts.clear()  # judged before this event: no longer current
        if self._owns_book and self.book.record(event, now) is None:
            return None
        kind = event.type
        if (kind != protocol.PPO_UPDATE and kind != protocol.HEARTBEAT) \
                or event.worker == protocol.ALL_WORKERS:
            return None
        key = (event.run, event.worker)
        stream = self.book.streams.get(key)
        if stream is None or stream.session != event.session:
            # The book dropped it (its bound), or a straggler of the session before a
            # restart: its values are not the worker's current state.
            return None
        worker = self.workers.get(key)
        if worker is None:
            worker = self._add(key, stream)
        else:
            self.workers.move_to_end(key)
            worker.stream = stream  # the book may have started a new record for the key
        self.events += 1
        if kind == protocol.PPO_UPDATE:
            self._observe_update(worker, event.fields)
        return worker

    def _observe_update(self, worker: Worker, fields: Mapping[str, Any]) -> None:
        if self.custom:
            self._track_custom(worker, fields)
        worker.history.add(fields)
        for spike in self.spikes:
            value = fields.get(spike.metric)
            if isinstance(value, float | int) and not isinstance(value, bool):
                tracker = worker.spikes.get(spike.name)
                if tracker is None:
                    tracker = worker.spikes[spike.name] = SpikeTracker(spike, HISTORY_LEN)
                tracker.observe(float(value))
        worker.update = fields["update"]
        worker.env_steps = fields["env_steps"]
        worker.updates += 1
        if not (math.isfinite(fields["grad_norm"]) and math.isfinite(fields["pre_clip_grad_norm"])):
            worker.nonfinite_updates += 1
        count = fields.get("nonfinite_grad_count")
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            worker.nonfinite_elements += count

    def _track_custom(self, worker: Worker, fields: Mapping[str, Any]) -> None:
        for name in custom_metrics(fields):
            if name in self.metrics:
                continue  # configured (a monitor column): tracked from the start
            if name not in self.custom_metrics:
                if len(self.custom_metrics) >= MAX_CUSTOM_METRICS:
                    if len(self.custom_refused) < MAX_CUSTOM_METRICS:
                        self.custom_refused.add(name)  # a sample, for the log
                    continue
                self.custom_metrics.append(name)
            worker.history.track(name)

    @property
    def all_metrics(self) -> tuple[str, ...]:
        """The configured metrics, then the custom ones tracked so far."""
        return (*self.metrics, *self.custom_metrics)

    def _add(self, key: WorkerKey, stream: StreamState) -> Worker:
        worker = Worker(key[0], key[1], History(self.metrics), stream)
        self.workers[key] = worker
        self._by_run.setdefault(key[0], {})[key[1]] = worker
        if len(self.workers) > self.max_workers:
            self._remove(next(iter(self.workers)))
        return worker

    def _remove(self, key: WorkerKey) -> None:
        del self.workers[key]
        run_workers = self._by_run[key[0]]
        del run_workers[key[1]]
        if not run_workers:
            del self._by_run[key[0]]

    def forget(self, now: float) -> list[WorkerKey]:
        """Drop workers silent for longer than ``forget_after``; returns their keys (views
        drop whatever they keep per key, e.g. the exporter's series, with them)."""
        horizon = now - self.forget_after
        self._verdicts.clear()
        gone = [key for key, worker in self.workers.items() if worker.stream.last_received < horizon]
        for key in gone:
            self._remove(key)
        if self._owns_book:
            self.book.forget(now)
        return gone

    # ------------------------------------------------------------------ lookup

    def runs(self) -> list[str]:
        return sorted(self._by_run)

    def run_workers(self, run: str) -> list[Worker]:
        """A run's workers in worker-id order."""
        workers = self._by_run.get(run, {})
        return [workers[w] for w in sorted(workers, key=worker_order)]

    def sorted_workers(self) -> list[Worker]:
        return sorted(self.workers.values(), key=lambda w: (w.run, worker_order(w.worker)))

    def __len__(self) -> int:
        return len(self.workers)

    # ------------------------------------------------------------------ judgement

    def condition(self, worker: Worker, now: float) -> str:
        """LIVE, STALE or FINISHED: which count of a run summary the worker is in."""
        if worker.stream.finished:
            return FINISHED
        return LIVE if now - worker.stream.last_received <= self.stale_after else STALE

    def spike_named(self, name: str) -> Spike | None:
        """The spike rule behind a verdict's culprit, or None when the culprit is a metric."""
        return self._spike_by_name.get(name)

    def spike_for(self, metric: str) -> Spike | None:
        """The spike rule judging ``metric`` (the first, if several), for colours."""
        return next((s for s in self.spikes if s.metric == metric), None)

    @staticmethod
    def spike_ratio(worker: Worker, spike: Spike) -> float | None:
        """The latest value of the spike's metric over the median of the (up to 9) values
        before it; None before ``min_history`` of them (see Spike)."""
        tracker = worker.spikes.get(spike.name)
        return tracker.latest if tracker is not None else None

    def spike_verdict(self, worker: Worker, spike: Spike) -> tuple[str, float | None]:
        """(severity, ratio) under one spike rule, judged as its alert is: the ratio is the
        smallest of the last ``spike.sustain`` ones (the level all of them exceeded, as the
        rule's ``for`` demands), or the latest ratio while fewer can be judged."""
        tracker = worker.spikes.get(spike.name)
        sustained = tracker.sustained() if tracker is not None else None
        if sustained is not None:
            return spike.severity(sustained), sustained
        return "ok", self.spike_ratio(worker, spike)

    @staticmethod
    def has_nonfinite(worker: Worker) -> bool:
        """A non-finite loss/gradient value, or ``nonfinite_grad_count`` > 0, among the
        worker's latest values."""
        latest = worker.history.latest
        for metric in NONFINITE_CRITICAL:
            value = latest(metric)
            if value is not None and not math.isfinite(value):
                return True
        count = latest("nonfinite_grad_count")
        return bool(count) and count > 0  # type: ignore[operator]

    def status(self, worker: Worker, now: float) -> str:
        """done, stale, nan, critical, warning, ok, or waiting (heartbeats, no update yet)."""
        return self.verdict(worker, now)[0]

    def verdict(self, worker: Worker, now: float) -> tuple[str, str | None]:
        """(status, what decided a warning/critical status, else None): a metric name for a
        threshold, a spike rule's name (see :meth:`spike_named`) for a spike. At equal
        severity the thresholds, then the spikes, are named in their table order.

        A finished worker is done before anything else: however long ago it closed, its
        silence is expected, and its last values are history, not a live condition.

        Memoised per ``now`` until the next ingest: a frame asks for every worker's status
        several times (banner, ranking, counts, its row), the judgement is made once."""
        if now != self._verdict_now:
            self._verdicts.clear()
            self._verdict_now = now
        key = (worker.run, worker.worker)
        cached = self._verdicts.get(key)
        if cached is None:
            cached = self._verdicts[key] = self._judge(worker, now)
        return cached

    def _judge(self, worker: Worker, now: float) -> tuple[str, str | None]:
        if worker.stream.finished:
            return DONE, None
        if now - worker.stream.last_received > self.stale_after:
            return STALE, None
        if worker.updates == 0:
            return WAITING, None
        if self.has_nonfinite(worker):
            return NAN, None
        worst, culprit = OK, None
        latest = worker.history.latest
        for metric in HEALTH_METRICS:
            severity = self.health.health(metric, latest(metric))
            if SEVERITY_RANK[severity] > SEVERITY_RANK[worst]:
                worst, culprit = severity, metric
        for spike in self.spikes:
            severity = self.spike_verdict(worker, spike)[0]
            if SEVERITY_RANK[severity] > SEVERITY_RANK[worst]:
                worst, culprit = severity, spike.name
        return worst, culprit

    # ------------------------------------------------------------------ rollups

    def rollup(self, workers: Iterable[Worker], metrics: Iterable[str] | None = None) -> dict[str, Any]:
        """``updates`` and ``metrics`` of a ppo_summary, over ``workers``' latest values."""
        workers = list(workers)
        out: dict[str, dict[str, Any]] = {}
        for metric in self.all_metrics if metrics is None else metrics:
            values = {w.worker: v for w in workers if (v := w.history.latest(metric)) is not None}
            if values:
                out[metric] = rollup(metric, values, self.health)
        updates = max((w.update for w in workers if w.update is not None), default=0)
        return {"updates": updates, "metrics": out}

    def counts(self, run: str, now: float) -> Counter[str]:
        """Workers of ``run`` by condition (LIVE, STALE, FINISHED)."""
        return Counter(self.condition(w, now) for w in self._by_run.get(run, {}).values())

    def summary(self, run: str, now: float, metrics: Iterable[str] | None = None) -> dict[str, Any]:
        """The ``ppo_summary`` fields of one run: live/stale counts and the rollup over the
        live workers (a finished worker is in neither count: it ended, it did not go quiet)."""
        live: list[Worker] = []
        stale = 0
        for worker in self.run_workers(run):
            condition = self.condition(worker, now)
            if condition == LIVE:
                live.append(worker)
            elif condition == STALE:
                stale += 1
        return {"workers_live": len(live), "workers_stale": stale, **self.rollup(live, metrics)}

    def distribution(self, run: str, metric: str, now: float) -> dict[str, Any]:
        """One metric across a run's live workers, for runs with more workers than rows:
        p50/p90/max of the finite latest values (nearest rank), how many are non-finite,
        and how many workers are in each health (ok/warning/critical/unknown)."""
        values: list[float] = []
        nonfinite = 0
        health: Counter[str] = Counter()
        for worker in self._by_run.get(run, {}).values():
            if self.condition(worker, now) != LIVE:
                continue
            value = worker.history.latest(metric)
            health[self.health.health(metric, value)] += 1
            if value is None:
                continue
            if math.isfinite(value):
                values.append(value)
            else:
                nonfinite += 1
        values.sort()
        return {"p50": percentile(values, 0.5), "p90": percentile(values, 0.9),
                "max": values[-1] if values else math.nan, "nonfinite": nonfinite,
                "workers": len(values) + nonfinite, "health": dict(health)}

    def worst(self, run: str, now: float, n: int, *, by_distance: bool = False) -> list[Worker]:
        """The ``n`` workers of ``run`` in the worst status (ties: lowest worker id).

        ``by_distance``: within one status, the worker furthest outside the healthy band
        first (:meth:`distance`), then the lowest id — the order a fleet view lists its
        worst workers in, so that of 300 "ok" workers the ones nearest trouble show."""
        workers = self.run_workers(run)
        if by_distance:
            ranked = sorted(workers, key=lambda w: self.rank_key(w, now), reverse=True)
            # reverse=True keeps equal keys in order (stable), so ties stay lowest id first.
        else:
            ranked = sorted(workers, key=lambda w: -STATUS_RANK[self.status(w, now)])  # stable
        return ranked[:n]

    def distance(self, worker: Worker) -> float:
        """How far the worker's latest values are outside the healthy band: the largest
        :func:`relative_band_distance` over the metrics that decide its status (negative
        while all are inside; -inf when none is known; +inf for a non-finite one), or a
        spike's ratio over its warning level when that is larger."""
        latest = worker.history.latest
        best = -math.inf
        for metric in HEALTH_METRICS:
            distance = relative_band_distance(metric, latest(metric), self.health)
            if distance is not None and distance > best:
                best = distance
        for spike in self.spikes:
            ratio = self.spike_verdict(worker, spike)[1]
            if ratio is not None and spike.warning:
                distance = (ratio - spike.warning) / spike.warning
                if distance > best:
                    best = distance
        return best

    def rank_key(self, worker: Worker, now: float) -> tuple[int, float]:
        """(status rank, :meth:`distance`): larger is worse."""
        return (STATUS_RANK[self.status(worker, now)], self.distance(worker))
