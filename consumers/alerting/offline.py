"""Judge rules on a recorded run: the alert engine driven by a recording's own clock.

Why: default levels and a team's ``--rules`` file are only as good as the runs they were
tried on. A recording (``trainbus record``) keeps every event with the time it was
received, so the engine can be replayed over it exactly as ``trainbus alert`` would have
run live — same event order, the same ticks (silence, reminders, held pages released
after ``group_interval``) — in a fraction of a second and with no daemon. ``trainbus alert
--replay FILE`` prints what would have been sent; the test suite holds recorded real runs
to the project's own promise ("a healthy run pages nothing").

Clock: ``now`` is the recorder's receive time (monotonic enough within one recording;
a step backwards is clamped to the last value so durations never go negative).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from bus import protocol
from bus.recording import iter_recording
from consumers.alerting.engine import AlertEngine, Notification
from consumers.alerting.rules import Rule
from consumers.runtime import StreamBook

#: The live process ticks at least this often (consumers.alerting.process.TICK_INTERVAL_S).
TICK_INTERVAL_S = 0.25


def recorded_events(path: str | Path) -> Iterator[tuple[float, protocol.Event]]:
    """(receive time, event) for every valid event of a recording; invalid frames skipped
    (a recording keeps what the bus carried, garbage included, and so does the live path)."""
    for recv_time, frames in iter_recording(path):
        try:
            yield recv_time, protocol.decode(frames)
        except protocol.ProtocolError:
            continue


def judge(events: Iterable[tuple[float, protocol.Event]], rules: Mapping[str, Rule] | Iterable[Rule],
          *, settle_s: float | None = None) -> tuple[AlertEngine, list[Notification]]:
    """Run the engine over ``events`` as the live loop would and return every notification.

    After the last event the clock runs on ``settle_s`` seconds (default: the longest
    ``group_interval``, plus a tick) so held pages are released, as they would be live —
    but not long enough for silence rules to fire on a recording that simply ends.
    """
    engine = AlertEngine(rules)
    if settle_s is None:
        settle_s = max((r.group_interval for r in engine.rules.values()), default=0.0)
        settle_s += TICK_INTERVAL_S
    book = StreamBook()  # the live Subscriber's accounting, on the recording's clock
    out: list[Notification] = []
    now = next_tick = None
    for recv_time, event in events:
        now = recv_time if now is None else max(now, recv_time)
        if book.record(event, now) is None:
            continue  # a duplicate, dropped as the live path drops it
        out += engine.observe(event, now, wall=recv_time)
        if next_tick is None or now >= next_tick:
            out += engine.tick(now, wall=recv_time, streams=book.streams)
            next_tick = now + TICK_INTERVAL_S
    if now is not None:
        end = now + settle_s
        while now < end:
            now = min(end, now + TICK_INTERVAL_S)
            # The recording ended, not the workers: no silence is judged past its end.
            out += engine.tick(now, wall=now, streams=None)
    return engine, out


def judge_recording(path: str | Path, rules: Mapping[str, Rule] | Iterable[Rule],
                    **kwargs: float) -> tuple[AlertEngine, list[Notification]]:
    """:func:`judge` over a recording file (segments included)."""
    return judge(recorded_events(path), rules, **kwargs)
