"""``trainbus aggregate``: per-run rollups across live workers, published as ``ppo_summary``.

Why a separate process: with 64 workers an operator (and a dashboard, and the alerting
process's fleet rules) wants one line per run — "mean grad norm 1.2, worst worker 17 at
8.3" — computed once, not by every viewer. The aggregator keeps every worker's 10-entry
histories (like any consumer), and publishes ``ppo_summary/<run>/all`` back onto the bus
at most twice a second, only for runs that changed since the last summary.

``ppo_summary`` fields (beside the envelope; see also bus.protocol.SCHEMAS):

* ``workers_live`` (int): workers heard from (ppo_update or heartbeat) within
  ``--stale-after`` seconds on the aggregator's own clock and not finished; ``workers_stale``
  (int): the unfinished rest that it still remembers (forgotten after ``--forget-after``).
  A *finished* worker (its emitter closed: the runtime's ``StreamState.finished``) is in
  neither count and out of the rollups: it ended its work, it did not go quiet.
* ``updates`` (int): the highest ``update`` number reported by a live worker (how far the
  run has got).
* ``metrics``: metric -> ``{mean, min, max, worst_worker, worst_value, nonfinite, workers}``
  over the *latest* value of each live worker that reported the metric. ``mean/min/max``
  are over finite values only (NaN when none is finite); ``nonfinite`` counts workers whose
  latest value is NaN/inf, since one such worker is the news and must not vanish into an
  average. ``worst_worker`` is the worker furthest out of health: first by health
  (critical > warning > ok, NaN/inf critical), then by distance beyond the healthy band's
  edge (see :func:`band_distance`); it is None for a metric with no thresholds when every
  value is finite, because "worst" has no meaning there.

``--snapshot-file F`` also writes the whole state (summaries plus every worker's latest
values and histories) as one strict-JSON object, atomically (temp file in the same
directory, fsync, ``os.replace``), so a reader never sees a half-written file.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus import protocol
from consumers.history import TRACKED_METRICS, History
from consumers.thresholds import DEFAULT_HEALTH, SEVERITY_RANK, HealthTable

log = logging.getLogger("trainbus.aggregate")

DEFAULT_STALE_AFTER_S = 5.0
DEFAULT_FORGET_AFTER_S = 3600.0
#: Upper bound on remembered workers (least recently heard from are forgotten first).
DEFAULT_MAX_WORKERS = 10_000
#: "At most twice a second": the shortest allowed publish interval.
MIN_INTERVAL_S = 0.5

WorkerId = int | str


@dataclass(slots=True)
class WorkerState:
    """What the aggregator remembers of one (run, worker)."""

    run: str
    worker: WorkerId
    history: History
    last_seen: float  # this process's monotonic clock
    last_ts: float | None = None
    session: str | None = None
    update: int | None = None
    updates_received: int = 0
    finished: bool = False  # copied from the runtime by Aggregator.sync

    def live(self, now: float, stale_after: float) -> bool:
        """Still working and recently heard from (a finished worker is never live)."""
        return self.condition(now, stale_after) == "live"

    def condition(self, now: float, stale_after: float) -> str:
        """"live", "stale" or "finished": which count of a summary this worker is in."""
        if self.finished:
            return "finished"
        return "live" if now - self.last_seen <= stale_after else "stale"


# --------------------------------------------------------------------- pure rollup


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


def _worker_order(worker: WorkerId) -> tuple[int, int, str]:
    return (0, worker, "") if isinstance(worker, int) else (1, 0, str(worker))


def rollup(metric: str, values: Mapping[WorkerId, float],
           health: HealthTable = DEFAULT_HEALTH) -> dict[str, Any]:
    """One metric across workers: mean/min/max of the finite values, the worst worker.

    Pure and deterministic (ties go to the lowest worker id), so the monitor can compute
    the same fleet row locally when no aggregator runs.
    """
    finite = [v for v in values.values() if math.isfinite(v)]
    worst_worker: WorkerId | None = None
    worst_value: float | None = None
    worst_key: tuple[int, float] | None = None
    for worker in sorted(values, key=_worker_order):
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


class Aggregator:
    """Per-worker histories and per-run rollups; fed with events, no sockets.

    ``now`` is passed in (the caller's monotonic clock) so tests drive time by hand.
    """

    def __init__(self, health: HealthTable = DEFAULT_HEALTH, *,
                 stale_after: float = DEFAULT_STALE_AFTER_S,
                 forget_after: float = DEFAULT_FORGET_AFTER_S,
                 max_workers: int = DEFAULT_MAX_WORKERS,
                 metrics: Iterable[str] = TRACKED_METRICS) -> None:
        self.health = health
        self.stale_after = stale_after
        self.forget_after = forget_after
        self.max_workers = max_workers
        self.metrics = tuple(metrics)
        self.workers: OrderedDict[tuple[str, WorkerId], WorkerState] = OrderedDict()
        self._dirty: set[str] = set()
        self._published_counts: dict[str, tuple[int, int, int]] = {}
        self.events = 0

    # ------------------------------------------------------------------ input

    def ingest(self, event: protocol.Event, now: float) -> None:
        """Take one ppo_update or heartbeat (other types are ignored)."""
        if event.type not in (protocol.PPO_UPDATE, protocol.HEARTBEAT) or event.worker == protocol.ALL_WORKERS:
            return
        key = (event.run, event.worker)
        state = self.workers.get(key)
        if state is None:
            state = WorkerState(event.run, event.worker, History(self.metrics), now)
            self.workers[key] = state
            if len(self.workers) > self.max_workers:
                old_key, _ = self.workers.popitem(last=False)
                self._dirty.add(old_key[0])
        else:
            self.workers.move_to_end(key)
        self.events += 1
        state.last_seen = now
        state.session = event.session
        if state.last_ts is None or event.ts >= state.last_ts:
            state.last_ts = event.ts
        if event.type == protocol.PPO_UPDATE:
            fields = event.fields
            state.history.add(fields)
            state.update = fields.get("update")
            state.updates_received += 1
            self._dirty.add(event.run)

    def sync(self, streams: Mapping[tuple[str, WorkerId], Any]) -> None:
        """Copy ``finished`` from the subscriber runtime's StreamState map (the runtime owns
        session accounting: which session is current, duplicates, the snapshot merge).
        Call it before :meth:`due_summaries`; a change makes its run due."""
        for key, state in self.workers.items():
            stream = streams.get(key)
            if stream is not None and stream.finished != state.finished:
                state.finished = stream.finished
                self._dirty.add(key[0])

    def forget(self, now: float) -> int:
        """Drop workers silent for longer than ``forget_after``; returns how many."""
        gone = [key for key, state in self.workers.items() if now - state.last_seen > self.forget_after]
        for key in gone:
            del self.workers[key]
            self._dirty.add(key[0])
        return len(gone)

    # ------------------------------------------------------------------ output

    def runs(self) -> list[str]:
        return sorted({run for run, _ in self.workers})

    def summary(self, run: str, now: float) -> dict[str, Any]:
        """The ``ppo_summary`` fields of one run (see the module docstring)."""
        live: list[WorkerState] = []
        stale = 0
        for (state_run, _), state in self.workers.items():
            if state_run != run:
                continue
            condition = state.condition(now, self.stale_after)
            if condition == "live":
                live.append(state)
            elif condition == "stale":
                stale += 1
        metrics: dict[str, dict[str, Any]] = {}
        for metric in self.metrics:
            values = {}
            for state in live:
                latest = state.history.latest(metric)
                if latest is not None:
                    values[state.worker] = latest
            if values:
                metrics[metric] = rollup(metric, values, self.health)
        updates = max((s.update for s in live if s.update is not None), default=0)
        return {"workers_live": len(live), "workers_stale": stale, "updates": updates,
                "metrics": metrics}

    def summaries(self, now: float) -> dict[str, dict[str, Any]]:
        return {run: self.summary(run, now) for run in self.runs()}

    def due_summaries(self, now: float) -> dict[str, dict[str, Any]]:
        """Summaries of the runs that changed since the last call: new updates, or a worker
        turning stale, finishing or coming back. A run that went quiet (all workers stale or
        finished) is summarised once more, then stays quiet instead of repeating itself
        twice a second forever."""
        counts: dict[str, Counter[str]] = {}
        for (run, _), state in self.workers.items():
            counts.setdefault(run, Counter())[state.condition(now, self.stale_after)] += 1
        due: dict[str, dict[str, Any]] = {}
        for run in sorted(set(counts) | self._dirty):
            run_counts = counts.get(run, Counter())
            key = (run_counts["live"], run_counts["stale"], run_counts["finished"])
            if run in self._dirty or self._published_counts.get(run) != key:
                due[run] = self.summary(run, now)
                self._published_counts[run] = key
        for run in list(self._published_counts):
            if run not in counts:
                del self._published_counts[run]
        self._dirty.clear()
        return due

    def snapshot(self, now: float, streams: Mapping[tuple[str, WorkerId], Any] | None = None,
                 wall_time: float | None = None) -> dict[str, Any]:
        """Everything, for the snapshot file: summaries plus every worker's state.

        ``streams`` (the subscriber runtime's StreamState map) adds restarts and dropped
        counts, which are the runtime's to compute.
        """
        runs: dict[str, dict[str, Any]] = {}
        for run in self.runs():
            runs[run] = dict(self.summary(run, now), workers={})
        for (run, worker), state in self.workers.items():
            stream = streams.get((run, worker)) if streams is not None else None
            runs[run]["workers"][str(worker)] = {
                "live": state.live(now, self.stale_after),
                "finished": state.finished,
                "age_s": round(now - state.last_seen, 3),
                "last_ts": state.last_ts,
                "session": state.session,
                "update": state.update,
                "updates_received": state.updates_received,
                "restarts": getattr(stream, "restarts", 0),
                "dropped": getattr(stream, "dropped", 0),
                "latest": {m: s[-1] for m, s in state.history.series.items() if s},
                "history": {m: list(s) for m, s in state.history.series.items() if s},
            }
        return {"ts": time.time() if wall_time is None else wall_time,
                "stale_after_s": self.stale_after, "runs": runs}


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new file, never half.

    The temp file lives in the target's directory, because ``os.replace`` is atomic only
    within one filesystem.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent or ".", prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bus.cli import add_subscriber_arguments, positive_float, run_name
    from bus.endpoints import DEFAULT_PUBLISH, ENV_PUBLISH

    add_subscriber_arguments(parser)
    # --curve-client comes with the subscriber flags and serves both directions.
    parser.add_argument("--publish", metavar="EP",
                        help=f"daemon publish side for ppo_summary (env {ENV_PUBLISH}, default {DEFAULT_PUBLISH})")
    parser.add_argument("--run", type=run_name, default=None, help="aggregate only this run")
    parser.add_argument("--snapshot-file", metavar="F", default=None,
                        help="also write the full state as JSON to F, atomically, at each summary")
    parser.add_argument("--interval", metavar="S", type=positive_float, default=MIN_INTERVAL_S,
                        help=f"seconds between summaries (default and minimum {MIN_INTERVAL_S})")
    parser.add_argument("--stale-after", metavar="S", type=positive_float, default=DEFAULT_STALE_AFTER_S,
                        help=f"a worker silent this long is stale, left out of rollups (default {DEFAULT_STALE_AFTER_S:g})")
    parser.add_argument("--forget-after", metavar="S", type=positive_float, default=DEFAULT_FORGET_AFTER_S,
                        help=f"forget a worker silent this long (default {DEFAULT_FORGET_AFTER_S:g})")


def run(args: argparse.Namespace) -> int:
    from bus.cli import UsageError
    from bus.lifecycle import install_stop_handlers
    from bus.publisher import EventPublisher
    from consumers.runtime import Subscriber

    if args.interval < MIN_INTERVAL_S:
        raise UsageError(f"--interval must be at least {MIN_INTERVAL_S} s (summaries are published at most twice a second)")
    if args.snapshot_file and not Path(args.snapshot_file).resolve().parent.is_dir():
        raise UsageError(f"--snapshot-file: directory of {args.snapshot_file} does not exist")
    stop = install_stop_handlers()
    aggregator = Aggregator(stale_after=args.stale_after, forget_after=args.forget_after)
    sub = Subscriber.from_args(args, types=[protocol.PPO_UPDATE, protocol.HEARTBEAT], run=args.run)
    publisher = EventPublisher(args.publish, args.curve_client)
    log.info("aggregating %s from %s, summaries to %s every %.2fs%s", args.run or "all runs",
             sub.subscribe_endpoint, publisher.endpoint, args.interval,
             f", snapshot file {args.snapshot_file}" if args.snapshot_file else "")
    published = 0
    next_due = time.monotonic() + args.interval
    snapshot_written_at = -1
    try:
        while not stop.is_set():
            timeout_ms = max(1, int((next_due - time.monotonic()) * 1000))
            events = sub.poll(min(timeout_ms, 200))
            now = time.monotonic()
            for event in events:
                aggregator.ingest(event, now)
            if now < next_due:
                continue
            next_due = now + args.interval
            aggregator.sync(sub.streams)  # here, not per batch: O(workers), at most 2 Hz
            aggregator.forget(now)
            due = aggregator.due_summaries(now)
            for run_id, fields in due.items():
                if publisher.publish(protocol.PPO_SUMMARY, run_id, protocol.ALL_WORKERS, fields):
                    published += 1
            if args.snapshot_file and (due or aggregator.events != snapshot_written_at):
                snapshot_written_at = aggregator.events
                write_atomic(args.snapshot_file,
                             protocol.to_json(aggregator.snapshot(now, sub.streams)) + "\n")
    finally:
        sub.close()
        publisher.close()
        log.info("stopped: %d event(s) aggregated, %d summaries published", aggregator.events, published)
    return 0
