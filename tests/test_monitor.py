"""The monitor: pure state, frames rendered with a recording console, and the real process."""

from __future__ import annotations

import math
import signal
import time

import pytest
from rich.console import Console

from bus import protocol
from consumers.monitor_state import (
    CRITICAL,
    DONE,
    MAX_ALERTS,
    NAN,
    OK,
    STALE,
    WAITING,
    WARNING,
    MonitorState,
)
from consumers.monitor_view import (
    BANNER_STYLE,
    MonitorView,
    fmt,
    fmt_age,
    fmt_ratio,
    render_text,
    table_width,
    tier_for,
)
from consumers.runtime import Subscriber
from emitter.telemetry import TelemetryEmitter
from tests.conftest import ppo_fields, ppo_payload, trainbus_cmd, wait_for

NOW = 1000.0


def update(run: str = "r", worker: int | str = 0, seq: int = 0, session: str | None = None,
           **fields) -> protocol.Event:
    fields.setdefault("update", seq)
    session = session or f"s{worker}"
    return protocol.decode(protocol.encode(ppo_payload(run, worker, session, seq, **fields)))


def other(event_type: str, run: str = "r", worker: int | str = "all", seq: int = 0,
          session: str = "x", **fields) -> protocol.Event:
    payload = {"v": 1, "type": event_type, "run": run, "worker": worker, "session": session,
               "seq": seq, "ts": time.time(), **fields}
    return protocol.decode(protocol.encode(payload))


def alert(state: str, severity: str = "critical", worker: int = 1, rule: str = "grad_norm_high",
          seq: int = 0) -> protocol.Event:
    return other("alert", worker=worker, seq=seq, state=state, severity=severity, rule=rule,
                 metric="grad_norm", since=time.time() - 30, value=15.3, threshold=10.0,
                 summary="grad norm above 10")


def connected_state(**kwargs) -> MonitorState:
    state = MonitorState(**kwargs)
    state.sync(NOW, connected=True, ever_connected=True, endpoint="tcp://127.0.0.1:1")
    return state


#: Next seq per (run, worker, session, type): fed events continue their stream, as a
#: worker's would (the state's own book drops a repeated seq as a duplicate).
_next_seq: dict[tuple, int] = {}


def next_seq(*key) -> int:
    seq = _next_seq.get(key, 0)
    _next_seq[key] = seq + 1
    return seq


def feed(state: MonitorState, worker: int, grads: list[float], now: float = NOW,
         session: str | None = None, run: str = "r", **fields) -> None:
    session = session or f"s{worker}"
    for grad in grads:
        seq = next_seq(id(state), run, worker, session, "ppo_update")
        state.ingest(update(run=run, worker=worker, seq=seq, session=session, grad_norm=grad,
                            **fields), now)


def finish(state: MonitorState, *workers: int, now: float = NOW, session: str | None = None,
           run: str = "r") -> None:
    """The workers' emitters close: their closing heartbeats (what the runtime marks done)."""
    for worker in workers:
        sess = session or f"s{worker}"
        seq = next_seq(id(state), run, worker, sess, "heartbeat")
        state.ingest(other("heartbeat", run=run, worker=worker, seq=seq, session=sess,
                           interval_s=2.0, closing=True), now)


# --------------------------------------------------------------------- state


def test_banner_states_worst_first():
    state = MonitorState()
    state.sync(NOW, connected=False, ever_connected=False, endpoint="tcp://x:1")
    banner = state.banner(NOW)
    assert banner.state == "DISCONNECTED" and "no daemon reachable" in banner.detail
    state.sync(NOW, connected=False, ever_connected=True, endpoint="tcp://x:1")
    assert "lost the daemon" in state.banner(NOW).detail

    state = connected_state()
    assert state.banner(NOW).state == "WAITING"
    state.ingest(other("heartbeat", worker=0, interval_s=2.0), NOW)
    assert state.banner(NOW).state == "WAITING"  # alive, but no update yet
    feed(state, 0, [1.0, 1.1])
    assert state.banner(NOW).state == "LEARNING"
    feed(state, 1, [6.0])
    assert state.banner(NOW).state == "WARNING"
    feed(state, 2, [12.0])
    assert state.banner(NOW).state == "CRITICAL"
    feed(state, 3, [math.nan])
    banner = state.banner(NOW)
    assert banner.state == "NaN DETECTED"
    assert banner.counts == {"live": 4, "stale": 0, "NaN": 1, "critical": 1, "warning": 1, "done": 0,
                             "alerts": 0}
    # Worker 4 went silent 6 s ago: the picture may be old news, STALE outranks the rest.
    feed(state, 4, [1.0], now=NOW - 6)
    assert state.banner(NOW).state == "STALE"
    state.sync(NOW, connected=False, ever_connected=True)
    assert state.banner(NOW).state == "DISCONNECTED"


def test_row_status_and_nonfinite_sources():
    state = connected_state()
    feed(state, 0, [1.0])
    feed(state, 1, [1.0], approx_kl=0.02)  # KL warning
    feed(state, 2, [1.0], policy_loss=math.inf)  # any non-finite loss is NaN DETECTED
    feed(state, 3, [1.0], nonfinite_grad_count=2)
    feed(state, 4, [0.05])  # vanishing: warning
    feed(state, 5, [1.0], approx_kl=0.05)  # critical
    # Explained variance colours its cell but decides no status (noise on solved runs).
    feed(state, 6, [1.0], explained_variance=-0.5)
    statuses = {row.worker: state.row_status(row, NOW) for row in state.sorted_rows()}
    assert statuses == {0: OK, 1: WARNING, 2: NAN, 3: NAN, 4: WARNING, 5: CRITICAL, 6: OK}
    assert state.metric_health("explained_variance", -0.5) == "warning"
    assert state.row_status(state.rows[("r", 0)], NOW + 5.5) == STALE
    state.ingest(other("heartbeat", worker=9, interval_s=2.0), NOW)
    assert state.row_status(state.rows[("r", 9)], NOW) == WAITING


