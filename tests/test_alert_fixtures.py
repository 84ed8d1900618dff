"""The default alert rules judged on recorded real runs (tests/fixtures/runs/).

Each fixture is a real 2-worker ``trainbus train`` run recorded by ``trainbus record``
(see the README there). The engine is replayed over it on the recording's own clock with
the live loop's ticks (consumers.alerting.offline), so paging floors, held pages and
reminders behave as they did live. What is asserted is what an operator was promised:
a healthy run pages nothing, an explosion is warned about and then critical within a
bounded number of updates, a NaN is critical at once, and no key pages more than 3 times.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from bus import protocol
from consumers.alerting.engine import Notification
from consumers.alerting.offline import judge, recorded_events
from consumers.alerting.rules import default_rules

RUNS = Path(__file__).resolve().parent / "fixtures" / "runs"
FIXTURES = ("healthy", "high_lr", "explode", "explode_clipped", "nan")
#: What each fixture's run injected, at which update (tests/fixtures/runs/README.md).
EXPLODE_AT = 20
NAN_AT = 30


def _judged(name: str) -> tuple[list[tuple[float, protocol.Event]], list[Notification]]:
    events = list(recorded_events(RUNS / f"{name}.tbrec"))
    assert events, f"{name}.tbrec holds no event"
    _, notes = judge(events, default_rules())
    return events, notes


def _update_at(events: list[tuple[float, protocol.Event]], note: Notification) -> int:
    """The last update of the note's worker received at or before the notification."""
    updates = [e.get("update") for t, e in events
               if e.type == protocol.PPO_UPDATE and e.worker == note.worker and t <= note.at]
    return updates[-1]


def _pages(notes: list[Notification]) -> list[Notification]:
    return [n for n in notes if n.pages]


@pytest.mark.parametrize("name", FIXTURES)
def test_no_key_pages_more_than_three_times(name):
    _, notes = _judged(name)
    per_key = Counter(n.key for n in _pages(notes))
    assert all(count <= 3 for count in per_key.values()), per_key


def test_healthy_run_pages_nothing():
    events, notes = _judged("healthy")
    returns = [e.get("episode_return_mean") for _, e in events
               if e.type == protocol.PPO_UPDATE and e.get("episode_return_mean") is not None]
    assert max(returns) >= 500  # the run really is CartPole solved, not a short one
    assert _pages(notes) == [], [n.text() for n in _pages(notes)]


def test_exploding_run_warns_then_goes_critical_within_bounded_updates():
    events, notes = _judged("explode")
    for worker in (0, 1):
        mine = [n for n in _pages(notes) if n.worker == worker and n.rule == "grad_norm_high"]
        assert mine, f"worker {worker}: no grad_norm_high page"
        first = mine[0]
        # Warning first (or straight to critical when the norm jumped past both levels).
        assert first.transition == "fired"
        critical = next(n for n in mine if n.severity == "critical")
        assert _update_at(events, critical) <= EXPLODE_AT + 25
        if first.severity == "warning":
            assert _update_at(events, first) < _update_at(events, critical)


def test_explosion_under_standard_clipping_shows_in_the_pre_clip_spike_rule():
    events, notes = _judged("explode_clipped")
    post = [e.get("grad_norm") for _, e in events if e.type == protocol.PPO_UPDATE]
    assert max(post) <= 0.5 + 1e-6  # clipping hid it from grad_norm: the absolute rule cannot
    assert not any(n.rule == "grad_norm_high" for n in notes)
    for worker in (0, 1):
        spikes = [n for n in _pages(notes) if n.worker == worker
                  and n.rule == "pre_clip_grad_norm_spike" and n.transition == "fired"]
        assert spikes, f"worker {worker}: explosion never paged"
        assert EXPLODE_AT <= _update_at(events, spikes[0]) <= EXPLODE_AT + 25


def test_nan_is_critical_at_once():
    events, notes = _judged("nan")
    for worker in (0, 1):
        fired = [n for n in notes if n.worker == worker and n.rule == "nonfinite"
                 and n.transition == "fired"]
        assert len(fired) == 1, fired
        assert fired[0].severity == "critical"
        assert _update_at(events, fired[0]) == NAN_AT
        assert math.isnan(fired[0].value) or fired[0].metric == "nonfinite_grad_count"
