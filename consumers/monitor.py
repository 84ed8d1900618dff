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
#: Most messages read per poll between two checks of the frame clock: small enough that
#: one batch costs a few ms, so a frame is never late by more.
INGEST_BATCH = 500
#: Once reading has caught up (the queue is empty), wait this long before reading again,
#: so that messages are read in batches rather than woken up for one by one: each wake-up
#: costs ~50-100 µs of CPU on the 2-core VM (a context switch, cold caches), which at a
#: few thousand events a second was most of the monitor's reading cost (measured: 48 µs
#: per event at 2k ev/s, ~2 events per wake-up; 17 µs at 20k). Events wait at most this
#: long, against a frame every 100-250 ms.
INGEST_COALESCE_S = 0.01
#: After drawing, reading gets at least this share of the drawing's time before the next
#: frame (a terminal slower than the refresh period must not stop the reading altogether);
#: small, because shedding keeps reading cheap, and the redraw rate is what is promised.
MIN_INGEST_SHARE = 0.25
#: While shedding with messages still queued when a frame is due, reading may go on for
#: up to this share of a period before the frame is drawn, and the next frame is then a
#: full period later: the redraw rate gives up at most ~5% (never below 0.95x the
#: requested rate on this account) so that reading still gains on a backlog.
SHED_STRETCH = 0.05
#: Shedding starts when reading the full way took more than this share of the time
#: between two frames (wall clock: a starved CPU is as much a reason to shed as a flood) ...
SHED_ENTER_SHARE = 0.5
#: ... and stops when reading while shedding took less than this share: the full way
#: costs about 1.5x as much per update (full validation and the rows: ~20 µs against
#: ~13 µs measured in isolation on the 2-core VM), so it would still fit well under
#: SHED_ENTER_SHARE and the monitor does not flap between the two.
SHED_LEAVE_SHARE = 0.2
#: Most streams whose newest update is held between frames while shedding; an update of
#: a stream beyond them goes the full way at once, so a flood of topics costs bounded
#: memory (a held update is its two frames, a few hundred bytes).
MAX_HELD = 4096
_PPO_PREFIX = protocol.PPO_UPDATE.encode() + b"/"