def test_firing_alerts_raise_banner_and_resolve():
    state = connected_state()
    feed(state, 1, [1.0])
    state.ingest(alert("pending"), NOW)
    assert state.alerts == {} and state.banner(NOW).state == "LEARNING"
    state.ingest(alert("firing", seq=1), NOW)
    assert list(state.alerts) == [("r", 1, "grad_norm_high")]
    assert state.banner(NOW).state == "CRITICAL"
    state.ingest(alert("firing", severity="warning", rule="kl_high", seq=2), NOW)
    assert len(state.alerts) == 2
    state.ingest(alert("resolved", seq=3), NOW)
    assert list(state.alerts) == [("r", 1, "kl_high")]
    assert state.banner(NOW).state == "WARNING"
    assert state.alert_events == 4


def test_rows_read_restarts_and_drops_from_the_runtime_accounting():
    state = connected_state()
    feed(state, 0, [1.0])
    state.ingest(update(worker=0, seq=8), NOW)  # seq 1..7 lost on the way
    feed(state, 0, [1.0], session="s0-b")  # restarted
    feed(state, 0, [1.0], session="s0-c")  # and again
    state.sync(NOW, connected=True, ever_connected=True, rejected=3, lost=7)
    row = state.rows[("r", 0)]
    assert (row.restarts, row.dropped, state.rejected, state.lost) == (2, 7, 3, 7)


def test_finished_worker_is_done_never_stale_and_not_a_problem():
    state = connected_state()
    feed(state, 0, [1.0, 1.1])
    feed(state, 1, [1.0, 1.2])
    feed(state, 2, [1.0], approx_kl=0.05)  # critical, then it finishes
    finish(state, 0, 2)
    later = NOW + 30  # everyone silent far past stale_after
    state.sync(later, connected=True, ever_connected=True)
    statuses = {row.worker: state.row_status(row, later) for row in state.sorted_rows()}
    assert statuses == {0: DONE, 1: STALE, 2: DONE}
    banner = state.banner(later)
    assert banner.state == "STALE" and banner.counts["stale"] == 1
    assert banner.counts["done"] == 2 and banner.counts["live"] == 0
    assert banner.counts["critical"] == 0  # a finished worker's last values are history
    # Every worker finished: the run is over, not stale.
    finish(state, 1, now=later)
    banner = state.banner(later)
    assert banner.state == "FINISHED" and banner.counts["stale"] == 0 and banner.counts["done"] == 3
    # Worker 1 restarts (its new session is not finished): live again, judged as usual.
    feed(state, 1, [6.0], now=later, session="s1-new")
    assert state.rows[("r", 1)].restarts == 1
    assert state.row_status(state.rows[("r", 1)], later) == WARNING
    assert state.banner(later).state == "WARNING"
    # A firing alert still raises the banner above FINISHED.
    finish(state, 1, now=later, session="s1-new")
    assert state.banner(later).state == "FINISHED"
    state.ingest(alert("firing", severity="warning", worker=1), later)
    assert state.banner(later).state == "WARNING"


def test_fleet_row_leaves_finished_workers_out():
    state = connected_state()
    feed(state, 0, [1.0])
    feed(state, 1, [9.0])
    feed(state, 2, [3.0], now=NOW - 10)  # stale
    finish(state, 1)
    _, summary = state.fleet_row("r", NOW)
    assert summary["workers_live"] == 1 and summary["workers_stale"] == 1
    assert summary["metrics"]["grad_norm"]["mean"] == pytest.approx(1.0)
    assert state.finished_workers("r") == 1
    # The whole run finished: the fleet row keeps its final values, even over an
    # aggregator's (empty: live workers only) last summary.
    state.ingest(other("ppo_summary", workers_live=0, workers_stale=0, updates=0, metrics={}), NOW)
    finish(state, 0, 2)
    source, summary = state.fleet_row("r", NOW)
    assert source == "final" and summary["workers_live"] == 0 and summary["workers_stale"] == 0
    assert summary["metrics"]["grad_norm"]["mean"] == pytest.approx((1.0 + 9.0 + 3.0) / 3)
    assert summary["metrics"]["grad_norm"]["worst_worker"] == 1 and summary["updates"] == 0


def test_fleet_row_local_or_from_aggregator():
    state = connected_state()
    feed(state, 0, [1.0, 2.0])
    feed(state, 1, [4.0, 8.0])
    feed(state, 2, [20.0], now=NOW - 10)  # stale: left out of the local rollup
    source, summary = state.fleet_row("r", NOW)
    assert source == "local"
    assert summary["workers_live"] == 2 and summary["workers_stale"] == 1
    grad = summary["metrics"]["grad_norm"]
    assert grad["mean"] == pytest.approx(5.0) and grad["worst_worker"] == 1
    published = {"workers_live": 3, "workers_stale": 0, "updates": 7,
                 "metrics": {"grad_norm": {"mean": 9.0, "min": 1.0, "max": 20.0, "worst_worker": 2,
                                           "worst_value": 20.0, "nonfinite": 0, "workers": 3}}}
    state.ingest(other("ppo_summary", **published), NOW)
    source, summary = state.fleet_row("r", NOW + 1)
    assert source == "aggregator" and summary["metrics"]["grad_norm"]["mean"] == 9.0
    # An aggregator that stopped talking is ignored after stale_after.
    assert state.fleet_row("r", NOW + 6)[0] == "local"


