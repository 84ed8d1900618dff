"""``trainbus tail``: events as they arrive, one line each.

Human lines by default (grad norm coloured by health), strict JSON lines with ``--json``
(one object per line, non-finite floats as "nan"/"inf"/"-inf", so ``jq`` always parses).
By default only ``ppo_update`` events are shown, so ``tail --json | jq .grad_norm`` gives
numbers; ``--type`` selects others (repeatable, or ``all``).

Exit status: 0 after ``--count`` events (or when ``--timeout`` ends a run without
``--count`` that saw events), 1 with a one-line message when the timeout passes first,
0 on Ctrl-C. Malformed messages are counted by reason and reported on stderr; the tail
itself never fails on input.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from datetime import datetime
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from bus import protocol
from consumers.health import add_rules_argument, health_from_args
from consumers.runtime import Subscriber, install_stop_handlers
from consumers.thresholds import DEFAULT_HEALTH, HealthTable

log = logging.getLogger("trainbus.tail")

HEALTH_STYLE = {"ok": "green", "warning": "yellow", "critical": "bold red", "unknown": "dim"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bus.cli import add_subscriber_arguments, nonneg_float, positive_int, run_name, worker_id

    add_subscriber_arguments(parser)
    parser.add_argument("--type", dest="types", action="append", metavar="T",
                        choices=[*protocol.EVENT_TYPES, "all"],
                        help="event type to show, repeatable, or 'all' (default: ppo_update)")
    parser.add_argument("--run", type=run_name, help="only this run")
    parser.add_argument("--worker", type=worker_id, help="only this worker (integer or 'all')")
    parser.add_argument("--json", action="store_true", help="strict JSON, one object per line")
    add_rules_argument(parser)
    parser.add_argument("--count", type=positive_int, help="exit 0 after N events")
    parser.add_argument("--timeout", type=nonneg_float,
                        help="give up after S seconds (exit 1 if --count was not reached)")
    parser.add_argument("--history", action="store_true",
                        help="first print the daemon's cached last events of every stream")
    parser.add_argument("--file", metavar="FILE",
                        help="read a recording (trainbus record) instead of the live bus")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}f}"
    return str(value)


def render_line(event: protocol.Event, health: HealthTable = DEFAULT_HEALTH) -> Text:
    """One readable line; the grad norm takes its health colour (by ``--rules``' levels,
    the same the monitor and the alerts use: consumers.health)."""
    stamp = datetime.fromtimestamp(event.ts).strftime("%H:%M:%S.%f")[:-3]
    line = Text(f"{stamp} ", style="dim")
    line.append(f"{event.type:<11} ", style="bold")
    line.append(f"{event.run}/{event.worker} ", style="cyan")
    f = event.fields
    if event.type == protocol.PPO_UPDATE:
        grad = f.get("grad_norm")
        line.append(f"u={f.get('update')} grad=")
        line.append(_fmt(grad), style=HEALTH_STYLE[health.health("grad_norm", grad)])
        line.append(f" pre={_fmt(f.get('pre_clip_grad_norm'))} kl={_fmt(f.get('approx_kl'), 4)}"
                    f" clip={_fmt(f.get('clip_fraction'), 2)} ent={_fmt(f.get('entropy'))}"
                    f" ret={_fmt(f.get('episode_return_mean'), 1)}")
    elif event.type == protocol.ALERT:
        style = "bold red" if f.get("severity") == "critical" else "yellow"
        if f.get("state") == "resolved":
            style = "green"
        line.append(f"{str(f.get('state')).upper()} {f.get('severity')} {f.get('rule')}", style=style)
        line.append(f" {f.get('metric')}={_fmt(f.get('value'))} threshold={_fmt(f.get('threshold'))}")
        if f.get("summary"):
            line.append(f" — {f['summary']}")
    elif event.type == protocol.HEARTBEAT:
        if f.get("closing") is True:  # the emitter's last word: finished, not gone silent
            line.append("closing", style="bold cyan")
            line.append(f" pid={f.get('pid')} host={f.get('host')} last_update={f.get('last_update')}"
                        f" sent={f.get('events_sent')} dropped={f.get('events_dropped')}")
        else:
            line.append(f"alive pid={f.get('pid')} host={f.get('host')} last_update={f.get('last_update')}")
    elif event.type == protocol.BUS_STATS:
        line.append(f"forwarded={f.get('forwarded')} rate={_fmt(f.get('rate_eps'), 1)}/s "
                    f"streams={f.get('streams_cached')} rejected={f.get('rejected')}")
        if f.get("upstream") is not None:  # a node daemon: how its link to the hub is doing
            state = "connected" if f.get("upstream_connected") else "DOWN"
            line.append(f" upstream={f.get('upstream')} {state}",
                        style="" if f.get("upstream_connected") else "bold red")
            line.append(f" connects={f.get('upstream_connects')} refused={f.get('upstream_refused')}")
    elif event.type == protocol.PPO_SUMMARY:
        metrics = f.get("metrics") or {}
        grad = metrics.get("grad_norm") or {}
        line.append(f"workers={f.get('workers_live')} grad mean={_fmt(grad.get('mean'))} "
                    f"max={_fmt(grad.get('max'))} worst=w{grad.get('worst_worker')}")
    else:
        line.append(protocol.to_json({k: v for k, v in f.items() if k not in protocol.ENVELOPE_FIELDS}))
    return line


class Printer:
    """Writes events as JSON lines or rich lines; stops quietly on a closed pipe."""

    def __init__(self, as_json: bool, out: TextIO = sys.stdout,
                 health: HealthTable = DEFAULT_HEALTH) -> None:
        self.as_json = as_json
        self.health = health
        self.out = out
        self.console = None if as_json else Console(file=out, highlight=False, soft_wrap=True)
        self.printed = 0

    def print(self, event: protocol.Event) -> None:
        if self.as_json:
            self.out.write(protocol.to_json(event.fields) + "\n")
            self.out.flush()
        else:
            assert self.console is not None
            self.console.print(render_line(event, self.health))
        self.printed += 1


def _types(args: argparse.Namespace) -> list[str] | None:
    if not args.types:
        return [protocol.PPO_UPDATE]
    if "all" in args.types:
        return None
    return args.types


def _tail_file(args: argparse.Namespace, printer: Printer) -> int:
    from bus.recording import RecordingError, iter_recording

    types = _types(args)
    rejected = 0
    records = iter_recording(args.file)
    while True:
        try:
            _, frames = next(records)
        except StopIteration:
            break
        except RecordingError as exc:
            print(f"trainbus tail: error: {exc}", file=sys.stderr)
            return 1
        try:
            event = protocol.decode(frames)
        except protocol.ProtocolError:
            rejected += 1
            continue
        if not protocol.matches(event, types, args.run, args.worker):
            continue
        printer.print(event)
        if args.count and printer.printed >= args.count:
            break
    if rejected:
        print(f"trainbus tail: skipped {rejected} malformed record(s)", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    printer = Printer(args.json, health=health_from_args(args).table)
    try:
        if args.file:
            return _tail_file(args, printer)
        return _tail_live(args, printer)
    except BrokenPipeError:
        # A reader like `head` went away: that is a normal end for a tail.
        sys.stderr.close()
        return 0


def _tail_live(args: argparse.Namespace, printer: Printer) -> int:
    stop = install_stop_handlers()
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    sub = Subscriber.from_args(args, types=_types(args), run=args.run, worker=args.worker,
                               use_snapshot=args.history)
    status = 0
    try:
        while not stop.is_set():
            if args.count and printer.printed >= args.count:
                break
            if deadline is not None and time.monotonic() >= deadline:
                if args.count or printer.printed == 0:
                    print(f"trainbus tail: timed out after {args.timeout:g}s with "
                          f"{printer.printed} event(s)"
                          + ("" if sub.ever_connected else f"; never connected to {sub.subscribe_endpoint}"),
                          file=sys.stderr)
                    status = 1
                break
            timeout_ms = 200
            if deadline is not None:
                timeout_ms = max(1, min(timeout_ms, int((deadline - time.monotonic()) * 1000)))
            for event in sub.poll(timeout_ms):
                printer.print(event)
                if args.count and printer.printed >= args.count:
                    break
    finally:
        sub.close()
        if sub.stats.rejected_total:
            reasons = ", ".join(f"{r}: {n}" for r, n in sub.stats.rejected.most_common())
            print(f"trainbus tail: skipped {sub.stats.rejected_total} malformed message(s) ({reasons})",
                  file=sys.stderr)
        if sub.stats.dropped_total:
            print(f"trainbus tail: {sub.stats.dropped_total} event(s) lost upstream (seq gaps)",
                  file=sys.stderr)
    return status
