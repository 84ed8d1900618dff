"""The alert state machine with scripted event sequences and an injected clock (no sleeps)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest

from consumers.alerting.engine import AlertEngine, Notification
from consumers.alerting.rules import default_rules
from consumers.runtime import StreamState
from tests.conftest import ppo_fields


def engine(**overrides: dict) -> AlertEngine:
    rules = default_rules()
    for name, changes in overrides.items():
        rules[name] = replace(rules[name], **changes)
    return AlertEngine(rules)


def feed(eng: AlertEngine, values: list[float], *, metric: str = "grad_norm", start: float = 0.0,
         step: float = 1.0, run: str = "r", worker: int = 0, first_update: int = 100,
         **extra: float) -> list[Notification]:
    """One update per value, the clock advancing ``step`` seconds per update; a tick after
    each, as ``trainbus alert`` ticks at least every 0.25 s (held pages are released there)."""
    out: list[Notification] = []
    for i, value in enumerate(values):
        fields = ppo_fields(first_update + i, **{metric: value}, **extra)
        out.extend(eng.observe_fields(run, worker, fields, now=start + i * step))
        out.extend(eng.tick(start + i * step))
    return out


def by(notes: list[Notification], rule: str | None = None) -> list[tuple[str, str, str]]:
    return [(n.transition, n.state, n.severity) for n in notes if rule is None or n.rule == rule]


def test_thousand_breaching_updates_fire_exactly_once_with_reminders_per_repeat_interval():
    eng = engine(grad_norm_high={"repeat": 300.0})
    notes = feed(eng, [7.0] * 1000)  # warning band, one update per second
    kinds = Counter(n.transition for n in notes)
    assert kinds["fired"] == 1
    assert kinds["pending"] == 1
    # 1000 s of firing, a reminder every 300 s of the injected clock: at 300, 600, 900 s.
    assert kinds["reminder"] == 3
    assert set(kinds) == {"pending", "fired", "reminder"}
    fired = next(n for n in notes if n.transition == "fired")
    assert (fired.state, fired.severity, fired.rule, fired.metric) == (
        "firing", "warning", "grad_norm_high", "grad_norm")
    assert fired.threshold == 5.0 and fired.value == 7.0
    assert all(n.reminder and n.state == "firing" for n in notes if n.transition == "reminder")
    assert [n.at for n in notes if n.reminder] == [
        fired.at + 300, fired.at + 600, fired.at + 900]


def test_for_counts_consecutive_updates_before_firing():
    eng = engine()  # grad_norm_high: for = 3
    assert by(feed(eng, [6.0])) == [("pending", "pending", "warning")]
    assert feed(eng, [6.0], start=1) == []
    assert by(feed(eng, [6.0], start=2)) == [("fired", "firing", "warning")]


def test_pending_cancelled_when_value_recovers_before_for():
    eng = engine()
    notes = feed(eng, [6.0, 6.0, 1.0, 1.0, 1.0])
    assert by(notes) == [("pending", "pending", "warning"), ("cancelled", "resolved", "warning")]
    assert not notes[-1].pages and not notes[0].pages
    assert eng.state_of("r", 0, "grad_norm_high") == ("inactive", None)


def test_flapping_inside_hysteresis_band_produces_nothing_new():
    eng = engine()  # warning 5.0, clear 4.0
    notes = feed(eng, [6.0, 6.0, 6.0])
    assert by(notes)[-1] == ("fired", "firing", "warning")
    # Wobbling around the warning level, never back below clear (4.0): nothing.
    assert feed(eng, [4.9, 5.1, 4.5, 5.3, 4.1, 5.01] * 50, start=3) == []
    assert eng.state_of("r", 0, "grad_norm_high") == ("firing", "warning")
    # Resolution is debounced too: `clear_for` (default: `for` = 3) updates past clear.
    assert feed(eng, [3.9, 3.9, 4.5, 3.9, 3.9], start=400) == []
    resolved = feed(eng, [3.9], start=405)
    assert by(resolved) == [("resolved", "resolved", "warning")]
    assert resolved[0].threshold == pytest.approx(4.0)


def test_band_values_hold_pending_without_cancelling_it():
    eng = engine()
    notes = feed(eng, [5.5, 4.5, 5.5, 4.2, 5.5])
    assert by(notes) == [("pending", "pending", "warning"), ("fired", "firing", "warning")]


def test_warning_then_critical_escalates_once_and_suppresses_warning():
    eng = engine()
    notes = feed(eng, [6.0] * 5 + [12.0] * 200)
    assert by(notes) == [("pending", "pending", "warning"), ("fired", "firing", "warning"),
                         ("escalated", "firing", "critical")]
    esc = notes[-1]
    assert esc.threshold == 10.0 and esc.value == 12.0 and esc.pages
    # Critical in force: further warning-level values do not produce warning notifications
    # unless they are below critical_clear (9.0) ...
    assert feed(eng, [9.5, 11.0, 9.2] * 10, start=300) == []
    # ... and then it is one de-escalation, not a new warning alert.
    notes = feed(eng, [7.0] * 20, start=400)
    assert by(notes) == [("deescalated", "firing", "warning")]
    assert by(feed(eng, [1.0] * 3, start=500)) == [("resolved", "resolved", "warning")]


def test_straight_to_critical_fires_critical_only():
    eng = engine()
    notes = feed(eng, [50.0] * 10)
    assert by(notes) == [("pending", "pending", "critical"), ("fired", "firing", "critical")]


def test_critical_resolves_directly_when_value_falls_past_clear():
    eng = engine()
    feed(eng, [50.0] * 3)
    # (past the fired page's group_interval, so the resolution is not held: see below)
    assert by(feed(eng, [1.0] * 3, start=100)) == [("resolved", "resolved", "critical")]


def test_noisy_value_crossing_the_whole_band_does_not_flap():
    eng = engine()
    notes = feed(eng, [7.0] * 3)
    assert by(notes)[-1] == ("fired", "firing", "warning")
    # 7 / 1 alternating crosses warning and clear every update: still one alert, no
    # resolve/fire storm, because resolving needs `clear_for` consecutive clean updates.
    notes = feed(eng, [1.0, 7.0] * 200, start=3)
    assert by(notes, "grad_norm_high") == []
    # (The pre-clip norm swinging 7x every update is a spike pattern: pending at most,
    # never a page.)
    assert not any(n.pages for n in notes)


def test_nan_is_immediately_critical_and_threshold_rules_stay_quiet():
    eng = engine()
    notes = feed(eng, [1.0, math.nan])
    assert by(notes) == [("fired", "firing", "critical")]
    note = notes[0]
    assert (note.rule, note.metric) == ("nonfinite", "grad_norm")
    assert math.isnan(note.value) and note.threshold is None
    # More NaN: still the one alert.
    assert feed(eng, [math.nan] * 50, start=2) == []


def test_inf_in_pre_clip_norm_fires_and_recovery_resolves_once_after_clear_for():
    eng = engine()
    notes = feed(eng, [math.inf], metric="pre_clip_grad_norm")
    assert by(notes) == [("fired", "firing", "critical")] and notes[0].metric == "pre_clip_grad_norm"
    clear_for = eng.rules["nonfinite"].clear_for
    notes = feed(eng, [2.0] * (clear_for + 20), metric="pre_clip_grad_norm", start=100)
    assert by(notes) == [("resolved", "resolved", "critical")]
    # It resolves exactly when the NaN has left a clear_for-long history.
    assert notes[0].at == 100 + clear_for - 1


def test_nonfinite_grad_count_is_a_breach():
    eng = engine()
    notes = feed(eng, [1.0], nonfinite_grad_count=3)
    assert by(notes, "nonfinite") == [("fired", "firing", "critical")]
    assert notes[0].metric == "nonfinite_grad_count"


def test_recovery_gives_one_resolved():
    eng = engine()
    notes = feed(eng, [7.0] * 10 + [1.0] * 100)
    assert Counter(n.transition for n in notes) == Counter(pending=1, fired=1, resolved=1)


def test_keys_are_independent_per_worker_and_run():
    eng = engine()
    feed(eng, [7.0] * 3, worker=0)
    feed(eng, [7.0] * 3, worker=1)
    feed(eng, [7.0] * 3, run="other")
    assert sorted(k for k, state, _ in eng.active() if state == "firing") == [
        ("other", 0, "grad_norm_high"), ("r", 0, "grad_norm_high"), ("r", 1, "grad_norm_high")]


def test_missing_optional_metric_is_not_evidence():
    eng = engine(explained_variance_low={"enabled": True})  # off by default (README)
    notes = feed(eng, [-0.5] * 30, metric="explained_variance")
    assert by(notes, "explained_variance_low")[-1] == ("fired", "firing", "warning")
    # Updates without explained_variance neither resolve nor re-fire.
    assert feed(eng, [1.0] * 30, start=100) == []


def test_warmup_skips_early_updates():
    eng = engine(explained_variance_low={"enabled": True})
    notes = feed(eng, [-1.0] * 19, metric="explained_variance", first_update=0)
    assert by(notes, "explained_variance_low") == []


def test_vanishing_gradient_is_a_warning_only():
    eng = engine()
    notes = feed(eng, [0.001] * 20)
    assert by(notes, "grad_norm_vanishing") == [("pending", "pending", "warning"),
                                                ("fired", "firing", "warning")]
    assert by(feed(eng, [0.2] * 5, start=100), "grad_norm_vanishing") == [
        ("resolved", "resolved", "warning")]


def test_silent_worker_alerts_then_resolves_when_it_speaks_again():
    eng = engine()
    stream = StreamState("r", 3, last_received=100.0)
    streams = {("r", 3): stream}
    assert eng.tick(110.0, streams=streams) == []
    notes = eng.tick(131.0, streams=streams)
    assert by(notes) == [("fired", "firing", "warning")]
    assert notes[0].rule == "worker_silent" and notes[0].value == pytest.approx(31.0)
    assert notes[0].threshold == 30.0 and notes[0].worker == 3
    for t in range(132, 740, 7):  # reminders only every `repeat` (600 s)
        notes += eng.tick(float(t), streams=streams)
    assert Counter(n.transition for n in notes) == Counter(fired=1, reminder=1)
    stream.last_received = 740.0  # an event arrived
    assert by(eng.tick(740.1, streams=streams)) == [("resolved", "resolved", "warning")]
    assert eng.tick(741.0, streams=streams) == []


def test_dropped_events_alert_and_resolve_after_window():
    eng = engine()
    stream = StreamState("r", 0, last_received=1.0)
    streams = {("r", 0): stream}
    assert eng.tick(1.0, streams=streams) == []
    stream.dropped = 5
    notes = eng.tick(2.0, streams=streams)
    assert by(notes) == [("fired", "firing", "warning")] and notes[0].value == 5.0
    stream.last_received = 60.0
    stream.dropped = 7
    assert eng.tick(30.0, streams=streams) == []  # more loss, same alert
    stream.last_received = 100.0
    assert eng.tick(80.0, streams=streams) == []  # the second loss is still in the window
    assert by(eng.tick(91.0, streams=streams)) == [("resolved", "resolved", "warning")]


def test_reminder_for_a_firing_alert_of_a_quiet_worker_comes_from_tick():
    eng = engine()
    notes = feed(eng, [math.nan])
    assert len(notes) == 1
    assert eng.tick(100.0) == []
    reminders = eng.tick(600.0)
    assert by(reminders) == [("reminder", "firing", "critical")] and reminders[0].reminder


def test_repeat_zero_disables_reminders():
    eng = engine(grad_norm_high={"repeat": 0.0})
    notes = feed(eng, [7.0] * 5000, step=10.0)
    assert Counter(n.transition for n in notes) == Counter(pending=1, fired=1)


def test_coalesced_replay_notifies_only_net_changes():
    from bus.protocol import decode, encode
    from tests.conftest import ppo_payload

    def event(seq: int, grad_norm: float):
        return decode(encode(ppo_payload(seq=seq, update=seq, grad_norm=grad_norm)))

    eng = engine()
    # History: a NaN that already recovered, then a run of high values.
    history = [event(0, math.nan)] + [event(i, 1.0) for i in range(1, 12)] + \
              [event(i, 7.0) for i in range(12, 15)]
    notes = eng.observe_many(history, now=0.0, coalesce=True)
    assert by(notes) == [("fired", "firing", "warning")]
    assert notes[0].rule == "grad_norm_high"
    assert eng.state_of("r", 0, "nonfinite") == ("inactive", None)


def test_alert_fields_follow_the_schema():
    from bus.protocol import validate_fields

    eng = engine()
    for note in feed(eng, [7.0] * 3 + [math.nan] + [1.0] * 20):
        payload = note.fields()
        validate_fields(payload, "alert")
        assert set(payload) >= {"state", "severity", "rule", "metric", "since", "transition"}


# ---------------------------------------------------------------------- severity discipline


def test_escalation_needs_for_consecutive_critical_updates():
    eng = engine()  # grad_norm_high: for = 3, critical 10
    assert by(feed(eng, [7.0] * 3))[-1] == ("fired", "firing", "warning")
    # Critical every other update (the pattern that paged "escalated" every few updates on
    # real runs): never three in a row, so never critical.
    assert feed(eng, [12.0, 12.0, 8.0] * 100, start=10) == []
    assert eng.state_of("r", 0, "grad_norm_high") == ("firing", "warning")
    assert by(feed(eng, [12.0] * 3, start=400)) == [("escalated", "firing", "critical")]


def test_deescalation_needs_clear_for_consecutive_updates_past_critical_clear():
    eng = engine()  # critical_clear 9.0, clear_for = for = 3
    feed(eng, [12.0] * 3)
    assert eng.state_of("r", 0, "grad_norm_high") == ("firing", "critical")
    # One or two warning-level updates at a time: still critical, nothing sent.
    assert feed(eng, [7.0, 7.0, 12.0] * 100, start=100) == []
    assert eng.state_of("r", 0, "grad_norm_high") == ("firing", "critical")
    assert by(feed(eng, [7.0] * 3, start=500)) == [("deescalated", "firing", "warning")]


# ---------------------------------------------------------------------- paging floor


def test_oscillating_severity_pages_once_then_only_net_changes_per_group_interval():
    eng = engine(grad_norm_high={"repeat": 300.0})  # group_interval 60 s (default)
    # Ten minutes of a value that sits critical for 5 updates, then warning for 5.
    notes = feed(eng, ([12.0] * 5 + [7.0] * 5) * 60)
    pages = [n for n in notes if n.pages]
    assert by(pages)[0] == ("fired", "firing", "critical")
    # Each window of group_interval holds at most one state change, and reminders come
    # every `repeat`; far from the ~120 escalations/de-escalations the values went through.
    changes = [n for n in pages if not n.reminder]
    assert all(b.at - a.at >= 60 for a, b in zip(changes, changes[1:], strict=False))
    assert len(pages) <= 1 + 600 // 60 + 2
    assert eng.counts["held"] > 50


def test_escalation_pages_at_once_and_change_and_change_back_sends_nothing_more():
    eng = engine()
    # Warning, then critical: getting worse is news, the floor does not hold it.
    notes = feed(eng, [7.0] * 3 + [12.0] * 3)
    assert by([n for n in notes if n.pages]) == [("fired", "firing", "warning"),
                                                 ("escalated", "firing", "critical")]
    # Down and up again within the floor: both held ...
    assert [n for n in feed(eng, [7.0] * 3 + [12.0] * 3, start=6) if n.pages] == []
    # ... and past it the key is back where the last page left it: still nothing.
    assert [n for n in feed(eng, [12.0] * 100, start=12) if n.pages] == []
    assert eng.state_of("r", 0, "grad_norm_high") == ("firing", "critical")


def test_resolution_inside_group_interval_is_held_then_sent_once():
    eng = engine()
    fired = feed(eng, [50.0] * 3)  # fired at t = 2
    assert by(fired)[-1] == ("fired", "firing", "critical")
    assert feed(eng, [1.0] * 3, start=10) == []  # resolved at t = 12: held
    assert eng.tick(61.9) == []
    released = eng.tick(62.0)
    assert by(released) == [("resolved", "resolved", "critical")]
    assert released[0].pages and eng.tick(200.0) == []


def test_resolve_and_fire_again_inside_group_interval_is_no_news():
    eng = engine()
    feed(eng, [50.0] * 3)
    notes = feed(eng, [1.0] * 3 + [50.0] * 3, start=10)  # resolved, pending, fired again
    assert [n for n in notes if n.pages] == []
    assert [n for n in feed(eng, [50.0] * 100, start=16) if n.pages] == []


def test_pending_near_misses_are_limited_per_group_interval():
    eng = engine()
    # Two breaching updates then three healthy ones, over and over: pending, cancelled...
    notes = feed(eng, [7.0, 7.0, 1.0, 1.0, 1.0] * 40)  # 200 s
    kinds = Counter(n.transition for n in notes if n.rule == "grad_norm_high")
    assert kinds["pending"] == kinds["cancelled"] <= 200 // 60 + 1
    assert not any(n.pages for n in notes)
    assert eng.counts["suppressed"] > 50


def test_group_interval_zero_restores_immediate_paging():
    eng = engine(grad_norm_high={"group_interval": 0.0})
    notes = feed(eng, [7.0] * 3 + [12.0] * 3 + [7.0] * 3 + [1.0] * 3)
    assert by([n for n in notes if n.pages]) == [
        ("fired", "firing", "warning"), ("escalated", "firing", "critical"),
        ("deescalated", "firing", "warning"), ("resolved", "resolved", "warning")]


# ---------------------------------------------------------------------- finished workers


def test_finished_worker_is_not_silent_and_its_silence_alert_resolves():
    eng = engine()
    stream = StreamState("r", 3, last_received=100.0)
    streams = {("r", 3): stream}
    assert by(eng.tick(131.0, streams=streams)) == [("fired", "firing", "warning")]
    stream.finished = True  # its closing heartbeat arrived after all
    assert by(eng.tick(200.0, streams=streams)) == [("resolved", "resolved", "warning")]
    assert eng.tick(5000.0, streams=streams) == []
    other = StreamState("r", 4, last_received=100.0)
    other.finished = True
    assert eng.tick(10_000.0, streams={("r", 4): other}) == []


# ---------------------------------------------------------------------- pre-clip spikes


def test_pre_clip_spike_fires_at_any_clip_while_grad_norm_stays_clipped():
    eng = engine()
    calm = [2.0, 2.5, 1.8, 2.2, 2.1, 1.9, 2.4, 2.0, 2.3] * 3  # healthy noise
    notes = feed(eng, calm, metric="pre_clip_grad_norm", grad_norm=0.5)
    assert notes == []
    # The gradient explodes; clipping holds grad_norm at 0.5 throughout.
    notes = feed(eng, [15.0, 40.0, 90.0, 200.0, 450.0, 1000.0], metric="pre_clip_grad_norm",
                 grad_norm=0.5, start=100)
    spike = by(notes, "pre_clip_grad_norm_spike")
    assert spike[0] == ("pending", "pending", "warning")
    assert ("fired", "firing", "critical") in spike
    fired = next(n for n in notes if n.transition == "fired")
    assert fired.metric == "pre_clip_grad_norm" and fired.value > 20 and fired.threshold == 20.0
    assert "median" in fired.summary
    assert by(notes, "grad_norm_high") == []


def test_pre_clip_spike_needs_history_and_ignores_nonfinite():
    eng = engine()
    # Four values are too few to judge (min_history 5), however wild.
    assert feed(eng, [1.0, 100.0, 1.0, 1000.0], metric="pre_clip_grad_norm") == []
    eng = engine()
    notes = feed(eng, [1.0] * 9 + [math.nan] + [1.1] * 5, metric="pre_clip_grad_norm")
    assert by(notes, "pre_clip_grad_norm_spike") == []
    assert by(notes, "nonfinite")[0] == ("fired", "firing", "critical")


def test_explained_variance_rule_is_off_by_default():
    """On recorded healthy solved-CartPole runs EV sat below 0 for much of the run (README):
    the rule exists for users to enable, but the defaults never page on it."""
    eng = engine()
    assert "explained_variance_low" not in eng.rules
    assert feed(eng, [-5.0] * 100, metric="explained_variance") == []


def test_synthetic_healthy_stream_is_healthy_by_the_default_rules():
    """`trainbus publish` (pattern healthy) is what demos and load tests run: 100 workers
    for 300 updates must page nothing (it once fired explained_variance on 551 of 1000)."""
    import random

    from bus.synthetic import synthetic_update

    eng = engine()
    pages = []
    for worker in range(100):
        rng = random.Random(worker)
        for update in range(300):
            now = float(update)
            fields = synthetic_update("healthy", update, rng)
            pages += [n for n in eng.observe_fields("s", worker, fields, now) if n.pages]
            pages += [n for n in eng.tick(now) if n.pages]
    assert pages == [], [n.text() for n in pages[:5]]