def test_memory_is_bounded():
    state = connected_state(max_rows=50)
    for worker in range(200):
        state.ingest(update(worker=worker), NOW)
    assert len(state.rows) == 50
    assert min(w for _, w in state.rows) == 150  # the least recently heard from went first
    for i in range(MAX_ALERTS + 10):
        state.ingest(alert("firing", rule=f"rule{i}", seq=i), NOW)
    assert len(state.alerts) == MAX_ALERTS
    for seq in range(100):
        state.ingest(update(worker=150, seq=seq), NOW)
    assert len(state.rows[("r", 150)].history.series["grad_norm"]) == 10
    state.sync(NOW + 4000, connected=True, ever_connected=True)
    assert state.rows == {}  # forgotten after an hour of silence
    assert state.fleet.book.streams == {} and len(state.fleet.book) == 0  # and its accounting


def test_filtered_and_bus_stats_events():
    state = connected_state()
    state.ingest(other("bus_stats", run="daemon", uptime_s=1.0, forwarded=42, rejected={},
                       streams_cached=1), NOW)
    state.ingest(update(worker="all"), NOW)  # run-level ppo_update: no worker row
    assert state.rows == {} and state.bus_stats is not None
    assert state.events_by_type == {"bus_stats": 1, "ppo_update": 1}


# --------------------------------------------------------------------- frames


Styled = list[list[tuple[str, str]]]


def render(state: MonitorState, width: int = 120, height: int | None = None) -> tuple[str, Styled]:
    """The frame as text, and as lines of (segment text, style) from a recording console;
    with ``height``, fitted to a terminal of that height as the live view is."""
    console = Console(record=True, width=width, height=height, force_terminal=True,
                      color_system="truecolor")
    console.print(MonitorView(state, NOW, refresh_hz=4, fit_height=height is not None))
    lines: Styled = [[]]
    for segment in console._record_buffer:
        parts = segment.text.split("\n")
        for i, part in enumerate(parts):
            if i:
                lines.append([])
            if part:
                lines[-1].append((part, str(segment.style or "")))
    return console.export_text(), lines


def style_of(styled: Styled, text: str, line_with: str | None = None) -> str:
    """Style of the first segment holding ``text`` (on the first line holding ``line_with``)."""
    for line in styled:
        if line_with is not None and line_with not in "".join(t for t, _ in line):
            continue
        for segment, style in line:
            if text in segment:
                return style
    raise AssertionError(f"{text!r} not rendered")


def test_frame_values_and_styles():
    state = connected_state()
    feed(state, 0, [0.5 + 0.1 * i for i in range(10)], explained_variance=0.8,
         episode_return_mean=123.45)
    feed(state, 1, [1.0 + 1.5 * i for i in range(9)])  # ends at 13.0: critical
    feed(state, 2, [1.0, 2.0, math.nan])
    text, styled = render(state, width=120)
    assert "NaN DETECTED" in text
    assert style_of(styled, " NaN DETECTED ") == BANNER_STYLE["NaN DETECTED"]
    # Grad norm to 3 decimals, coloured by health.
    assert "1.400" in text and "13.000" in text
    assert "green" in style_of(styled, "1.400")
    assert "red" in style_of(styled, "13.000")
    # The sparkline and arrow carry the health colour; the arrow shows the direction.
    assert "▁▂▃▃▄▅▆▆▇█ ↑" in text
    assert "green" in style_of(styled, "↑", line_with="1.400")
    assert "red" in style_of(styled, "↑", line_with="13.000")
    assert "red" in style_of(styled, "▁", line_with="13.000")
    # A NaN grad norm: red text and a red × in its sparkline.
    assert "red" in style_of(styled, "×")
    assert "red" in style_of(styled, "NaN", line_with="×")
    assert "NaN" in text and "123.5" in text and "0.80" in text
    assert "Σ r" in text  # the fleet row
    assert "1 NaN" in text and "1 critical" in text
    assert style_of(styled, "grad norm") == "bold"  # the column header, as rich's Table drew it


def test_frame_learning_with_alerts_panel_and_markers():
    state = connected_state()
    feed(state, 0, [1.0] * 10)
    state.ingest(alert("firing", worker=0), NOW)
    state.ingest(update(worker=0, seq=14, grad_norm=1.0), NOW)  # seq 10..13 lost
    feed(state, 0, [1.0], session="s0-restarted")
    text, styled = render(state, width=80)
    assert "CRITICAL" in text  # the firing critical alert raises the banner
    assert "firing alerts (1)" in text and "grad_norm_high" in text
    assert "▄▄▄▄▄▄▄▄▄▄ →" in text  # flat series mid-height, arrow flat
    assert "↻" in text and "d4" in text  # restart and drop markers at 80 columns
    assert max(len(line) for line in text.splitlines()) <= 80


def test_layout_is_readable_at_80_and_richer_when_wider():
    state = connected_state()
    feed(state, 0, [1.0, 2.0, 3.0], episode_return_mean=55.5, sps=4321.0)
    narrow = render_text(state, NOW, width=80)
    wide = render_text(state, NOW, width=160)
    for line in narrow.splitlines():
        assert len(line) <= 80
        assert "…" not in line, line  # nothing essential truncated
    assert "KL" in narrow and "grad norm" in narrow and "return" not in narrow
    assert "pre last 10" not in narrow
    assert "return" in wide and "55.5" in wide and "4321" in wide and "pre last 10" in wide
    widest = render_text(state, NOW, width=table_width(3))
    assert "sent at" in widest and "sent at" not in wide
    for width in (80, 100, 119, 120, 154, 155, 160, 168, 169, 200):
        frame = render_text(state, NOW, width=width)
        assert "…" not in frame and max(len(line) for line in frame.splitlines()) <= width, width
    assert tier_for(80) == 0 and tier_for(119) == 0 and tier_for(120) == 1 and tier_for(160) == 2
    assert [tier_for(table_width(t)) for t in (0, 1, 2, 3)] == [0, 1, 2, 3]


