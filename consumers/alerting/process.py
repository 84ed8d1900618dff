"""``trainbus alert``: a subscriber process that turns PPO health into trustworthy alerts.

Loop: Subscriber.poll → AlertEngine (rules per update; silence, loss and reminders per
tick, so a worker that stops sending is still noticed) → sinks. History replayed from
the daemon's snapshot on (re)connect rebuilds alert state but only the net change is
notified, so restarting this process does not re-page for incidents already over.

Exit on SIGINT/SIGTERM: stop polling, flush sinks within a bounded wait, close sockets.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from bus import endpoints, protocol
from bus.cli import UsageError, add_subscriber_arguments, positive_float, run_name
from consumers.alerting.alertmanager import DEFAULT_RESEND_S, AlertmanagerSink, alertmanager_url
from consumers.alerting.engine import AlertEngine
from consumers.alerting.promrules import DEFAULT_UPDATE_INTERVAL_S, prometheus_rules
from consumers.alerting.rules import RulesError, load_rules
from consumers.alerting.sinks import (
    DEFAULT_EXEC_TIMEOUT_S,
    DEFAULT_WEBHOOK_TIMEOUT_S,
    BusSink,
    ConsoleSink,
    Dispatcher,
    ExecSink,
    JsonlSink,
    WebhookSink,
)
from consumers.fleet import add_fleet_arguments
from consumers.health import add_rules_argument
from consumers.runtime import Subscriber, install_stop_handlers

log = logging.getLogger(__name__)

#: Silence, loss and reminders are evaluated at least this often (seconds).
TICK_INTERVAL_S = 0.25
POLL_MS = 100
#: How long startup waits for the daemon to subscribe to our alert events.
PUBLISH_WAIT_S = 2.0
#: Longest wait for pager sinks to deliver at exit.
FLUSH_TIMEOUT_S = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_rules_argument(parser)
    parser.add_argument("--log", metavar="FILE", help="append every notification as a JSON line")
    parser.add_argument("--exec", dest="exec_cmd", metavar="CMD",
                        help="shell command run per firing/resolved notification, alert JSON on stdin")
    parser.add_argument("--exec-timeout", type=positive_float, default=DEFAULT_EXEC_TIMEOUT_S,
                        metavar="S", help=f"kill --exec after S seconds (default {DEFAULT_EXEC_TIMEOUT_S:g})")
    parser.add_argument("--webhook", action="append", default=[], metavar="URL",
                        help="POST firing/resolved notifications as JSON with a Slack-style "
                             "'text' field (repeatable)")
    parser.add_argument("--webhook-timeout", type=positive_float, default=DEFAULT_WEBHOOK_TIMEOUT_S,
                        metavar="S", help="per-attempt timeout of --webhook and --alertmanager "
                                          f"(default {DEFAULT_WEBHOOK_TIMEOUT_S:g})")
    parser.add_argument("--alertmanager", action="append", default=[], metavar="URL",
                        help="keep Prometheus Alertmanager at URL (e.g. http://127.0.0.1:9093) "
                             "informed of firing/resolved alerts via its API v2 (repeatable)")
    parser.add_argument("--alertmanager-resend", type=positive_float, default=DEFAULT_RESEND_S,
                        metavar="S", help="re-post firing alerts every S seconds; endsAt = now + 4 S "
                                          f"(default {DEFAULT_RESEND_S:g})")
    parser.add_argument("--silent-after", type=positive_float, metavar="S",
                        help="alert when a worker sends nothing for S seconds (default 30)")
    parser.add_argument("--run", type=run_name, metavar="R", help="only watch this run")
    # A worker forgotten after this much silence has its alerts resolved and its state
    # dropped (AlertEngine follows the runtime), so memory follows the live workers.
    add_fleet_arguments(parser, stale=False)
    parser.add_argument("--no-publish", action="store_true",
                        help="do not publish alert/<run>/<worker> events on the bus")
    parser.add_argument("--list-rules", action="store_true",
                        help="print the effective rules (after --rules) and exit")
    parser.add_argument("--replay", metavar="FILE",
                        help="judge a recording (trainbus record) offline with these rules: "
                             "print what would have been sent, then a summary, and exit")
    parser.add_argument("--format", choices=("text", "prometheus"), default="text",
                        help="--list-rules output: text (default) or a Prometheus rule file "
                             "over `trainbus prometheus` series")
    parser.add_argument("--update-interval", type=positive_float,
                        default=DEFAULT_UPDATE_INTERVAL_S, metavar="S",
                        help="--format prometheus: seconds per PPO update, to turn `for` (updates) "
                             f"into durations (default {DEFAULT_UPDATE_INTERVAL_S:g})")
    add_subscriber_arguments(parser)
    # add_publisher_arguments would redefine --curve-client; only --publish is added here.
    parser.add_argument("--publish", metavar="EP",
                        help=f"daemon publish side for alert events (env {endpoints.ENV_PUBLISH}, "
                             f"default {endpoints.DEFAULT_PUBLISH})")


def _check_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--webhook: expected an http:// or https:// URL, got {url!r}")
    return url


def run(args: argparse.Namespace) -> int:
    try:
        rules = load_rules(args.rules, silent_after=args.silent_after)
    except RulesError as exc:
        raise UsageError(str(exc)) from None
    silent = max((r.lowest_level or 0.0 for r in rules.values() if r.kind == "silent"), default=0.0)
    if args.forget_after <= silent:
        raise UsageError(f"--forget-after ({args.forget_after:g} s) must be longer than the "
                         f"silence alert ({silent:g} s): a forgotten worker's alerts resolve")
    if args.format != "text" and not args.list_rules:
        raise UsageError("--format applies to --list-rules only")
    if args.list_rules:
        if args.format == "prometheus":
            sys.stdout.write(prometheus_rules(rules.values(), args.update_interval))
            return 0
        for rule in rules.values():
            print(rule.describe())
        return 0
    if args.replay:
        return _replay(args, rules)
    webhooks = [_check_url(url) for url in args.webhook]
    try:
        alertmanagers = [alertmanager_url(url) for url in args.alertmanager]
    except ValueError as exc:
        raise UsageError(f"--alertmanager: {exc}") from None

    engine = AlertEngine(rules)
    sinks: list = [ConsoleSink()]
    if args.log:
        try:
            sinks.append(JsonlSink(args.log))
        except OSError as exc:
            raise UsageError(f"--log: cannot open {args.log}: {exc.strerror or exc}") from None
    publisher = None
    if not args.no_publish:
        from bus.publisher import EventPublisher

        publisher = EventPublisher(args.publish, getattr(args, "curve_client", None))
        sinks.append(BusSink(publisher))
    if args.exec_cmd:
        sinks.append(ExecSink(args.exec_cmd, timeout=args.exec_timeout))
    for url in webhooks:
        sinks.append(WebhookSink(url, timeout=args.webhook_timeout))
    for url in alertmanagers:
        sinks.append(AlertmanagerSink(url, resend=args.alertmanager_resend,
                                      timeout=args.webhook_timeout))
    dispatcher = Dispatcher(sinks)

    stop = install_stop_handlers()
    sub = Subscriber.from_args(args, types=[protocol.PPO_UPDATE, protocol.HEARTBEAT], run=args.run,
                               forget_after=args.forget_after)
    if publisher is not None and not publisher.wait_for_bus(PUBLISH_WAIT_S):
        # Alerts raised before the daemon's subscription arrives would be dropped by the
        # sender's filter; without a daemon yet, go on (the other sinks still work).
        log.warning("daemon not reachable at %s yet; alert events go out once it is",
                    publisher.endpoint)
    log.info("ready: %d rules, subscribe=%s, sinks=%s", len(rules), sub.subscribe_endpoint,
             ",".join(s.name for s in sinks))
    next_tick = 0.0
    try:
        while not stop.is_set():
            replayed_before = sub.stats.snapshot_events
            events = sub.poll(POLL_MS)
            now, wall = time.monotonic(), time.time()
            notes = []
            if events:
                # poll() returns snapshot history first: replay it quietly, then live events.
                replayed = sub.stats.snapshot_events - replayed_before
                if replayed:
                    notes += engine.observe_many(events[:replayed], now, wall, coalesce=True)
                notes += engine.observe_many(events[replayed:], now, wall)
            if events or now >= next_tick:
                notes += engine.tick(now, wall, sub.streams)
                next_tick = now + TICK_INTERVAL_S
            for note in notes:
                dispatcher.send(note)
    finally:
        dispatcher.close(FLUSH_TIMEOUT_S)
        sub.close()
        if publisher is not None:
            publisher.close()
        counts = dict(engine.counts)
        log.info("stopped: notifications %s", counts or "none")
    return 0


def _replay(args: argparse.Namespace, rules: dict) -> int:
    """``--replay FILE``: the engine over a recording on its own clock (no bus, no pager
    sinks): the console lines (and ``--log``) it would have produced live, then one
    summary line, so a rules file can be tried on last week's runs before it pages anyone."""
    from collections import Counter

    from bus.recording import RecordingError
    from consumers.alerting.offline import judge_recording

    if not Path(args.replay).is_file():
        raise UsageError(f"--replay: no such file: {args.replay}")
    sinks: list = [ConsoleSink()]
    if args.log:
        try:
            sinks.append(JsonlSink(args.log))
        except OSError as exc:
            raise UsageError(f"--log: cannot open {args.log}: {exc.strerror or exc}") from None
    try:
        _, notes = judge_recording(args.replay, rules)
    except RecordingError as exc:
        raise UsageError(f"--replay: {args.replay}: {exc}") from None
    pages_per_key: Counter[tuple] = Counter()
    for note in notes:
        if args.run is not None and note.run != args.run:
            continue
        for sink in sinks:
            sink.send(note)
        if note.pages:
            pages_per_key[note.key] += 1
    for sink in sinks:
        sink.close(FLUSH_TIMEOUT_S)
    worst = max(pages_per_key.values(), default=0)
    print(f"replayed {args.replay}: {sum(pages_per_key.values())} paging notification(s) "
          f"over {len(pages_per_key)} key(s), at most {worst} for one key")
    return 0
