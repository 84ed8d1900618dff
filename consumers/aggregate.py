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

``--state-file F`` also writes the whole state (summaries plus every worker's latest
values and histories) as one strict-JSON object, atomically (temp file in the same
directory, fsync, ``os.replace``), so a reader never sees a half-written file.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bus import protocol
from consumers.fleet import (
    DEFAULT_MAX_WORKERS,
    DEFAULT_STALE_AFTER_S,
    FINISHED,
    LIVE,
    STALE,
    Fleet,
    Worker,
    WorkerKey,
)
from consumers.history import TRACKED_METRICS
from consumers.runtime import DEFAULT_FORGET_AFTER_S, StreamBook
from consumers.thresholds import DEFAULT_HEALTH, HealthTable

log = logging.getLogger("trainbus.aggregate")

#: "At most twice a second": the shortest allowed publish interval.
MIN_INTERVAL_S = 0.5


class Aggregator:
    """Per-run ppo_summary fields over a :class:`consumers.fleet.Fleet`; no sockets.

    The fleet model owns the workers (histories, liveness, forgetting); this class adds
    only what publishing needs: which runs changed since the last summary. ``now`` is
    passed in (the caller's monotonic clock) so tests drive time by hand.
    """

    def __init__(self, health: HealthTable = DEFAULT_HEALTH, *,
                 stale_after: float = DEFAULT_STALE_AFTER_S,
                 forget_after: float = DEFAULT_FORGET_AFTER_S,
                 max_workers: int = DEFAULT_MAX_WORKERS,
                 metrics: Iterable[str] = TRACKED_METRICS,
                 book: StreamBook | None = None) -> None:
        # No spike trackers: a summary rolls up latest values, it does not judge spikes.
        # Producers' own numeric fields are rolled up too (custom=True), by name.
        self.fleet = Fleet(health=health, spikes=(), metrics=metrics, stale_after=stale_after,
                           forget_after=forget_after, max_workers=max_workers, custom=True,
                           book=book)
        self._dirty: set[str] = set()
        self._published_counts: dict[str, tuple[int, int, int]] = {}

    @property
    def workers(self) -> Mapping[WorkerKey, Worker]:
        return self.fleet.workers

    @property
    def events(self) -> int:
        return self.fleet.events

    @property
    def stale_after(self) -> float:
        return self.fleet.stale_after

    # ------------------------------------------------------------------ input

    def ingest(self, event: protocol.Event, now: float) -> None:
        """Take one event (only ppo_update and heartbeat of a worker matter)."""
        worker = self.fleet.ingest(event, now)
        if worker is not None and event.type == protocol.PPO_UPDATE:
            self._dirty.add(worker.run)

    def forget(self, now: float) -> int:
        """Drop workers silent for longer than ``forget_after``; returns how many."""
        gone = self.fleet.forget(now)
        self._dirty.update(run for run, _ in gone)
        return len(gone)

    # ------------------------------------------------------------------ output

    def runs(self) -> list[str]:
        return self.fleet.runs()

    def summary(self, run: str, now: float) -> dict[str, Any]:
        """The ``ppo_summary`` fields of one run (see the module docstring)."""
        return self.fleet.summary(run, now)

    def summaries(self, now: float) -> dict[str, dict[str, Any]]:
        return {run: self.summary(run, now) for run in self.runs()}

    def due_summaries(self, now: float) -> dict[str, dict[str, Any]]:
        """Summaries of the runs that changed since the last call: new updates, or a worker
        turning stale, finishing or coming back. A run that went quiet (all workers stale or
        finished) is summarised once more, then stays quiet instead of repeating itself
        twice a second forever."""
        counts = {run: self.fleet.counts(run, now) for run in self.fleet.runs()}
        due: dict[str, dict[str, Any]] = {}
        for run in sorted(set(counts) | self._dirty):
            run_counts = counts.get(run, Counter())
            key = (run_counts[LIVE], run_counts[STALE], run_counts[FINISHED])
            if run in self._dirty or self._published_counts.get(run) != key:
                due[run] = self.summary(run, now)
                self._published_counts[run] = key
        for run in list(self._published_counts):
            if run not in counts:
                del self._published_counts[run]
        self._dirty.clear()
        return due

    def state(self, now: float, wall_time: float | None = None) -> dict[str, Any]:
        """Everything, for the state file: summaries plus every worker's state."""
        runs: dict[str, dict[str, Any]] = {}
        for run in self.runs():
            workers: dict[str, Any] = {}
            for w in self.fleet.run_workers(run):
                series = w.history.series
                workers[str(w.worker)] = {
                    "live": self.fleet.condition(w, now) == LIVE,
                    "finished": w.finished,
                    "age_s": round(w.age(now), 3),
                    "last_ts": w.last_ts,
                    "session": w.session,
                    "update": w.update,
                    "updates_received": w.updates,
                    "restarts": w.restarts,
                    "dropped": w.dropped,
                    "latest": {m: s[-1] for m, s in series.items() if s},
                    "history": {m: list(s) for m, s in series.items() if s},
                }
            runs[run] = dict(self.summary(run, now), workers=workers)
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
    from consumers.fleet import add_fleet_arguments
    from consumers.health import add_rules_argument

    add_subscriber_arguments(parser)
    # --curve-client comes with the subscriber flags and serves both directions.
    parser.add_argument("--publish", metavar="EP",
                        help=f"daemon publish side for ppo_summary (env {ENV_PUBLISH}, default {DEFAULT_PUBLISH})")
    parser.add_argument("--run", type=run_name, default=None, help="aggregate only this run")
    add_rules_argument(parser)  # worst_worker ranks by the same levels the alerts use
    # --state-file, not "snapshot": the snapshot is the daemon's late-join port.
    # --snapshot-file is the name it had before; still accepted.
    parser.add_argument("--state-file", "--snapshot-file", dest="state_file", metavar="F",
                        default=None,
                        help="also write the full state as JSON to F, atomically, at each summary")
    parser.add_argument("--interval", metavar="S", type=positive_float, default=MIN_INTERVAL_S,
                        help=f"seconds between summaries (default and minimum {MIN_INTERVAL_S})")
    add_fleet_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from bus.cli import UsageError
    from bus.lifecycle import install_stop_handlers
    from bus.publisher import EventPublisher
    from consumers.health import health_from_args
    from consumers.runtime import Subscriber

    if args.interval < MIN_INTERVAL_S:
        raise UsageError(f"--interval must be at least {MIN_INTERVAL_S} s (summaries are published at most twice a second)")
    if args.state_file and not Path(args.state_file).resolve().parent.is_dir():
        raise UsageError(f"--state-file: directory of {args.state_file} does not exist")
    stop = install_stop_handlers()
    sub = Subscriber.from_args(args, types=[protocol.PPO_UPDATE, protocol.HEARTBEAT], run=args.run,
                               forget_after=args.forget_after)
    aggregator = Aggregator(health_from_args(args).table, stale_after=args.stale_after,
                            forget_after=args.forget_after, book=sub.book)
    publisher = EventPublisher(args.publish, args.curve_client)
    log.info("aggregating %s from %s, summaries to %s every %.2fs%s", args.run or "all runs",
             sub.subscribe_endpoint, publisher.endpoint, args.interval,
             f", state file {args.state_file}" if args.state_file else "")
    published = 0
    next_due = time.monotonic() + args.interval
    state_written_at = -1
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
            aggregator.forget(now)  # here, not per batch: O(workers), at most 2 Hz
            due = aggregator.due_summaries(now)
            for run_id, fields in due.items():
                if publisher.publish(protocol.PPO_SUMMARY, run_id, protocol.ALL_WORKERS, fields):
                    published += 1
            if args.state_file and (due or aggregator.events != state_written_at):
                state_written_at = aggregator.events
                write_atomic(args.state_file, protocol.to_json(aggregator.state(now)) + "\n")
    finally:
        sub.close()
        publisher.close()
        log.info("stopped: %d event(s) aggregated, %d summaries published", aggregator.events, published)
    return 0