def test_frame_shows_finished_workers_as_done_and_dimmed():
    state = connected_state()
    feed(state, 0, [1.0, 1.25])
    feed(state, 1, [2.0, 2.5])
    finish(state, 0)
    text, styled = render(state, width=120)
    assert "LEARNING" in text and "1 live" in text and "1 done" in text
    assert "dim" in style_of(styled, "1 done")
    assert "dim" in style_of(styled, "done", line_with="1.250")
    assert "dim" in style_of(styled, "1.250")  # the whole row is old news
    assert "dim" not in style_of(styled, "2.500")
    assert "1/1 live" in text  # the fleet counts only the unfinished
    finish(state, 1)
    text, styled = render(state, width=120)
    assert " FINISHED " in text and "2 done" in text and "STALE" not in text
    assert style_of(styled, " FINISHED ") == BANNER_STYLE["FINISHED"]
    assert "dim" in style_of(styled, "done", line_with="Σ r")
    fleet_line = next(line for line in text.splitlines() if "Σ r" in line)
    assert "1.875" in fleet_line and "final" in fleet_line and " 1 " in fleet_line  # mean, update


def test_too_many_rows_for_the_terminal_shows_the_worst():
    state = connected_state()
    for worker in range(40):
        feed(state, worker, [12.0 if worker == 33 else 1.0])
    console = Console(record=True, width=100, height=20, color_system=None)
    console.print(MonitorView(state, NOW, fit_height=True))
    text = console.export_text()
    assert "more worker(s) not shown" in text
    assert "  33" in text and "12.000" in text


def listed_workers(text: str, run: str = "r") -> dict[int, str]:
    """Worker rows of a frame (the lines starting with a worker id): id -> the line."""
    rows: dict[int, str] = {}
    for line in text.splitlines():
        first = line.split()[0] if line.split() else ""
        if line.startswith("  ") and first.isdigit():
            rows[int(first)] = line
    return rows


def fleet_of(state: MonitorState, n: int, bad: dict[int, float], run: str = "r") -> None:
    """``n`` healthy workers of ``run`` (grad norms 1.0..2.6), except ``bad``: worker -> grad."""
    for worker in range(n):
        feed(state, worker, [1.0, bad.get(worker, 1.0 + (worker % 17) * 0.1)], run=run,
             session=f"{run}-s{worker}")


def test_fleet_view_when_a_run_has_more_workers_than_rows():
    state = connected_state()
    bad = {17: math.nan, 123: 12.5, 200: 14.0, 250: math.inf, 299: 11.0}
    fleet_of(state, 300, bad)
    for width, height in ((80, 40), (160, 40), (80, 24)):
        console = Console(record=True, width=width, height=height, color_system=None)
        console.print(MonitorView(state, NOW, fit_height=True, refresh_hz=4))
        text = console.export_text()
        lines = text.splitlines()
        assert len(lines) <= height, (width, height, text)
        assert max(len(line) for line in lines) <= width
        # The distribution of each column across the 300 workers (finite values: 295).
        dist = {line.split()[0]: line for line in lines if line.split()[:1] in (["p50"], ["p90"],
                                                                                  ["max"], ["warn/crit"])}
        assert set(dist) == {"p50", "p90", "max", "warn/crit"}, text
        assert "1.800" in dist["p50"] and "2.500" in dist["p90"] and "14.000" in dist["max"]
        assert dist["warn/crit"].split()[1] == "0/5"  # grad norm: 0 warning, 5 critical
        # Counts by health in the status column, worst first.
        assert "2 NaN" in dist["p50"] and "3 CRIT" in dist["p90"] and "295 ok" in dist["max"]
        # The worst workers, worst first: exactly the 5 bad ones, then healthy ones.
        listed = listed_workers(text)
        assert set(bad) <= set(listed), text
        assert list(listed)[:5] == [17, 250, 200, 123, 299]  # NaN (by id), then furthest out
        assert all(line.rstrip().endswith("ok") for w, line in listed.items() if w not in bad)
        assert "more worker(s) not shown" in text
        assert f"{300 - len(listed)} more worker(s)" in text
    assert len(listed) == 24 - 9 - 2 - 4  # the rest of the height went to the worst rows


def test_fleet_view_styles_and_wide_columns():
    state = connected_state()
    fleet_of(state, 100, {3: math.nan, 5: 12.0})
    feed(state, 7, [1.0], approx_kl=0.02)  # a KL warning on a third worker
    text, styled = render(state, width=160, height=30)
    assert len(text.splitlines()) <= 30
    assert "red" in style_of(styled, "12.000", line_with="max")  # a critical max is red
    assert "green" in style_of(styled, "1.800", line_with="p50")
    assert "red" in style_of(styled, "0/2", line_with="warn/crit")
    assert "yellow" in style_of(styled, "1/0", line_with="warn/crit")  # KL: one warning
    assert "red" in style_of(styled, "1 NaN")
    # Wider: the distribution of the tier's extra columns too (pre-clip, entropy).
    p50 = next(line for line in text.splitlines() if line.split()[:1] == ["p50"])
    assert "0.680" in p50  # entropy


def test_small_runs_stay_whole_beside_a_fleet_view():
    state = connected_state()
    fleet_of(state, 200, {9: 13.0}, run="big")
    fleet_of(state, 4, {2: 6.0}, run="small")
    console = Console(record=True, width=120, height=30, color_system=None)
    console.print(MonitorView(state, NOW, fit_height=True))
    text = console.export_text()
    assert len(text.splitlines()) <= 30
    small_rows = text[text.index("Σ small"):]
    assert all(f"  {w} " in small_rows for w in range(4))  # every worker of the small run
    assert "p50" in text[text.index("Σ big"):text.index("Σ small")]
    assert "p50" not in small_rows  # only the big run is a fleet view
    big_rows = listed_workers(text[text.index("Σ big"):text.index("Σ small")])
    assert list(big_rows)[0] == 9


