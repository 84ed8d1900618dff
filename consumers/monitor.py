"""``trainbus monitor``: the live console an operator leaves open all day.

Split the way rich itself is split: :class:`MonitorState` is fed with events and knows
nothing about drawing (pure, testable, cheap per event); :mod:`consumers.monitor_view`
builds rich renderables from a state at draw time. The loop in :func:`run` drains the
subscriber between frames and redraws at a fixed rate (default 4 Hz, at most 10 Hz), so
the drawing cost does not depend on the event rate, and per-event work is a few dict
lookups and deque appends.

Memory is bounded whatever the producers do: rows are capped (least recently heard from
dropped first) and forgotten after ``--forget-after`` seconds of silence, each row keeps a
fixed set of 10-entry deques (no reference to the payload), and alerts, run summaries and
log lines are capped too.

Status banner, worst first: DISCONNECTED (no daemon connection) > STALE (a worker silent
longer than ``--stale-after`` on this process's clock: what is shown may be old news) >
NaN DETECTED (a non-finite loss/gradient value or ``nonfinite_grad_count`` > 0) > CRITICAL >
WARNING (health of the latest values, a pre-clip norm spike, or a firing alert of that
severity) > LEARNING (all
healthy) > WAITING (connected, no worker yet) > FINISHED (every worker has closed). Counts
of every other condition are shown next to it, so the banner never hides a second problem.

With PPO's usual ``max_grad_norm = 0.5`` the post-clip norm cannot pass 0.5, so its
absolute thresholds never fire; an explosion shows in the pre-clip norm instead, judged by
the shared :class:`consumers.thresholds.Spike` rules (latest value over the median of the
worker's previous ones): a spike makes the row warning/critical like any other metric.

A worker whose emitter closed (its closing heartbeat arrived: ``StreamState.finished``,
copied in by :meth:`MonitorState.sync`) is *done*: its silence is the end of its work, so
it is never STALE and never raises the banner; it is counted apart ("2 done"), its row is
dimmed, and it is the first to leave the screen when rows do not fit.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bus import protocol
from consumers.aggregate import rollup
from consumers.history import HISTORY_LEN, History
from consumers.thresholds import (
    DEFAULT_HEALTH,
    DEFAULT_SPIKES,
    NONFINITE_CRITICAL,
    SEVERITY_RANK,
    HealthTable,
    Spike,
    SpikeTracker,
)

log = logging.getLogger("trainbus.monitor")

DEFAULT_REFRESH_HZ = 4.0
MAX_REFRESH_HZ = 10.0
DEFAULT_STALE_AFTER_S = 5.0
DEFAULT_FORGET_AFTER_S = 3600.0
DEFAULT_WAIT_S = 2.0
DEFAULT_MAX_ROWS = 4096
MAX_ALERTS = 256
#: The monitor's receive queue bound (messages). A live view wants fresh data more than
#: complete data: if it ever falls behind (a starved CPU), ZeroMQ drops beyond this and
#: the loss shows as "lost N", instead of ~100k queued messages (~70 MB) of stale backlog.
MONITOR_RCVHWM = 20_000
MAX_SUMMARIES = 256

#: Metrics each row keeps a 10-entry history of: what the view draws, plus what decides
#: NaN DETECTED. The latest value shown is the last *measured* one (as TensorBoard shows).
ROW_METRICS: tuple[str, ...] = (
    "grad_norm", "pre_clip_grad_norm", "approx_kl", "clip_fraction", "entropy",
    "explained_variance", "episode_return_mean", "policy_loss", "value_loss", "lr", "sps",
    "nonfinite_grad_count")
#: Metrics whose health decides a row's status (and the banner). Explained variance only
#: colours its cell: on healthy solved runs it is noise around 0 (consumers.thresholds).
HEALTH_METRICS: tuple[str, ...] = ("grad_norm", "approx_kl", "clip_fraction", "entropy")
#: Metrics rolled up in the fleet row when no aggregator publishes ppo_summary.
FLEET_METRICS: tuple[str, ...] = ("grad_norm", "pre_clip_grad_norm", "approx_kl", "clip_fraction",
                                  "entropy", "explained_variance", "episode_return_mean", "sps")

# Row status, worst last (ranks used for sorting and for the banner). DONE ranks lowest:
# a finished worker is no one's problem.
DONE, WAITING, OK, WARNING, CRITICAL, NAN, STALE = (
    "done", "waiting", "ok", "warning", "critical", "nan", "stale")
STATUS_RANK = {DONE: 0, WAITING: 1, OK: 2, WARNING: 3, CRITICAL: 4, NAN: 5, STALE: 6}

BANNERS = ("FINISHED", "WAITING", "LEARNING", "WARNING", "CRITICAL", "NaN DETECTED", "STALE",
           "DISCONNECTED")
_BANNER_OF_STATUS = {DONE: "FINISHED", WAITING: "WAITING", OK: "LEARNING", WARNING: "WARNING",
                     CRITICAL: "CRITICAL", NAN: "NaN DETECTED", STALE: "STALE"}

WorkerId = int | str
RowKey = tuple[str, WorkerId]


@dataclass(slots=True)
class Row:
    """One (run, worker) as the monitor sees it."""

    run: str
    worker: WorkerId
    history: History
    last_seen: float  # this process's monotonic clock
    last_ts: float | None = None  # producer wall clock, shown separately
    update: int | None = None
    env_steps: int | None = None
    updates: int = 0
    # Copied from the subscriber runtime (which owns gap, restart and session accounting).
    restarts: int = 0
    dropped: int = 0
    finished: bool = False  # its current session closed (StreamState.finished)
    # Per spike rule (by name): ratios judged as each update arrived, as the alert engine does.
    spikes: dict[str, SpikeTracker] = field(default_factory=dict)

    def latest(self, metric: str) -> float | None:
        return self.history.latest(metric)

    def age(self, now: float) -> float:
        return now - self.last_seen


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


class MonitorState:
    """Everything the monitor shows, fed with events; no sockets, no drawing.

    ``now`` is always passed in (the caller's ``time.monotonic()``), so tests can drive
    staleness by hand and one frame uses one consistent clock.
    """

    def __init__(self, health: HealthTable = DEFAULT_HEALTH, *,
                 spikes: tuple[Spike, ...] = DEFAULT_SPIKES,
                 stale_after: float = DEFAULT_STALE_AFTER_S,
                 forget_after: float = DEFAULT_FORGET_AFTER_S,
                 max_rows: int = DEFAULT_MAX_ROWS,
                 run_filter: str | None = None) -> None:
        self.health = health
        self.spikes = tuple(s for s in spikes if s.metric in ROW_METRICS)  # needs a history
        self._spike_by_name = {s.name: s for s in self.spikes}
        self.stale_after = stale_after
        self.forget_after = forget_after
        self.max_rows = max_rows
        self.run_filter = run_filter
        self.rows: OrderedDict[RowKey, Row] = OrderedDict()
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

    # ------------------------------------------------------------------ input

    def ingest(self, event: protocol.Event, now: float) -> None:
        """Take one event. Cheap: called up to tens of thousands of times a second."""
        self.events_total += 1
        kind = event.type
        self.events_by_type[kind] += 1
        if kind == protocol.PPO_UPDATE or kind == protocol.HEARTBEAT:
            worker = event.worker
            if worker == protocol.ALL_WORKERS:
                return
            key = (event.run, worker)
            row = self.rows.get(key)
            if row is None:
                row = self._add_row(key, now)
            else:
                self.rows.move_to_end(key)
            row.last_seen = now
            ts = event.ts
            if row.last_ts is None or ts >= row.last_ts:
                row.last_ts = ts
            if kind == protocol.PPO_UPDATE:
                fields = event.fields
                row.history.add(fields)
                for spike in self.spikes:
                    value = fields.get(spike.metric)
                    if isinstance(value, float | int) and not isinstance(value, bool):
                        tracker = row.spikes.get(spike.name)
                        if tracker is None:
                            tracker = row.spikes[spike.name] = SpikeTracker(spike, HISTORY_LEN)
                        tracker.observe(float(value))
                row.update = fields["update"]
                row.env_steps = fields["env_steps"]
                row.updates += 1
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

    def _add_row(self, key: RowKey, now: float) -> Row:
        row = Row(key[0], key[1], History(ROW_METRICS), now)
        self.rows[key] = row
        if len(self.rows) > self.max_rows:
            self.rows.popitem(last=False)
        return row

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

    def sync(self, streams: Mapping[RowKey, Any], now: float, *, connected: bool,
             ever_connected: bool, rejected: int = 0, lost: int = 0, endpoint: str = "") -> None:
        """Once per frame: copy restart/drop counts, whether the worker finished, and the
        connection state from the runtime, update the event rate, forget long-silent rows.

        ``finished`` is the runtime's call (it alone knows sessions, duplicates and the
        snapshot merge), copied before every frame, so the view never lags behind it."""
        for key, row in self.rows.items():
            stream = streams.get(key)
            if stream is not None:
                row.restarts = stream.restarts
                row.dropped = stream.dropped
                row.finished = stream.finished
        self.connected = connected
        self.ever_connected = ever_connected
        self.rejected = rejected
        self.lost = lost
        self.endpoint = endpoint
        if self._rate_mark is None:
            self._rate_mark = (now, self.events_total)
        elif now - self._rate_mark[0] >= 1.0:
            then, count = self._rate_mark
            self.rate_eps = (self.events_total - count) / (now - then)
            self._rate_mark = (now, self.events_total)
        self.forget(now)

    def sync_from(self, sub: Any, now: float) -> None:
        """:meth:`sync` from a :class:`consumers.runtime.Subscriber`."""
        self.sync(sub.streams, now, connected=sub.connected, ever_connected=sub.ever_connected,
                  rejected=sub.stats.rejected_total, lost=sub.stats.dropped_total,
                  endpoint=sub.subscribe_endpoint)

    def forget(self, now: float) -> int:
        """Drop rows silent for longer than ``forget_after``."""
        gone = [key for key, row in self.rows.items() if now - row.last_seen > self.forget_after]
        for key in gone:
            del self.rows[key]
        return len(gone)

    # ------------------------------------------------------------------ judgements

    def metric_health(self, metric: str, value: float | None) -> str:
        return self.health.health(metric, value)

    def spike_named(self, name: str) -> Spike | None:
        """The spike rule behind a verdict's culprit, or None when the culprit is a metric."""
        return self._spike_by_name.get(name)

    def spike_for(self, metric: str) -> Spike | None:
        """The spike rule judging ``metric`` (the first, if several), for the view's colours."""
        return next((s for s in self.spikes if s.metric == metric), None)

    @staticmethod
    def spike_ratio(row: Row, spike: Spike) -> float | None:
        """The row's latest value of the spike's metric over the median of the (up to 9)
        values before it; None before ``min_history`` of them (see Spike)."""
        tracker = row.spikes.get(spike.name)
        return tracker.latest if tracker is not None else None

    def spike_verdict(self, row: Row, spike: Spike) -> tuple[str, float | None]:
        """(severity, ratio) under one spike rule, judged as its alert is: the ratio is the
        smallest of the last ``spike.sustain`` ones (the level all of them exceeded, as the
        rule's ``for`` demands), or the latest ratio while fewer can be judged."""
        tracker = row.spikes.get(spike.name)
        sustained = tracker.sustained() if tracker is not None else None
        if sustained is not None:
            return spike.severity(sustained), sustained
        return "ok", self.spike_ratio(row, spike)

    def row_status(self, row: Row, now: float) -> str:
        """done, STALE, NaN, critical, warning, ok, or waiting (heartbeats but no update yet)."""
        return self.row_verdict(row, now)[0]

    def row_verdict(self, row: Row, now: float) -> tuple[str, str | None]:
        """(status, what decided a warning/critical status, else None): a metric name for a
        threshold, a spike rule's name (see :meth:`spike_named`) for a spike. At equal
        severity the thresholds, then the spikes, are named in their table order.

        A finished worker is done before anything else: however long ago it closed, its
        silence is expected, and its last values are history, not a live condition."""
        if row.finished:
            return DONE, None
        if row.age(now) > self.stale_after:
            return STALE, None
        if row.updates == 0:
            return WAITING, None
        if self.has_nonfinite(row):
            return NAN, None
        worst, culprit = OK, None
        for metric in HEALTH_METRICS:
            severity = self.health.health(metric, row.history.latest(metric))
            if SEVERITY_RANK[severity] > SEVERITY_RANK[worst]:
                worst, culprit = severity, metric
        for spike in self.spikes:
            severity = self.spike_verdict(row, spike)[0]
            if SEVERITY_RANK[severity] > SEVERITY_RANK[worst]:
                worst, culprit = severity, spike.name
        return worst, culprit

    @staticmethod
    def has_nonfinite(row: Row) -> bool:
        for metric in NONFINITE_CRITICAL:
            value = row.history.latest(metric)
            if value is not None and not math.isfinite(value):
                return True
        count = row.history.latest("nonfinite_grad_count")
        return bool(count) and count > 0  # type: ignore[operator]

    def sorted_rows(self) -> list[Row]:
        return sorted(self.rows.values(), key=lambda r: (r.run, _worker_order(r.worker)))

    def runs(self) -> list[str]:
        return sorted({run for run, _ in self.rows})

    def finished_workers(self, run: str) -> int:
        """Workers of ``run`` that have closed (not in a summary's live or stale counts)."""
        return sum(1 for (row_run, _), r in self.rows.items() if row_run == run and r.finished)

    def banner(self, now: float) -> Banner:
        """The worst state (see the module docstring) plus counts of every condition."""
        counts: Counter[str] = Counter()
        worst = DONE
        for row in self.rows.values():
            status = self.row_status(row, now)
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
        if not self.rows:
            return Banner("WAITING", shown, "connected; no worker has reported yet")
        return Banner(_BANNER_OF_STATUS[worst], shown)

    def fleet(self, run: str, now: float) -> tuple[str, dict[str, Any]]:
        """The fleet row of a run: ("aggregator", ppo_summary fields) when a summary arrived
        within ``stale_after``, else ("local", the same rollup computed over live rows).

        Once every worker of the run has finished: ("final", the rollup of their last
        values), whatever an aggregator said, since summaries cover live workers only and
        an empty row would hide how the run ended."""
        run_rows = [r for (row_run, _), r in self.rows.items() if row_run == run]
        unfinished = [r for r in run_rows if not r.finished]
        if run_rows and not unfinished:
            return "final", dict(self._rollup(run_rows), workers_live=0, workers_stale=0)
        entry = self.summaries.get(run)
        if entry is not None and now - entry[1] <= self.stale_after:
            return "aggregator", entry[0]
        live = [r for r in unfinished if r.age(now) <= self.stale_after]
        return "local", dict(self._rollup(live), workers_live=len(live),
                             workers_stale=len(unfinished) - len(live))

    def _rollup(self, rows: list[Row]) -> dict[str, Any]:
        """``metrics`` and ``updates`` of a ppo_summary, over ``rows``' latest values."""
        metrics: dict[str, dict[str, Any]] = {}
        for metric in FLEET_METRICS:
            values = {r.worker: v for r in rows if (v := r.history.latest(metric)) is not None}
            if values:
                metrics[metric] = rollup(metric, values, self.health)
        updates = max((r.update for r in rows if r.update is not None), default=0)
        return {"updates": updates, "metrics": metrics}


