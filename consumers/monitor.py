"""``trainbus monitor``: the live console an operator leaves open all day.

The process only: a subscriber loop that drains events into a
:class:`consumers.monitor_state.MonitorState` between frames and redraws a
:class:`consumers.monitor_view.MonitorView` at a fixed rate (default 4 Hz, at most 10 Hz),
so the drawing cost does not depend on the event rate, and per-event work is a few dict
lookups and deque appends. What is shown, and why (banner precedence, finished workers,
spikes), is documented in :mod:`consumers.monitor_state`; how it is drawn in
:mod:`consumers.monitor_view`.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from bus import protocol
from consumers.monitor_state import MonitorState
from consumers.monitor_view import MonitorView
from consumers.runtime import MAX_BATCH, Subscriber

log = logging.getLogger("trainbus.monitor")

DEFAULT_REFRESH_HZ = 4.0
MAX_REFRESH_HZ = 10.0
DEFAULT_WAIT_S = 2.0
#: The monitor's receive queue bound (messages). A live view wants fresh data more than
#: complete data: if it ever falls behind (a starved CPU), ZeroMQ drops beyond this and
#: the loss shows as "lost N", instead of ~100k queued messages (~70 MB) of stale backlog.
MONITOR_RCVHWM = 20_000
#: Most messages read per poll between two checks of the frame clock. A full batch means
#: the socket held a backlog, which is when :class:`SheddingSubscriber` sheds; the batch
#: is small enough that one costs a few ms, so a frame is never late by more than that.
INGEST_BATCH = 500
#: After drawing, reading gets at least this share of the drawing's time before the next
#: frame (a terminal slower than the refresh period must not stop the reading altogether);
#: small, because shedding keeps reading cheap, and the redraw rate is what is promised.
MIN_INGEST_SHARE = 0.25
_PPO_PREFIX = protocol.PPO_UPDATE.encode() + b"/"


class SheddingSubscriber(Subscriber):
    """A :class:`consumers.runtime.Subscriber` that, when it falls behind, sheds the work
    it can account for instead of lagging.

    Falling behind is a full batch (``poll(max_messages=N)`` found at least N messages
    queued). In such a batch only the newest ppo_update of each stream (topic) goes the
    full way (validated decode, then the rows); an older one of the same stream is only
    unpacked and accounted for — its seq (so it is not counted as lost), restart, age
    and newest timestamp go to the runtime's books like any event's — and counted in
    ``skipped``, unless ``must_show(payload)`` says it carries news the rows must show
    (NaN/inf, a critical level; :meth:`MonitorState.must_show`): those always go the full
    way, in order. So skipping never hides a NaN or a critical value, and the status is
    always judged on the newest update; what is lost is sparkline resolution (the
    10-entry histories hold the updates shown, one per stream per batch, under load).

    Anything the cheap look cannot vouch for (bad topic, not a map, odd envelope, another
    version, too large) goes the full way, where it is rejected and counted as ever.
    Heartbeats, alerts, summaries and snapshots are never skipped.
    """

    def __init__(self, *args: Any, must_show: Callable[[Mapping[str, Any]], bool] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.must_show = must_show or (lambda fields: False)
        self.skipped = 0

    def _drain(self, events: list[protocol.Event], limit: int = MAX_BATCH) -> None:
        sock = self._sock
        batch: list[list[bytes]] = []
        for _ in range(limit):
            try:
                batch.append(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        accept = self._accept
        if len(batch) < limit:  # drained the queue: keeping up, nothing to shed
            for frames in batch:
                event = accept(frames)
                if event is not None:
                    events.append(event)
            return
        newest = {frames[0]: i for i, frames in enumerate(batch) if len(frames) == 2}
        skip = self._skip
        for i, frames in enumerate(batch):
            if len(frames) == 2 and newest[frames[0]] != i and frames[0].startswith(_PPO_PREFIX) \
                    and skip(frames):
                continue
            event = accept(frames)
            if event is not None:
                events.append(event)

    def _skip(self, frames: list[bytes]) -> bool:
        """Account for an older ppo_update without showing it; False to send it the full
        way (it must be shown, or the cheap look cannot vouch for it)."""
        try:  # the envelope only: a skipped update is accounted for, its schema unchecked
            event = protocol.decode(frames, self.max_bytes, check_schema=False)
        except protocol.ProtocolError:
            return False
        if (self.run is not None and event.run != self.run) or self.must_show(event.fields):
            return False
        self.stats.received += 1
        gap = self.book.record(event, time.monotonic())
        if gap is None:
            self.stats.duplicates += 1
            return True
        if gap:
            self.stats.dropped_by_type[event.type] += gap
        self.skipped += 1
        return True


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
    from consumers.fleet import add_fleet_arguments
    from consumers.health import add_rules_argument

    add_subscriber_arguments(parser)
    parser.add_argument("--run", type=run_name, default=None, help="show only this run")
    add_rules_argument(parser)
    parser.add_argument("--column", dest="columns", action="append", default=[], metavar="NAME",
                        help="also show this ppo_update field (a producer's own metric, or an "
                             "optional one) with its sparkline; repeatable")
    parser.add_argument("--refresh", metavar="HZ", type=positive_float, default=DEFAULT_REFRESH_HZ,
                        help=f"redraws per second (default {DEFAULT_REFRESH_HZ:g}, at most {MAX_REFRESH_HZ:g})")
    parser.add_argument("--once", action="store_true",
                        help="collect for --wait seconds, print one frame and exit (scripts, non-TTY)")
    parser.add_argument("--wait", metavar="S", type=positive_float, default=DEFAULT_WAIT_S,
                        help=f"with --once: seconds to collect before printing (default {DEFAULT_WAIT_S:g})")
    add_fleet_arguments(parser)
    parser.add_argument("--width", metavar="COLS", type=int, default=None,
                        help="render at this many columns (default: the terminal's; $COLUMNS or 80 when not a terminal)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from bus.cli import UsageError
    from bus.lifecycle import install_stop_handlers
    from consumers.alerting.rules import is_metric
    from consumers.health import health_from_args
    if args.refresh > MAX_REFRESH_HZ:
        raise UsageError(f"--refresh is at most {MAX_REFRESH_HZ:g} Hz (redraws never follow the event rate)")
    for name in args.columns:
        if not is_metric(name):
            raise UsageError(f"--column {name!r}: not a numeric ppo_update field or a name a "
                             "producer's own field can have ([A-Za-z_][A-Za-z0-9_.-]*)")
    health = health_from_args(args)
    stop = install_stop_handlers()
    sub = SheddingSubscriber.from_args(args, run=args.run, rcvhwm=MONITOR_RCVHWM,
                                       forget_after=args.forget_after)
    state = MonitorState(health.table, spikes=health.spikes, columns=args.columns,
                         stale_after=args.stale_after,
                         forget_after=args.forget_after, book=sub.book)
    sub.must_show = state.must_show
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
    """Drain events between frames; draw at a fixed rate whatever the event rate.

    Reading is bounded per frame: batches of at most :data:`INGEST_BATCH` messages until
    the frame is due, then the frame is drawn whatever is still queued. What is queued
    waits for the next frame's reading; if that keeps happening, a
    :class:`SheddingSubscriber` sheds (and counts) older updates of a stream, and ZeroMQ's
    receive bound (MONITOR_RCVHWM) is the last resort, its loss counted as "lost"."""
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
                    state.ingest_many(sub.poll(max(0, int(remaining * 1000)), INGEST_BATCH),
                                      time.monotonic())
                    continue
                now = time.monotonic()
                state.sync_from(sub, now)
                live.update(view_cls(state, now, refresh_hz=args.refresh, fit_height=True), refresh=True)
                after = time.monotonic()
                # Never burst (a late frame is not followed by catch-up frames) and never let
                # drawing stop reading: the next frame comes one period later, and no sooner
                # than MIN_INGEST_SHARE of this frame's drawing time from now.
                next_frame = max(next_frame + period, after + MIN_INGEST_SHARE * (after - now))
            now = time.monotonic()
            state.sync_from(sub, now)
            live.update(view_cls(state, now, refresh_hz=args.refresh, fit_height=False), refresh=False)
    finally:
        root.handlers = saved_handlers
    return 0