def test_once_keeps_every_row_up_to_64_workers_then_shows_the_fleet_view():
    from consumers.monitor_view import ONCE_MAX_WORKERS, ONCE_WORST

    state = connected_state()
    fleet_of(state, ONCE_MAX_WORKERS, {40: 20.0})
    text = render_text(state, NOW, width=120)
    assert len(listed_workers(text)) == ONCE_MAX_WORKERS and "p50" not in text
    assert "not shown" not in text
    fleet_of(state, ONCE_MAX_WORKERS + 1, {40: 20.0})
    text = render_text(state, NOW, width=120)
    listed = listed_workers(text)
    assert len(listed) == ONCE_WORST and list(listed)[0] == 40 and "p50" in text
    assert f"{ONCE_MAX_WORKERS + 1 - ONCE_WORST} more worker(s) not shown" in text


def feed_pre(state: MonitorState, worker: int, pre_clip: list[float], now: float = NOW,
             **fields) -> None:
    """Updates as PPO with max_grad_norm 0.5 sends them: the post-clip norm pinned at the
    clip, only the pre-clip norm telling what the gradients did."""
    for seq, pre in enumerate(pre_clip):
        state.ingest(update(worker=worker, seq=seq, grad_norm=min(pre, 0.5),
                            pre_clip_grad_norm=pre, **fields), now)


SPIKE = "pre_clip_grad_norm_spike"


def test_pre_clip_spike_sets_the_row_status_by_its_severity():
    state = connected_state()
    base = [1.0, 1.1, 0.9, 1.0, 1.05]
    feed_pre(state, 0, base + [1.0])  # steady
    feed_pre(state, 1, base + [7.3] * 5)  # above 5x its median for 5 updates (sustain): warning
    feed_pre(state, 2, base + [25.0] * 5)  # above 20x for 5: critical
    feed_pre(state, 3, [1.0, 1.0, 1.0, 30.0])  # 30x, but only 3 previous values: not judged
    feed_pre(state, 4, base + [7.3] * 5, approx_kl=0.05)  # KL critical wins
    feed_pre(state, 5, base + [7.3] * 5, approx_kl=0.02)  # both warning: KL named
    feed_pre(state, 6, base + [7.3] * 5, policy_loss=math.nan)  # NaN first
    feed_pre(state, 8, base + [30.0])  # one update 30x: not sustained, as the alert's `for`
    feed_pre(state, 9, base + [30.0] * 4 + [1.0])  # four, then back: still not a spike
    verdicts = {row.worker: state.row_verdict(row, NOW) for row in state.sorted_rows()}
    assert verdicts == {0: (OK, None), 1: (WARNING, SPIKE), 2: (CRITICAL, SPIKE), 3: (OK, None),
                        4: (CRITICAL, "approx_kl"), 5: (WARNING, "approx_kl"), 6: (NAN, None),
                        8: (OK, None), 9: (OK, None)}
    spike = state.spike_named(SPIKE)
    assert spike is not None and state.spike_named("approx_kl") is None
    # The ratio shown is the level all five exceeded: the 5th 7.3 against a median of 1.1.
    assert state.spike_verdict(state.rows[("r", 1)], spike) == ("warning", pytest.approx(7.3 / 1.1))
    assert state.spike_verdict(state.rows[("r", 8)], spike) == ("ok", pytest.approx(30.0))
    assert state.spike_verdict(state.rows[("r", 3)], spike) == ("ok", None)
    banner = state.banner(NOW)
    assert banner.state == "NaN DETECTED"
    assert (banner.counts["critical"], banner.counts["warning"]) == (2, 2)
    # Silence still outranks it, and a finished worker's old spike is no alarm.
    assert state.row_status(state.rows[("r", 2)], NOW + 6) == STALE
    finish(state, 2)
    assert state.row_status(state.rows[("r", 2)], NOW) == DONE
    # The median catches up: a norm that stays up stops being a spike (a level is not news).
    feed_pre(state, 7, [1.0] * 4 + [8.0] * 6)  # previous 9: four 1s, five 8s: median 8
    assert state.row_verdict(state.rows[("r", 7)], NOW) == (OK, None)


def test_frame_shows_the_pre_clip_spike_and_its_sparkline():
    state = connected_state()
    feed_pre(state, 0, [1.0, 1.1, 0.9, 1.0, 1.05] + [7.3] * 5)
    feed_pre(state, 1, [1.0, 1.1, 0.9, 1.0, 1.05] + [25.0] * 5)
    feed_pre(state, 2, [2.0, 2.0, 2.0])  # too little history to judge: uncoloured
    text, styled = render(state, width=160)
    assert "WARNING" not in text.splitlines()[0] and " CRITICAL " in text
    assert "warn pre 6.6x" in text and "CRIT pre 23x" in text
    assert "yellow" in style_of(styled, "warn pre 6.6x")
    assert "red" in style_of(styled, "CRIT pre 23x")
    # The pre-clip value takes the spike's colour; the post-clip one stays healthy.
    assert "yellow" in style_of(styled, "7.300")
    assert "red" in style_of(styled, "25.000")
    assert style_of(styled, "2.000") == ""
    assert "green" in style_of(styled, "0.500", line_with="7.300")
    # Both sparklines: post-clip flat at the clip (green), pre-clip jumping (spike colour).
    assert "pre last 10" in text
    line = next(row for row in text.splitlines() if "7.300" in row)
    assert "▄▄▄▄▄▄ →" in line and "▁▁▁▁▁█████ ↑" in line
    assert "yellow" in style_of(styled, "█", line_with="7.300")
    assert "yellow" in style_of(styled, "↑", line_with="7.300")
    assert "green" in style_of(styled, "→", line_with="7.300")
    # Narrower: the pre-clip value without its sparkline (120), then the essentials (100).
    text, styled = render(state, width=120)
    assert "pre-clip" in text and "pre last 10" not in text and "warn pre" in text
    assert "warn pre 6.6x" not in text and "yellow" in style_of(styled, "7.300")
    text, _ = render(state, width=100)
    assert "pre-clip" not in text and "warn pre" in text and "CRIT pre" in text
    assert "…" not in text