def _worker_order(worker: WorkerId) -> tuple[int, int, str]:
    return (0, worker, "") if isinstance(worker, int) else (1, 0, str(worker))


class StateLogHandler(logging.Handler):
    """Shows the last few warnings inside the frame instead of on stderr, which would
    tear the live display apart (connection state is the banner's job, not a log line's)."""

    def __init__(self, state: MonitorState) -> None:
        super().__init__(logging.WARNING)
        self.state = state
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.state.log_lines.append(self.format(record))
        except Exception:
            self.handleError(record)


# --------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bus.cli import add_subscriber_arguments, positive_float, run_name

    add_subscriber_arguments(parser)
    parser.add_argument("--run", type=run_name, default=None, help="show only this run")
    parser.add_argument("--refresh", metavar="HZ", type=positive_float, default=DEFAULT_REFRESH_HZ,
                        help=f"redraws per second (default {DEFAULT_REFRESH_HZ:g}, at most {MAX_REFRESH_HZ:g})")
    parser.add_argument("--once", action="store_true",
                        help="collect for --wait seconds, print one frame and exit (scripts, non-TTY)")
    parser.add_argument("--wait", metavar="S", type=positive_float, default=DEFAULT_WAIT_S,
                        help=f"with --once: seconds to collect before printing (default {DEFAULT_WAIT_S:g})")
    parser.add_argument("--stale-after", metavar="S", type=positive_float, default=DEFAULT_STALE_AFTER_S,
                        help=f"a worker silent this long is STALE (default {DEFAULT_STALE_AFTER_S:g})")
    parser.add_argument("--forget-after", metavar="S", type=positive_float, default=DEFAULT_FORGET_AFTER_S,
                        help=f"drop a worker's row after this long without a word (default {DEFAULT_FORGET_AFTER_S:g})")
    parser.add_argument("--width", metavar="COLS", type=int, default=None,
                        help="render at this many columns (default: the terminal's; $COLUMNS or 80 when not a terminal)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from bus.cli import UsageError
    from bus.lifecycle import install_stop_handlers
    from consumers.monitor_view import MonitorView
    from consumers.runtime import Subscriber

    if args.refresh > MAX_REFRESH_HZ:
        raise UsageError(f"--refresh is at most {MAX_REFRESH_HZ:g} Hz (redraws never follow the event rate)")
    stop = install_stop_handlers()
    state = MonitorState(stale_after=args.stale_after, forget_after=args.forget_after,
                         run_filter=args.run)
    sub = Subscriber.from_args(args, run=args.run, rcvhwm=MONITOR_RCVHWM)
    console = Console(highlight=False, width=args.width)
    try:
        if args.once:
            deadline = time.monotonic() + args.wait
            while not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                state.ingest_many(sub.poll(max(1, min(200, int(remaining * 1000)))), time.monotonic())
            now = time.monotonic()
            state.sync_from(sub, now)
            console.print(MonitorView(state, now, refresh_hz=None))
            return 0
        return _live(args, state, sub, console, stop, Live, MonitorView)
    finally:
        sub.close()


def _live(args: argparse.Namespace, state: MonitorState, sub: Any, console: Any, stop: Any,
          live_cls: Any, view_cls: Any) -> int:
    """Drain events between frames; draw at a fixed rate whatever the event rate."""
    period = 1.0 / args.refresh
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    if console.is_terminal:
        # Log lines on the terminal would tear the live frame apart: show them inside it.
        # (Not on a pipe, where Live prints only the final frame and stderr is a fine home.)
        root.handlers = [StateLogHandler(state)]
    now = time.monotonic()
    state.sync_from(sub, now)
    live = live_cls(view_cls(state, now, refresh_hz=args.refresh, fit_height=True), console=console,
                    auto_refresh=False, screen=False, transient=False,
                    redirect_stdout=False, redirect_stderr=False)
    try:
        with live:
            next_frame = now + period
            while not stop.is_set():
                remaining = next_frame - time.monotonic()
                if remaining > 0:
                    state.ingest_many(sub.poll(max(0, int(remaining * 1000))), time.monotonic())
                    continue
                now = time.monotonic()
                state.sync_from(sub, now)
                live.update(view_cls(state, now, refresh_hz=args.refresh, fit_height=True), refresh=True)
                after = time.monotonic()
                # Never burst and never let drawing starve reading: the next frame comes one
                # period later, and no sooner than the time this frame took to draw, so at
                # least half of a slow terminal's time still goes to draining events.
                next_frame = max(next_frame + period, after + (after - now))
            now = time.monotonic()
            state.sync_from(sub, now)
            live.update(view_cls(state, now, refresh_hz=args.refresh, fit_height=False), refresh=False)
    finally:
        root.handlers = saved_handlers
    return 0
