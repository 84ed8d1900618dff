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
from typing import Any

from consumers.monitor_state import MonitorState
from consumers.monitor_view import MonitorView

log = logging.getLogger("trainbus.monitor")

DEFAULT_REFRESH_HZ = 4.0
MAX_REFRESH_HZ = 10.0
DEFAULT_WAIT_S = 2.0
#: The monitor's receive queue bound (messages). A live view wants fresh data more than
#: complete data: if it ever falls behind (a starved CPU), ZeroMQ drops beyond this and
#: the loss shows as "lost N", instead of ~100k queued messages (~70 MB) of stale backlog.
MONITOR_RCVHWM = 20_000


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
    from consumers.health import health_from_args
    from consumers.runtime import Subscriber

    if args.refresh > MAX_REFRESH_HZ:
        raise UsageError(f"--refresh is at most {MAX_REFRESH_HZ:g} Hz (redraws never follow the event rate)")
    health = health_from_args(args)
    stop = install_stop_handlers()
    sub = Subscriber.from_args(args, run=args.run, rcvhwm=MONITOR_RCVHWM,
                               forget_after=args.forget_after)
    state = MonitorState(health.table, spikes=health.spikes, stale_after=args.stale_after,
                         forget_after=args.forget_after, book=sub.book)
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