def test_formatting_helpers():
    assert fmt_ratio(7.34) == "7.3x" and fmt_ratio(27.4) == "27x" and fmt_ratio(4.2e5) == "4e5x"
    assert fmt_ratio(1e300) == "1e300x"
    assert fmt(None) == "–" and fmt(math.nan) == "NaN" and fmt(-math.inf) == "-inf"
    assert fmt(1.23456) == "1.235" and fmt(2.5e7) == "2.50e+07" and fmt(0.0) == "0.000"
    assert fmt(3e-6) == "0.000" and fmt(3e-6, small_exp=True) == "3.00e-06"
    assert fmt_age(0.5) == "0.5s" and fmt_age(-1) == "0.0s"
    assert fmt_age(75) == "1m15s" and fmt_age(7300) == "2h01m"


# --------------------------------------------------------------------- processes


def test_monitor_once_end_to_end(procs, daemon):
    with TelemetryEmitter("e2e", 0, daemon.publish, heartbeat_interval=None) as w0, \
            TelemetryEmitter("e2e", 1, daemon.publish, heartbeat_interval=None) as w1:
        assert w0.wait_for_bus(10) and w1.wait_for_bus(10)
        for u in range(12):
            w0.emit_ppo_update(**ppo_fields(u, grad_norm=1.0 + 0.01 * u))
            w1.emit_ppo_update(**ppo_fields(u, grad_norm=math.nan if u == 11 else 2.0))
        # A late joiner: everything it shows comes from the daemon's snapshot.
        mon = procs.start(trainbus_cmd("monitor", "--once", "--wait", "1.5", "--width", "120"),
                          env=daemon.env)
        assert mon.wait(20) == 0
    out = mon.stdout.text()
    assert "NaN DETECTED" in out, out
    assert "Σ e2e" in out and "1.110" in out and "NaN" in out
    assert "2 live" in out


def test_monitor_live_mode_stops_cleanly_on_sigterm(procs, daemon):
    with TelemetryEmitter("live", 0, daemon.publish, heartbeat_interval=None) as w0:
        assert w0.wait_for_bus(10)
        for u in range(5):
            w0.emit_ppo_update(**ppo_fields(u, grad_norm=3.25))
        mon = procs.start(trainbus_cmd("monitor", "--refresh", "10"), env=daemon.env)
        mon.stderr.wait_for_line("connected to", 15)
        w0.emit_ppo_update(**ppo_fields(5, grad_norm=3.25))
        mon.signal(signal.SIGTERM)
        assert mon.wait(10) == 0
    out = mon.stdout.text()  # not a terminal: Live prints the final frame only
    assert "3.250" in out and "LEARNING" in out, out


def test_closed_emitter_shows_as_done_live_and_to_a_late_joiner(procs, daemon):
    state = connected_state()
    with Subscriber(daemon.subscribe, daemon.snapshot, run="fin") as sub:
        wait_for(lambda: state.ingest_many(sub.poll(20), time.monotonic()) or sub.stats.snapshots >= 1,
                 10, message="subscriber connected")
        done = TelemetryEmitter("fin", 0, daemon.publish, heartbeat_interval=0.1)
        with TelemetryEmitter("fin", 1, daemon.publish, heartbeat_interval=0.1) as running:
            try:
                assert done.wait_for_bus(10) and running.wait_for_bus(10)
                for u in range(3):
                    done.emit_ppo_update(**ppo_fields(u, grad_norm=1.5))
                    running.emit_ppo_update(**ppo_fields(u, grad_norm=2.5))
            finally:
                done.close()

            def shows_done() -> bool:
                now = time.monotonic()
                state.ingest_many(sub.poll(20), now)
                state.sync_from(sub, now)
                row = state.rows.get(("fin", 0))
                # Two emitters, two connections: worker 1's updates may still be on the way.
                other = state.rows.get(("fin", 1))
                return row is not None and state.row_status(row, now) == DONE and \
                    other is not None and other.updates == 3

            wait_for(shows_done, 10, message="worker 0 shown as done, worker 1's updates in")
            now = time.monotonic()
            assert state.row_status(state.rows[("fin", 1)], now) == OK
            assert state.banner(now).counts["done"] == 1
            # A monitor started now learns it from the daemon's snapshot alone.
            mon = procs.start(trainbus_cmd("monitor", "--once", "--wait", "1", "--width", "120"),
                              env=daemon.env)
            assert mon.wait(20) == 0
        out = mon.stdout.text()
        assert "1 done" in out and "LEARNING" in out, out
        assert any("done" in line and "1.500" in line for line in out.splitlines()), out


def test_monitor_once_shows_a_pre_clip_spike(procs, daemon):
    with TelemetryEmitter("spiky", 0, daemon.publish, heartbeat_interval=None) as worker:
        assert worker.wait_for_bus(10)
        for u, pre in enumerate([1.0, 1.1, 0.9, 1.0, 1.05, 12.0, 12.0, 12.0, 12.0, 12.0]):
            worker.emit_ppo_update(**ppo_fields(u, grad_norm=0.5, pre_clip_grad_norm=pre))
        mon = procs.start(trainbus_cmd("monitor", "--once", "--wait", "1", "--width", "160"),
                          env=daemon.env)
        assert mon.wait(20) == 0
    out = mon.stdout.text()
    assert "WARNING" in out and "warn pre 11x" in out and "pre last 10" in out, out


def test_event_rate_counts_skipped_updates():
    """Under load the footer's rate is of every event read, not of the few shown."""
    state = connected_state()
    state.sync(NOW, connected=True, ever_connected=True, skipped=0)
    feed(state, 0, [1.0] * 5)
    state.sync(NOW + 1.0, connected=True, ever_connected=True, skipped=995)
    assert state.events_received == 1000 and state.rate_eps == 1000.0


