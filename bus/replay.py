"""``trainbus replay FILE``: republish a recording into the bus, keeping relative timing.

Consumers cannot tell a replayed event from a live one (that is the point: a monitor or an
alerting process can watch yesterday's run). Consequences worth knowing:

* **Without ``--run``** the original frames are sent byte for byte, so events keep their
  original ``session`` and ``seq``. A consumer that already saw those events live (or the
  same replay before) drops them as duplicates, and the daemon's snapshot cache mixes them
  with any live stream of the same run. Replay into a quiet bus, or use ``--run``.
* **With ``--run NEW``** the run is rewritten in topic and payload (re-encoded), every
  original session is mapped to a fresh session id (seq kept, so gaps recorded in the
  original still show as gaps), and ``replayed_from`` = original run is added (an extra
  field, passed on by every consumer). This is the way to watch a replay next to live data,
  and to replay the same recording twice into one consumer (it sees a restart).
* The producer timestamp ``ts`` is kept as recorded: it says when the update happened.
  Staleness is judged on each consumer's own clock, so replayed streams look alive.
* ``bus_stats`` events (the daemon's own statistics at recording time) are not replayed:
  they would be read as statistics of the live daemon.
* Timing follows the recorder's receive times: snapshot history a recorder got at start-up
  is sent as one burst; a clock step backwards in the recording is replayed as no wait;
  ``--max-gap`` shortens long idle stretches.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bus import cli, protocol
from bus.lifecycle import install_stop_handlers
from bus.publisher import EventPublisher
from bus.recording import ReadResult, RecordingError, iter_recording

log = logging.getLogger(__name__)

#: Replay reads from a file, so a deep queue costs nothing but memory and, unlike a
#: training worker, it must not drop the burst it sends at --speed 0.
REPLAY_SNDHWM = 1_000_000
#: How long close() may wait for the queue to reach the daemon after the last event.
CLOSE_LINGER_MS = 10_000
_BUS_STATS_PREFIX = protocol.BUS_STATS.encode() + b"/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE",
                        help="recording (FILE, then its rotation segments FILE.1, FILE.2, ...)")
    parser.add_argument("--speed", type=cli.nonneg_float, default=1.0, metavar="X",
                        help="time factor: 1 = as recorded, 2 = twice as fast, 0 = as fast as "
                             "possible (default 1)")
    parser.add_argument("--run", type=cli.run_name, metavar="NEW",
                        help="republish under this run name, with fresh session ids "
                             "(to watch a replay next to live data)")
    parser.add_argument("--max-gap", type=cli.positive_float, metavar="S",
                        help="wait at most S seconds (recorded time) between two events")
    parser.add_argument("--wait", type=cli.positive_float, default=10.0, metavar="S",
                        help="how long to wait for the daemon before giving up (default 10)")
    cli.add_publisher_arguments(parser)


class Rewriter:
    """Rewrites frames for ``--run NEW``: run in topic and payload, fresh sessions."""

    def __init__(self, new_run: str) -> None:
        self.new_run = new_run
        self._sessions: dict[str, str] = {}

    def __call__(self, frames: list[bytes]) -> list[bytes]:
        event = protocol.decode(frames)
        payload: dict[str, Any] = dict(event.fields)
        session = self._sessions.get(event.session)
        if session is None:
            session = self._sessions[event.session] = uuid.uuid4().hex[:16]
        payload["replayed_from"] = event.run
        payload["run"] = self.new_run
        payload["session"] = session
        return protocol.encode(payload)


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"no recording at {path}")
    stop = install_stop_handlers()
    rewrite = Rewriter(args.run) if args.run else None
    results: list[ReadResult] = []
    records = iter_recording(path, results)
    try:
        first = next(records, None)
    except RecordingError as exc:
        print(f"trainbus replay: error: {exc}", file=sys.stderr)
        return 1
    if first is None:
        print(f"trainbus replay: {path} holds no events", flush=True)
        return 0

    publisher = EventPublisher(args.publish, args.curve_client, sndhwm=REPLAY_SNDHWM)
    sent = skipped = 0
    interrupted = False
    try:
        if not publisher.wait_for_bus(args.wait):
            print(f"trainbus replay: error: no daemon subscribed at {publisher.endpoint} "
                  f"within {args.wait:g} s", file=sys.stderr)
            return 1
        speed = args.speed
        max_gap = args.max_gap
        start = time.monotonic()
        prev_recv = first[0]
        offset = 0.0  # recorded seconds since the first event, clamped and capped
        for recv_time, frames in itertools.chain([first], records):
            delta = recv_time - prev_recv
            prev_recv = recv_time
            if delta > 0:
                offset += min(delta, max_gap) if max_gap is not None else delta
            if frames[0].startswith(_BUS_STATS_PREFIX):
                skipped += 1
                continue
            if speed > 0:
                delay = start + offset / speed - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    interrupted = True
                    break
            if stop.is_set():
                interrupted = True
                break
            if rewrite is not None:
                try:
                    frames = rewrite(frames)
                except protocol.ProtocolError as exc:
                    skipped += 1
                    log.warning("skipping an invalid recorded event (%s)", exc.reason)
                    continue
            if publisher.send_frames(frames):
                sent += 1
            else:
                skipped += 1
        elapsed = time.monotonic() - start
    except RecordingError as exc:  # a later segment that is not a recording
        print(f"trainbus replay: error: {exc}", file=sys.stderr)
        return 1
    finally:
        publisher.close(linger_ms=0 if interrupted else CLOSE_LINGER_MS)
    torn = sum(1 for r in results if r.problem not in (None, "empty file"))
    note = f", {torn} torn tail(s) ignored" if torn else ""
    target = f" as run {args.run}" if args.run else ""
    verb = "interrupted after replaying" if interrupted else "replayed"
    print(f"trainbus replay: {verb} {sent} events{target} in {elapsed:.3f} s "
          f"({skipped} skipped{note})", flush=True)
    return 130 if interrupted else 0