class SheddingSubscriber(Subscriber):
    """A :class:`consumers.runtime.Subscriber` that, when it cannot keep up, sheds the work
    it can account for instead of lagging.

    While :attr:`shedding`, only the newest ppo_update of each stream is kept between two
    frames (held as received, undecoded); the live loop takes the held ones with
    :meth:`release` right before it draws, and they go the full way (validated decode,
    then the rows). An update superseded by a newer one of its stream before the frame
    is only unpacked and accounted for — its seq (so it is not counted as lost), restart,
    age and newest timestamp go to the runtime's books like any event's — and counted in
    :attr:`skipped`, unless ``must_show(payload)`` says it carries news the rows must show
    (NaN/inf, a critical level; :meth:`MonitorState.must_show`): those go the full way at
    once, in order. So skipping never hides a NaN or a critical value, the rows are always
    judged on the newest update, and what is lost is sparkline resolution (under load the
    10-entry histories hold about one update per stream per frame).

    Order per stream is kept: any other message of a stream (a heartbeat — a closing one
    must come after the update it follows —, an alert, a malformed frame) releases the
    stream's held update first. Anything the cheap look cannot vouch for (bad topic, not a
    map, odd envelope, another version, too large) goes the full way, where it is rejected
    and counted as ever; heartbeats, alerts, summaries and snapshots are never skipped.
    (A superseded update's fields are not schema-checked, so one with a missing field is
    counted as skipped, not as rejected.)

    Shedding starts when reading the full way took more than :data:`SHED_ENTER_SHARE` of
    the time between two frames, and stops when reading while shedding took less than
    :data:`SHED_LEAVE_SHARE` of it (see :meth:`end_frame`). Not on a mere backlog: one
    builds up during every frame's drawing (at 5k ev/s a 100 ms frame leaves 500 queued),
    and is worked off the full way while the full way fits.
    """

    def __init__(self, *args: Any, must_show: Callable[[Mapping[str, Any]], bool] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.must_show = must_show or (lambda fields: False)
        #: Updates read and accounted for but not shown (superseded while shedding).
        self.skipped = 0
        #: Whether ppo_updates are held (newest per stream) until the next frame.
        self.shedding = False
        #: Whether the last read stopped at its batch size (more may be queued).
        self.backlog = False
        #: Messages read so far (taken, skipped or held).
        self.messages_read = 0
        #: Seconds spent reading (never waiting) since the last :meth:`end_frame`.
        self.work_s = 0.0
        #: (run, worker) part of the topic -> the frames of its newest held ppo_update.
        self._held: dict[bytes, list[bytes]] = {}

    @property
    def held(self) -> int:
        """Updates held for the next frame."""
        return len(self._held)

    def _drain(self, events: list[protocol.Event], limit: int = MAX_BATCH) -> int:
        started = time.perf_counter()
        read = super()._drain(events, limit)
        self.backlog = read >= limit
        self.messages_read += read
        self.work_s += time.perf_counter() - started
        return read

    def _take(self, frames: list[bytes], events: list[protocol.Event]) -> None:
        topic = frames[0]
        if self.shedding and len(frames) == 2 and topic.startswith(_PPO_PREFIX):
            self._hold(topic[len(_PPO_PREFIX):], frames, events)
            return
        if self._held:  # whatever else this stream sends comes after its held update
            held = self._held.pop(topic.partition(b"/")[2], None)
            if held is not None:
                super()._take(held, events)
        super()._take(frames, events)

    def _hold(self, stream: bytes, frames: list[bytes], events: list[protocol.Event]) -> None:
        """Keep ``frames`` as ``stream``'s newest update; account for the one it supersedes."""
        held = self._held
        older = held.get(stream)
        if older is None:
            if len(held) >= MAX_HELD:  # bounded: beyond it, the full way at once
                super()._take(frames, events)
                return
        elif not self._skip(older):
            super()._take(older, events)  # news, or not to be vouched for: the full way, in order
        held[stream] = frames

    def release(self) -> list[protocol.Event]:
        """The held updates, the full way (validated, filtered, accounted for): what the
        next frame shows. The live loop calls it right before drawing."""
        events: list[protocol.Event] = []
        if self._held:
            held, self._held = self._held, {}
            take = super()._take
            for frames in held.values():
                take(frames, events)
        return events

    def end_frame(self, window_s: float, ingest_s: float = 0.0) -> None:
        """Decide whether the next frame sheds, from how much of the ``window_s`` seconds
        since the last frame went on reading (this subscriber's share, plus ``ingest_s``
        of the caller's own per-event work): start above :data:`SHED_ENTER_SHARE`, stop
        below :data:`SHED_LEAVE_SHARE`."""
        busy = self.work_s + ingest_s
        self.work_s = 0.0
        share = SHED_LEAVE_SHARE if self.shedding else SHED_ENTER_SHARE
        self.shedding = busy > share * window_s

    def _skip(self, frames: list[bytes]) -> bool:
        """Account for a superseded update without showing it; False to send it the full
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
            state.ingest_many(sub.release(), now)
            state.sync_from(sub, now)
            console.print(MonitorView(state, now, refresh_hz=None))
            return 0
        return _live(args, state, sub, console, stop, Live, MonitorView)
    finally:
        sub.close()


def _live(args: argparse.Namespace, state: MonitorState, sub: SheddingSubscriber, console: Any,
          stop: Any, live_cls: Any, view_cls: Any) -> int:
    """Drain events between frames; draw at a fixed rate whatever the event rate.

    Reading is bounded per frame: batches of at most :data:`INGEST_BATCH` messages until
    the frame is due, then the frame is drawn whatever is still queued (while shedding
    with a backlog, up to :data:`SHED_STRETCH` of a period later). What is queued waits
    for the next frame's reading; when reading cannot keep up, the
    :class:`SheddingSubscriber` sheds (and counts) superseded updates, its held updates
    reaching the rows right before each frame, and ZeroMQ's receive bound
    (MONITOR_RCVHWM) is the last resort, its loss counted as "lost"."""
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
            window_start = now  # reading time since the last frame ended
            ingest_s = 0.0  # of it, spent taking events into the state
            stretched = False  # this frame is drawn late, to read on while shedding
            while not stop.is_set():
                t = time.monotonic()
                remaining = next_frame - t
                behind = sub.shedding and sub.backlog and t < next_frame + SHED_STRETCH * period
                if remaining > 0 or behind:
                    # Still behind when the frame is due: read on a little (stretched).
                    stretched = stretched or remaining <= 0
                    read_before = sub.messages_read
                    events = sub.poll(max(0, int(remaining * 1000)), INGEST_BATCH)
                    started = time.perf_counter()
                    state.ingest_many(events, time.monotonic())
                    ingest_s += time.perf_counter() - started
                    if sub.messages_read > read_before and not sub.backlog:
                        # Caught up: let the next messages gather instead of waking for each.
                        pause = min(INGEST_COALESCE_S, next_frame - time.monotonic())
                        if pause > 0:
                            time.sleep(pause)
                    continue
                now = time.monotonic()
                state.ingest_many(sub.release(), now)
                state.sync_from(sub, now)
                live.update(view_cls(state, now, refresh_hz=args.refresh, fit_height=True), refresh=True)
                after = time.monotonic()
                sub.end_frame(now - window_start, ingest_s)
                window_start, ingest_s = after, 0.0
                # Never burst (a late frame is not followed by catch-up frames) and never let
                # drawing stop reading: the next frame comes one period later (a stretched
                # frame moves the schedule back by its stretch, at most SHED_STRETCH of a
                # period), and no sooner than MIN_INGEST_SHARE of this frame's drawing time
                # from now.
                if stretched:
                    next_frame = min(now, next_frame + SHED_STRETCH * period)
                    stretched = False
                next_frame = max(next_frame + period, after + MIN_INGEST_SHARE * (after - now))
            now = time.monotonic()
            state.ingest_many(sub.release(), now)
            state.sync_from(sub, now)
            live.update(view_cls(state, now, refresh_hz=args.refresh, fit_height=False), refresh=False)
    finally:
        root.handlers = saved_handlers
    return 0