def test_must_show_keeps_every_nan_and_critical_value():
    state = connected_state()
    assert not state.must_show(ppo_payload(grad_norm=1.0, approx_kl=0.02))  # a warning: may go
    assert not state.must_show(ppo_payload(grad_norm=6.0))
    for news in ({"grad_norm": math.nan}, {"pre_clip_grad_norm": math.inf}, {"lr": math.nan},
                 {"episode_return_mean": -math.inf}, {"grad_norm": 10.5}, {"approx_kl": 0.05},
                 {"clip_fraction": 0.35}, {"entropy": 0.005}, {"nonfinite_grad_count": 3}):
        assert state.must_show(ppo_payload(**news)), news


def test_must_show_judges_exactly_as_the_levels_do():
    """must_show's precomputed safe ranges give the verdict of judging every critical level
    with ``breaches`` (and NaN/inf as news), at and around every level of every row metric."""
    from consumers.monitor_state import ROW_METRICS
    from consumers.thresholds import breaches

    state = connected_state()
    for metric in ROW_METRICS:
        levels = [t for t in state.health.for_metric(metric) if t.critical is not None]
        values = [0, 1, -1, 0.0, 1e-12, -1e300, 1e300, math.nan, math.inf, -math.inf]
        for t in levels:
            values += [t.critical, t.critical * (1 + 1e-9), t.critical * (1 - 1e-9),
                       t.critical + 1, t.critical - 1, int(t.critical)]
        for value in values:
            news = not math.isfinite(value) or any(breaches(t.op, value, t.critical) for t in levels)
            if metric == "nonfinite_grad_count":
                news = news or (isinstance(value, int) and value > 0)
            assert state.must_show({metric: value}) == news, (metric, value)
        assert not state.must_show({metric: "text"}) and not state.must_show({metric: None})
        assert not state.must_show({metric: False})  # a bool is no measurement
    assert state.must_show({"sps": 10**400})  # beyond any float: shown, never a crash


def test_shedding_under_load_accounts_for_everything_and_hides_no_news(procs, daemon):
    """Behind a real daemon, a burst read in small batches while shedding (as the live loop
    reads when it is behind), each batch followed by a frame: older updates of a stream
    are skipped and counted, nothing counts as lost, every row ends on its newest update,
    and the NaN and critical values, though each had newer updates of its worker right
    behind it, reach the rows."""
    from consumers.monitor import SheddingSubscriber

    n, workers = 400, 4
    news = {(1, n - 4): {"grad_norm": math.nan}, (2, n - 3): {"grad_norm": 12.0},
            (3, n - 3): {"approx_kl": 0.05}, (0, n - 2): {"nonfinite_grad_count": 2}}
    with SheddingSubscriber(daemon.subscribe, daemon.snapshot, run="load") as sub:
        state = connected_state(book=sub.book)  # wired as the CLI wires them
        sub.must_show = state.must_show
        wait_for(lambda: state.ingest_many(sub.poll(20), time.monotonic()) or sub.stats.snapshots >= 1,
                 10, message="subscriber connected")
        sub.shedding = True  # what end_frame decides when reading took most of a frame
        emitters = [TelemetryEmitter("load", w, daemon.publish, heartbeat_interval=None)
                    for w in range(workers)]
        try:
            assert all(e.wait_for_bus(10) for e in emitters)
            for u in range(n):  # the whole burst before the first read: a backlog
                for w, emitter in enumerate(emitters):
                    emitter.emit_ppo_update(**ppo_fields(u, **{"grad_norm": 1.0, "approx_kl": 0.004,
                                                               **news.get((w, u), {})}))

            def all_in() -> bool:  # a "frame" per poll: read a batch, then take the held
                state.ingest_many(sub.poll(20, max_messages=50), time.monotonic())
                state.ingest_many(sub.release(), time.monotonic())
                return all(sub.book.streams.get(("load", w)) is not None and
                           sub.book.streams[("load", w)].last_update == n - 1 for w in range(workers))

            wait_for(all_in, 30, message="every worker's last update accounted for")
        finally:
            for emitter in emitters:
                emitter.close()
    rows = {w: state.rows[("load", w)] for w in range(workers)}
    assert sub.skipped > 0  # it did shed
    assert sub.stats.dropped_total == 0 and all(row.dropped == 0 for row in rows.values())
    assert sum(row.updates for row in rows.values()) + sub.skipped == n * workers
    assert all(row.update == n - 1 for row in rows.values())  # judged on the newest
    assert rows[1].nonfinite_updates == 1
    assert any(v != v for v in rows[1].history.values("grad_norm"))
    assert 12.0 in rows[2].history.values("grad_norm")
    assert 0.05 in rows[3].history.values("approx_kl")
    assert 2 in rows[0].history.values("nonfinite_grad_count")
    state.sync_from(sub, time.monotonic())
    text = render_text(state, time.monotonic(), width=120)
    assert f"skipped {sub.skipped:,} (load)" in text
    # The footer's count is of every event read, shown or skipped.
    assert f"{state.events_total + sub.skipped:,} events" in text


def _shedding_subscriber(daemon, run: str):
    """A SheddingSubscriber and a state wired as the CLI wires them, once connected and its
    snapshot is in."""
    from consumers.monitor import SheddingSubscriber

    sub = SheddingSubscriber(daemon.subscribe, daemon.snapshot, run=run)
    state = connected_state(book=sub.book)
    sub.must_show = state.must_show
    wait_for(lambda: state.ingest_many(sub.poll(20), time.monotonic()) or sub.stats.snapshots >= 1,
             10, message="subscriber connected")
    return sub, state


def _send_rounds(pub, run: str, n: int, workers: int) -> None:
    """``n`` updates per worker, round-robin over ``workers`` (one session each)."""
    for seq in range(n):
        for w in range(workers):
            assert pub.send_frames(protocol.encode(ppo_payload(run, w, f"s{w}", seq, update=seq)))


