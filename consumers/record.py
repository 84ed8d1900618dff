"""``trainbus record``: append every event received to a crash-safe recording.

The recorder is an ordinary consumer (the shared :class:`~consumers.runtime.Subscriber`), so
it gets validated, de-duplicated events and, on (re)connect, the daemon's snapshot history.
Snapshot events ARE recorded by default: a recorder started a minute into a run then holds
the last 10 events of every stream from before it started, which is what an operator
replaying "the run" expects to see first. The runtime's de-duplication by (session, type,
seq) guarantees that no event is recorded twice, also across daemon restarts. Their receive
time is when the recorder got them, so a replay sends them as one burst at its start (the
producer's own ``ts`` in the payload is untouched). ``--no-snapshot`` records live events
only.

Only validated events are recorded (rejected messages are counted, not stored), so every
record in a recording decodes. Frames are stored exactly as received.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

from bus import cli
from bus.protocol import EVENT_TYPES
from bus.recording import RecordingError, RecordingWriter
from consumers.runtime import Subscriber, install_stop_handlers

log = logging.getLogger(__name__)

POLL_MS = 50


def _event_type(text: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", text):
        raise argparse.ArgumentTypeError(
            f"event types look like {', '.join(EVENT_TYPES)}; got {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="recording to write; an existing recording is continued "
                             "(a torn tail from a crash is cut off first)")
    parser.add_argument("--type", dest="types", action="append", type=_event_type,
                        metavar="T", help="record only this event type (repeatable; default all)")
    parser.add_argument("--run", type=cli.run_name, metavar="R", help="record only this run")
    parser.add_argument("--rotate-mb", type=cli.positive_float, metavar="N",
                        help="start a new segment FILE.1, FILE.2, ... when the current one "
                             "would exceed N MiB (default: one file)")
    parser.add_argument("--no-snapshot", action="store_true",
                        help="do not record the daemon's cached history, live events only")
    cli.add_subscriber_arguments(parser)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise cli.UsageError(f"--out {out} is a directory")
    if not out.parent.exists():
        raise cli.UsageError(f"--out {out}: directory {out.parent} does not exist")
    rotate_bytes = int(args.rotate_mb * (1 << 20)) if args.rotate_mb else None
    stop = install_stop_handlers()
    try:
        writer = RecordingWriter(out, rotate_bytes=rotate_bytes)
    except RecordingError as exc:
        raise cli.UsageError(f"--out {exc}; refusing to append to it") from None
    try:
        sub = Subscriber.from_args(args, types=args.types, run=args.run,
                                   use_snapshot=not args.no_snapshot)
    except BaseException:
        writer.close()
        raise
    announced = False
    try:
        print(f"trainbus record: writing {writer.path} from {sub.subscribe_endpoint}", flush=True)
        while not stop.is_set():
            events = sub.poll(POLL_MS)
            if events:
                now = time.time()
                for event in events:
                    writer.write(now, event.frames)
            writer.tick()
            if sub.connected and not announced:
                announced = True
                print(f"trainbus record: connected to {sub.subscribe_endpoint}", flush=True)
    finally:
        sub.close()
        writer.close()
    stats = sub.stats
    log.info("recorded %d events to %s (%d rejected, %d lost upstream per seq gaps)",
             writer.records_written, out, stats.rejected_total, stats.dropped_total)
    print(f"trainbus record: {writer.records_written} events recorded to {out}", flush=True)
    return 0