def _read_all(sub, state: MonitorState, total: int) -> None:
    """Poll (no frame: nothing released) until all ``total`` messages sent were read:
    accounted for, taken the full way, or held."""
    wait_for(lambda: state.ingest_many(sub.poll(20, max_messages=50), time.monotonic())
             or sub.stats.received + sub.held == total, 20, message=f"{total} messages read")


def test_shedding_holds_each_streams_newest_update_until_the_frame_in_order(procs, daemon):
    """While shedding, updates are held between frames, newest per stream: nothing of a
    stream reaches the rows until release(), except that the stream's other messages
    release it first — so a closing heartbeat still comes after the update it follows and
    the worker shows as done. Every superseded update is accounted for (skipped, not
    lost); each row ends on its newest update."""
    from bus.publisher import EventPublisher

    n, workers = 20, 3
    sub, state = _shedding_subscriber(daemon, "hold")
    with sub, EventPublisher(daemon.publish) as pub:
        assert pub.wait_for_bus(10)
        sub.shedding = True
        _send_rounds(pub, "hold", n, workers)
        closing = other("heartbeat", run="hold", worker=0, session="s0", interval_s=2.0,
                        closing=True)
        assert pub.send_frames(list(closing.frames))
        _read_all(sub, state, n * workers + 1)
        assert sub.held == workers - 1  # worker 0's went ahead of its heartbeat
        assert ("hold", 1) not in state.rows and ("hold", 2) not in state.rows
        row0 = state.rows[("hold", 0)]
        assert row0.update == n - 1 and row0.finished and state.row_status(row0, NOW) == DONE
        state.ingest_many(sub.release(), time.monotonic())  # the frame
        assert sub.held == 0
    assert all(state.rows[("hold", w)].update == n - 1 for w in range(workers))
    assert all(state.rows[("hold", w)].updates == 1 for w in range(workers))
    assert row0.finished  # releasing did not undo the closing heartbeat
    assert sub.skipped == workers * (n - 1)
    assert sub.stats.dropped_total == 0 and sub.stats.rejected_total == 0


def test_shedding_holds_at_most_max_held_streams(procs, daemon, monkeypatch):
    """Beyond MAX_HELD streams an update goes the full way at once (bounded memory)."""
    from bus.publisher import EventPublisher
    from consumers import monitor

    monkeypatch.setattr(monitor, "MAX_HELD", 2)
    n, workers = 10, 4
    sub, state = _shedding_subscriber(daemon, "cap")
    with sub, EventPublisher(daemon.publish) as pub:
        assert pub.wait_for_bus(10)
        sub.shedding = True
        _send_rounds(pub, "cap", n, workers)
        _read_all(sub, state, n * workers)
        assert sub.held == 2
        state.ingest_many(sub.release(), time.monotonic())
    updates = sorted(state.rows[("cap", w)].updates for w in range(workers))
    assert updates == [1, 1, n, n] and sub.skipped == 2 * (n - 1)
    assert sub.stats.dropped_total == 0


def test_shedding_counts_malformed_messages_exactly(procs, daemon):
    """Malformed messages among held and superseded updates of the same stream — one
    frame, three frames, not msgpack, another version, a bad topic (one the run's
    subscription still lets through) — are each rejected and counted by the reason a full
    decode gives; the valid updates are all accounted for."""
    from bus.publisher import EventPublisher
    from tests.test_hostile import consumer_verdict

    topic = b"ppo_update/bad/0"
    hostile = [[topic], [*protocol.encode(ppo_payload("bad", 0, "s0", 1000)), b"x"],
               [topic, b"\xc1"], [topic, protocol.encode(ppo_payload("bad", 0, "s0", 1001, v=2))[1]],
               [b"ppo_update/bad/x", protocol.encode(ppo_payload("bad", 0, "s0", 1002))[1]]]
    expected: dict[str, int] = {}
    n = 30
    sub, state = _shedding_subscriber(daemon, "bad")
    with sub, EventPublisher(daemon.publish) as pub:
        assert pub.wait_for_bus(10)
        sub.shedding = True
        sent = 0
        for seq in range(n):
            assert pub.send_frames(protocol.encode(ppo_payload("bad", 0, "s0", seq, update=seq)))
            sent += 1
            frames = hostile[seq % len(hostile)]
            reason = consumer_verdict(frames)
            assert reason is not None
            expected[reason] = expected.get(reason, 0) + 1
            assert pub.send_frames(frames)
            sent += 1
        _read_all(sub, state, sent)
        state.ingest_many(sub.release(), time.monotonic())
    assert dict(sub.stats.rejected) == expected
    assert sub.skipped + state.rows[("bad", 0)].updates == n
    assert sub.stats.dropped_total == 0 and state.rows[("bad", 0)].update == n - 1


def test_shedding_starts_when_reading_is_busy_and_stops_when_it_is_light():
    from consumers.monitor import SHED_ENTER_SHARE, SHED_LEAVE_SHARE, SheddingSubscriber

    with SheddingSubscriber("tcp://127.0.0.1:1", use_snapshot=False) as sub:
        sub.end_frame(0.1, 0.1 * SHED_ENTER_SHARE * 0.9)
        assert not sub.shedding  # the full way fits
        sub.end_frame(0.1, 0.1 * SHED_ENTER_SHARE * 1.1)
        assert sub.shedding
        sub.end_frame(0.1, 0.1 * SHED_LEAVE_SHARE * 1.1)
        assert sub.shedding  # hysteresis: the full way costs about twice as much
        sub.end_frame(0.1, 0.1 * SHED_LEAVE_SHARE * 0.9)
        assert not sub.shedding
        sub.work_s = 0.1 * SHED_ENTER_SHARE * 1.1  # the subscriber's own reading counts too
        sub.end_frame(0.1, 0.0)
        assert sub.shedding and sub.work_s == 0.0


def test_monitor_rejects_refresh_above_10hz(procs):
    mon = procs.start(trainbus_cmd("monitor", "--refresh", "50"))
    assert mon.wait(10) == 2
    assert "at most 10 Hz" in mon.stderr.text()
