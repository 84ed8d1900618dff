"""Rich renderables that draw a :class:`consumers.monitor_state.MonitorState`.

Nothing here keeps state between frames: a frame is built from the state at draw time
(≤ 10 Hz), so its cost depends on the number of rows, never on the event rate.

Colour rules, so that the screen can be read at a glance and never contradicts an alert:

* Every colour of a value comes from the shared :mod:`consumers.thresholds` (green ok,
  yellow warning, bold red critical; NaN/inf always bold red): the HealthTable's absolute
  levels, or for the pre-clip norm (no absolute level suits every model) the Spike rule's
  severity (latest value over the worker's recent median; plain until it has enough
  history). Metrics judged by neither (return, sps) are not coloured unless non-finite.
* A sparkline and its trend arrow take the colour of the latest value of their metric;
  the arrow only ever shows *direction*. Non-finite cells of a sparkline are a red ``×``.
* STALE rows are dimmed: their numbers are old news. So are finished ("done") rows,
  whose status is dim too: a worker that closed is no alarm.

Layout adapts to the width it is given (:func:`tier_for`: the richest set of columns whose
normal widths fit, so nothing is cut): at 80 columns the essentials (grad norm, its
sparkline and trend, KL, clip fraction, update, age, status with restart/drop markers);
from 120 columns pre-clip norm, entropy, explained variance, episode return and a dropped
column; from 155 the pre-clip sparkline beside the post-clip one, sps, learning rate and
room for a spike's factor in the status; from 169 the producer's own timestamp.

Fleets (:func:`plan_runs`): when a run has more workers than the terminal has rows for
(or, with no height to fit as in ``--once``, more than :data:`ONCE_MAX_WORKERS`), a first
page of rows in worker order would show whichever workers have low ids, so such a run is
drawn as a *fleet view* instead: under its Σ row, the distribution of each metric column
across its live workers (p50 / p90 / max, then warning/critical counts per column) with
the workers' status counts (STALE, NaN, CRIT, warn, ok, waiting, done) in the status
column, then its worst workers, worst first (status, then how far outside the healthy
band: :meth:`consumers.fleet.Fleet.worst`), as many as fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.cells import cell_len as _cell_len
from rich.cells import set_cell_size
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.panel import Panel
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

from consumers.fleet import (
    CRITICAL,
    DONE,
    NAN,
    OK,
    STALE,
    WAITING,
    WARNING,
    Worker,
)
from consumers.history import sparkline_cells, trend
from consumers.monitor_state import MonitorState

HEALTH_STYLE = {"ok": "green", "warning": "yellow", "critical": "bold red", "unknown": "dim"}
NONFINITE_STYLE = "bold red"
STATUS_LABEL = {DONE: "done", WAITING: "waiting", OK: "ok", WARNING: "warn", CRITICAL: "CRIT",
                NAN: "NaN", STALE: "STALE"}
#: Short metric names for the status cell ("CRIT EV"), so the cause is visible even at 80
#: columns where the metric's own column is not shown.
SHORT_METRIC = {"grad_norm": "grad", "approx_kl": "KL", "clip_fraction": "clip",
                "entropy": "ent", "explained_variance": "EV", "pre_clip_grad_norm": "pre"}
STATUS_STYLE = {DONE: "dim", WAITING: "dim", OK: "green", WARNING: "yellow", CRITICAL: "bold red",
                NAN: "bold white on red", STALE: "bold magenta"}
BANNER_STYLE = {
    "FINISHED": "bold white on blue", "WAITING": "bold black on white", "LEARNING": "bold white on green",
    "WARNING": "bold black on yellow", "CRITICAL": "bold white on red",
    "NaN DETECTED": "bold white on red", "STALE": "bold white on magenta",
    "DISCONNECTED": "bold white on red",
}
MISSING = "–"
#: Lines a frame needs besides worker rows (header, table head, footer, slack).
_FIXED_LINES = 9
MAX_ALERT_LINES = 6
#: Without a height to fit (``--once``, a final frame) a run with more workers than this
#: is drawn as a fleet view too: a page of 300 rows is no more readable on paper.
ONCE_MAX_WORKERS = 64
#: Worst workers a fleet view lists when there is no height to fit.
ONCE_WORST = 20
#: The distribution rows under a fleet view's Σ row (one per statistic).
DIST_ROWS = ("p50", "p90", "max", "warn/crit")
#: Status counts of a fleet view, worst first: (status, label).
COUNT_ORDER = ((STALE, "STALE"), (NAN, "NaN"), (CRITICAL, "CRIT"), (WARNING, "warn"), (OK, "ok"),
               (WAITING, "waiting"), (DONE, "done"))
#: Columns a fleet view gives a distribution for, and their metric and digits.
DIST_METRICS = {"grad": ("grad_norm", 3), "pre": ("pre_clip_grad_norm", 3), "kl": ("approx_kl", 4),
                "clip": ("clip_fraction", 3), "entropy": ("entropy", 3),
                "ev": ("explained_variance", 2), "ret": ("episode_return_mean", 1),
                "sps": ("sps", 0)}


# --------------------------------------------------------------------- formatting


def fmt(value: float | None, digits: int = 3, small_exp: bool = False) -> str:
    """A number for a cell: ``–`` when not measured, NaN/inf spelled out, huge values in
    exponent form so a 1e12 gradient norm cannot blow the column apart; with
    ``small_exp``, tiny non-zero values too (a vanishing 3e-6 gradient norm is news,
    a clip fraction of 0.0004 is not)."""
    if value is None:
        return MISSING
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if abs(value) >= 1e5 or (small_exp and value != 0 and abs(value) < 10 ** -digits):
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def fmt_age(seconds: float) -> str:
    """Compact age on this process's clock: 0.3s, 12s, 4m05s, 2h10m."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def fmt_lr(value: float | None) -> str:
    """Learning rate in 6 characters: 2.5e-4."""
    if value is None:
        return MISSING
    if value == 0 or not math.isfinite(value):
        return fmt(value)
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def fmt_ratio(ratio: float) -> str:
    """A spike factor in a few characters: 7.3x, 27x, 4e5x."""
    if ratio < 10:
        return f"{ratio:.1f}x"
    if ratio < 1000:
        return f"{ratio:.0f}x"
    mantissa, exponent = f"{ratio:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}x"


def row_value_style(state: MonitorState, row: Worker, metric: str) -> str:
    """Colour of a row's latest value of ``metric`` (see the module docstring): threshold
    health, else spike severity (plain while there is too little history), else none.
    The judgement is :meth:`MonitorState.value_health`, shared with the web view."""
    health = state.value_health(row, metric)
    if health == "nonfinite":
        return NONFINITE_STYLE
    return HEALTH_STYLE[health] if health else ""


#: A cell's content as (text, style) pieces: what a frame is built from. Not rich ``Text``:
#: a frame of ~1000 cells built as Text objects, and rendered span by span, cost about as
#: much as everything else in a frame; pieces are merged per line into few segments.
Cell = list[tuple[str, str]]
_SMALL_EXP = frozenset(("grad_norm", "pre_clip_grad_norm"))


def cell_len(cell: Cell) -> int:
    """Terminal cells a cell's pieces take."""
    return sum(_cell_len(text) for text, _ in cell)


def metric_cell(state: MonitorState, metric: str, value: float | None, digits: int = 3) -> Cell:
    """A value coloured by its health (uncoloured for metrics without thresholds)."""
    text = fmt(value, digits, small_exp=metric in _SMALL_EXP)
    if value is None:
        return [(text, "dim")]
    if not math.isfinite(value):
        return [(text, NONFINITE_STYLE)]
    if not state.health.for_metric(metric):
        return [(text, "")]
    return [(text, HEALTH_STYLE[state.metric_health(metric, value)])]


def row_metric_cell(state: MonitorState, row: Worker, metric: str, digits: int = 3) -> Cell:
    """A row's latest value of ``metric`` in its :func:`row_value_style` colour."""
    value = row.history.latest(metric)
    return [(fmt(value, digits, small_exp=metric in _SMALL_EXP),
             row_value_style(state, row, metric))]


def spark_cell(state: MonitorState, row: Worker, metric: str = "grad_norm") -> Cell:
    """10-cell sparkline plus trend arrow: colour = health of the latest value (threshold
    or spike, as :func:`row_value_style`), arrow = direction, non-finite cells red. Runs
    of one colour are one piece (the space before the arrow takes the arrow's colour: a
    space shows no foreground colour)."""
    values = row.history.values(metric)
    style = row_value_style(state, row, metric)
    pieces: Cell = []
    run: list[str] = []
    for glyph, nonfinite in sparkline_cells(values):
        if nonfinite:
            if run:
                pieces.append(("".join(run), style))
                run = []
            pieces.append((glyph, NONFINITE_STYLE))
        else:
            run.append(glyph)
    run.append(" " + (trend(values) or " "))
    pieces.append(("".join(run), style))
    return pieces


# --------------------------------------------------------------------- columns


@dataclass(frozen=True, slots=True)
class Column:
    """A table column; ``width`` is the widest content it normally needs (header included),
    used to pick the richest set of columns that fits without truncating any."""

    key: str
    header: str
    tier: int  # 0 always; 1, 2 and 3 only when the terminal is wide enough
    width: int
    justify: str = "right"


COLUMNS: tuple[Column, ...] = (
    Column("worker", "worker", 0, 12, "left"),
    Column("grad", "grad norm", 0, 9),
    Column("spark", "last 10", 0, 12, "left"),
    Column("pre", "pre-clip", 1, 8),
    Column("prespark", "pre last 10", 2, 12, "left"),
    Column("kl", "KL", 0, 6),
    Column("clip", "clip", 0, 5),
    Column("entropy", "entropy", 1, 7),
    Column("ev", "EV", 1, 5),
    Column("ret", "return", 1, 6),
    Column("sps", "sps", 2, 5),
    Column("lr", "lr", 2, 6),
    Column("update", "update", 0, 6),
    Column("age", "age", 0, 5),
    Column("ts", "sent at", 3, 8),
    Column("dropped", "drop", 1, 4),
    Column("status", "status", 0, 9, "left"),
)
TIERS = (0, 1, 2, 3)
#: Columns whose width grows with the layout: the worker (and run name) column, and the
#: status, which from tier 2 has room for a spike's factor ("warn pre 7.3x"; below that
#: "warn pre", so that 120 columns still get tier 1).
WIDTH_BY_TIER = {"worker": (12, 14, 16, 20), "status": (9, 9, 13, 13)}
#: The first tier whose status column has room for a spike's factor.
SPIKE_RATIO_TIER = 2


#: Where ``--column`` metrics go: just before the update counter, at every width (asked for
#: by name, so never left out for room).
CUSTOM_BEFORE = "update"
CUSTOM_HEADER_MAX = 14


def custom_columns(names: tuple[str, ...]) -> list[Column]:
    """Two columns per ``--column`` metric: its latest value, its sparkline and trend."""
    out: list[Column] = []
    for name in names:
        header = name if len(name) <= CUSTOM_HEADER_MAX else name[:CUSTOM_HEADER_MAX - 1] + "…"
        out.append(Column(f"value:{name}", header, 0, max(9, len(header))))
        out.append(Column(f"spark:{name}", "last 10", 0, 12, "left"))
    return out


def visible_columns(tier: int, names: tuple[str, ...] = (),
                    width: int | None = None) -> list[Column]:
    """The columns of a layout tier, ``--column`` metrics included: all of them, or within
    ``width`` as many as fit (value and sparkline, else the value alone), in order."""
    columns = [c for c in COLUMNS if c.tier <= tier]
    if not names:
        return columns
    extra = custom_columns(names)
    if width is not None:
        room = width - _columns_width(columns)
        fitting: list[Column] = []
        for value, spark in zip(extra[::2], extra[1::2], strict=True):
            if room >= value.width + spark.width + 4:
                fitting += [value, spark]
                room -= value.width + spark.width + 4
            elif room >= value.width + 2:
                fitting.append(value)
                room -= value.width + 2
        extra = fitting
    at = next(i for i, c in enumerate(columns) if c.key == CUSTOM_BEFORE)
    return columns[:at] + extra + columns[at:]


def _columns_width(columns: list[Column], tier: int | None = None) -> int:
    widths = [c.width if tier is None else column_width(c, tier) for c in columns]
    return sum(widths) + 2 * (len(widths) - 1)


def column_width(column: Column, tier: int) -> int:
    widths = WIDTH_BY_TIER.get(column.key)
    return widths[tier] if widths is not None else column.width


def table_width(tier: int, names: tuple[str, ...] = ()) -> int:
    """Columns' widths plus one space either side of each (none at the table's edges)."""
    return _columns_width(visible_columns(tier, names), tier)


def tier_for(width: int, names: tuple[str, ...] = ()) -> int:
    """The richest layout that fits ``width`` columns (the essentials at any width)."""
    for tier in reversed(TIERS[1:]):
        if table_width(tier, names) <= width:
            return tier
    return 0


def status_label(state: MonitorState, row: Worker, now: float, *, with_ratio: bool = True) -> tuple[str, str]:
    """(status, its label): "warn pre 7.3x" names what decided a warning or critical
    status and, ``with_ratio``, a spike's factor. Shared with the web view."""
    status, culprit = state.row_verdict(row, now)
    label = STATUS_LABEL[status]
    spike = state.spike_named(culprit) if culprit is not None else None
    if spike is not None:
        label += " " + SHORT_METRIC.get(spike.metric, spike.metric)
        ratio = state.spike_verdict(row, spike)[1]
        if with_ratio and ratio is not None:
            label += " " + fmt_ratio(ratio)
    elif culprit is not None:
        label += " " + SHORT_METRIC.get(culprit, culprit)
    return status, label


def _worker_cells(state: MonitorState, row: Worker, now: float, tier: int,
                  keys: frozenset[str] | None = None) -> dict[str, Cell]:
    """A worker row's cells; only the columns in ``keys`` (all when None): a frame at 80
    columns need not format what only 169 columns show."""
    def want(key: str) -> bool:
        return keys is None or key in keys

    # "warn pre 7.3x": which metric spiked, and (where there is room) by how much.
    status, status_label_text = status_label(state, row, now, with_ratio=tier >= SPIKE_RATIO_TIER)
    latest = row.history.latest
    # Restart and (in the narrow layout) loss markers ride next to the worker id, where
    # there is room at any width: "  3 ↻2 d15" = restarted twice, 15 events lost.
    label: Cell = [(f"  {row.worker}", "")]
    if row.restarts:
        label.append((" ↻" + (str(row.restarts) if row.restarts > 1 else ""), "bold cyan"))
    if row.dropped and tier == 0:
        label.append((f" d{row.dropped}", "yellow"))
    cells: dict[str, Cell] = {
        "worker": label,
        "update": [(str(row.update) if row.update is not None else MISSING, "")],
        "age": [(fmt_age(row.age(now)), "bold magenta" if status == STALE else "")],
        "status": [(status_label_text, STATUS_STYLE[status])],
    }
    for key, metric, digits in _WORKER_METRICS:
        if want(key):
            cells[key] = metric_cell(state, metric, latest(metric), digits)
    if want("spark"):
        cells["spark"] = spark_cell(state, row)
    if want("pre"):
        cells["pre"] = row_metric_cell(state, row, "pre_clip_grad_norm", 3)
    if want("prespark"):
        cells["prespark"] = spark_cell(state, row, "pre_clip_grad_norm")
    if want("lr"):
        cells["lr"] = [(fmt_lr(latest("lr")), "")]
    if want("ts"):
        cells["ts"] = [(time.strftime("%H:%M:%S", time.localtime(row.last_ts))
                        if row.last_ts else MISSING, "dim")]
    if want("dropped"):
        cells["dropped"] = [(str(row.dropped) if row.dropped else "", "yellow")]
    for name in state.columns:
        if want(f"value:{name}"):
            cells[f"value:{name}"] = row_metric_cell(state, row, name, 3)
        if want(f"spark:{name}"):
            cells[f"spark:{name}"] = spark_cell(state, row, name)
    return cells


#: Worker-row columns that show a metric's latest value coloured by its thresholds:
#: (column, metric, digits).
_WORKER_METRICS = (("grad", "grad_norm", 3), ("kl", "approx_kl", 4), ("clip", "clip_fraction", 3),
                   ("entropy", "entropy", 3), ("ev", "explained_variance", 2),
                   ("ret", "episode_return_mean", 1), ("sps", "sps", 0))


def _fleet_cells(state: MonitorState, run: str, now: float, tier: int = 3) -> dict[str, Cell]:
    source, summary = state.fleet_row(run, now)
    metrics: dict[str, Any] = summary.get("metrics") or {}

    def mean(metric: str, digits: int) -> Cell:
        entry = metrics.get(metric)
        if not entry:
            return [(MISSING, "dim")]
        if entry.get("nonfinite"):
            return [(f"NaN×{entry['nonfinite']}", NONFINITE_STYLE)]
        return metric_cell(state, metric, entry.get("mean"), digits)

    grad = metrics.get("grad_norm") or {}
    worst: Cell = []
    if grad.get("worst_worker") is not None:
        value = grad.get("worst_value")
        worst.append(("worst ", "dim"))
        worst.append((f"w{grad['worst_worker']} {fmt(value, 2)}",
                      HEALTH_STYLE[state.metric_health("grad_norm", value)]))
    live = int(summary.get("workers_live") or 0)
    total = live + int(summary.get("workers_stale") or 0)
    if total:
        label = f"{live}/{total} live"
        if len(label) > WIDTH_BY_TIER["status"][tier]:
            label = f"{live}/{total}"  # a big fleet at 80 columns: the numbers, not the word
        status: Cell = [(label, "bold" if live == total else "bold magenta")]
    else:  # only finished workers are left (the header counts them: "N done")
        status = [("done" if state.finished_workers(run) else "0 live", "dim")]
    custom = {f"value:{name}": mean(name, 3) for name in state.columns}
    return {
        **custom,
        "worker": [("Σ " + run, "bold cyan")], "grad": mean("grad_norm", 3), "spark": worst,
        "pre": mean("pre_clip_grad_norm", 3), "kl": mean("approx_kl", 4),
        "clip": mean("clip_fraction", 3), "entropy": mean("entropy", 3),
        "ev": mean("explained_variance", 2), "ret": mean("episode_return_mean", 1),
        "sps": mean("sps", 0),
        "update": [(str(summary.get("updates") or 0), "bold")],
        "age": [({"aggregator": "agg", "final": "final"}.get(source, ""), "dim")],
        "status": status,
    }


@dataclass(slots=True)
class RunView:
    """How one run is drawn in a frame: its rows, and whether as a fleet view (the
    distribution rows and the worst workers, worst first) or every worker in id order."""

    run: str
    rows: list[Worker]
    workers: int  # the run's workers (rows drawn or not)
    fleet_view: bool = False
    counts: list[tuple[str, int]] | None = None  # fleet view: (status, workers), worst first

    @property
    def hidden(self) -> int:
        return self.workers - len(self.rows)

    @property
    def extra_lines(self) -> int:
        """Lines besides the Σ row, its section line and the worker rows."""
        if not self.fleet_view:
            return 0
        return max(len(DIST_ROWS), len(self.counts or ()))


def _status_counts(state: MonitorState, workers: list[Worker], now: float) -> list[tuple[str, int]]:
    """Non-zero counts of the workers' statuses, in :data:`COUNT_ORDER`."""
    counts = {status: 0 for status, _ in COUNT_ORDER}
    status_of = state.row_status
    for worker in workers:
        counts[status_of(worker, now)] += 1
    return [(status, counts[status]) for status, _ in COUNT_ORDER if counts[status]]


def plan_runs(state: MonitorState, now: float, budget: int | None,
              once_max: int = ONCE_MAX_WORKERS) -> list[RunView]:
    """What each run shows. Without a budget (``--once``): every row, except that a run of
    more than ``once_max`` workers is a fleet view of its :data:`ONCE_WORST` worst. With
    one (the lines left for worker rows): every row when all fit; else the largest runs
    become fleet views, one by one, until the rest fit beside them, and the lines left
    are shared out among the fleet views for their worst workers (at least one each).

    A fleet view's distribution rows replace a page of rows in worker order: the operator
    sees how the whole fleet stands (p50/p90/max, how many workers in each health) and
    exactly the workers in trouble, whatever the fleet's size."""
    fleet = state.fleet
    by_run = {run: fleet.run_workers(run) for run in state.runs()}
    views = {run: RunView(run, workers, len(workers)) for run, workers in by_run.items()}
    if budget is None:
        big = [run for run, workers in by_run.items() if len(workers) > once_max]
        shares = {run: ONCE_WORST for run in big}
    elif sum(len(w) for w in by_run.values()) <= budget:
        return list(views.values())
    else:
        big = []
        for run in sorted(by_run, key=lambda r: (-len(by_run[r]), r)):
            big.append(run)
            views[run].counts = _status_counts(state, by_run[run], now)
            views[run].fleet_view = True
            small = sum(len(by_run[r]) for r in by_run if r not in big)
            used = small + sum(views[r].extra_lines + 1 for r in big)
            if used <= budget:
                break
        left = max(len(big), budget - small - sum(views[r].extra_lines for r in big))
        shares = {run: left // len(big) + (1 if i < left % len(big) else 0)
                  for i, run in enumerate(sorted(big, key=lambda r: (len(by_run[r]), r)))}
    for run in big:
        view = views[run]
        if view.counts is None:
            view.counts = _status_counts(state, by_run[run], now)
        view.fleet_view = True
        view.rows = fleet.worst(run, now, max(1, shares[run]), by_distance=True)
    return list(views.values())


def _distribution_cells(state: MonitorState, run: str, now: float,
                        counts: list[tuple[str, int]]) -> list[dict[str, Cell]]:
    """A fleet view's rows under its Σ row: p50, p90 and max of each metric column across
    the run's live workers, then per column how many of them are warning/critical (NaN
    counts as critical; for a metric without thresholds, how many are non-finite); the
    status column lists how many workers are in each status, worst first."""
    dists = {key: state.fleet.distribution(run, metric, now)
             for key, (metric, _) in DIST_METRICS.items()}
    lines = max(len(DIST_ROWS), len(counts))
    out: list[dict[str, Cell]] = []
    for i in range(lines):
        stat = DIST_ROWS[i] if i < len(DIST_ROWS) else ""
        cells: dict[str, Cell] = {"worker": [(f"  {stat}", "cyan")]}
        for key, (metric, digits) in DIST_METRICS.items():
            dist = dists[key]
            if stat in ("p50", "p90", "max"):
                value = dist[stat]
                if not dist["workers"]:
                    cells[key] = [(MISSING, "dim")]
                elif math.isnan(value):  # every live value non-finite
                    cells[key] = [(f"NaN×{dist['nonfinite']}", NONFINITE_STYLE)]
                else:
                    cells[key] = metric_cell(state, metric, value, digits)
            elif stat == "warn/crit":
                health = dist["health"]
                warn, crit = health.get("warning", 0), health.get("critical", 0)
                if state.health.for_metric(metric):
                    style = HEALTH_STYLE["critical"] if crit else \
                        HEALTH_STYLE["warning"] if warn else "dim"
                    cells[key] = [(f"{warn}/{crit}", style)]
                elif dist["nonfinite"]:
                    cells[key] = [(f"NaN×{dist['nonfinite']}", NONFINITE_STYLE)]
        if i < len(counts):
            status, count = counts[i]
            cells["status"] = [(f"{count} {dict(COUNT_ORDER)[status]}", STATUS_STYLE[status])]
        out.append(cells)
    return out


# --------------------------------------------------------------------- the frame


class MonitorView:
    """One frame. ``fit_height``: leave out the healthiest rows that would not fit the
    terminal (the live view); otherwise draw every row (``--once``, final frame)."""

    def __init__(self, state: MonitorState, now: float, *, refresh_hz: float | None = None,
                 fit_height: bool = False, wall_time: float | None = None) -> None:
        self.state = state
        self.now = now
        self.refresh_hz = refresh_hz
        self.fit_height = fit_height
        self.wall_time = time.time() if wall_time is None else wall_time

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        state, now = self.state, self.now
        runs = state.runs()
        alerts = self._alerts_panel(width)
        budget = None
        if self.fit_height:
            height = options.height or console.size.height
            budget = height - _FIXED_LINES - 2 * len(runs) - (alerts_lines(state) if alerts else 0)
        views = plan_runs(state, now, budget)
        hidden = sum(view.hidden for view in views)
        parts: list[Any] = [self._header(width)]
        if runs:
            parts.append(self._table(views, tier_for(width, state.columns), width))
            shown = {c.key for c in visible_columns(tier_for(width, state.columns),
                                                      state.columns, width)}
            left_out = [n for n in state.columns if f"value:{n}" not in shown]
            if left_out:
                parts.append(Text(f"  --column {', '.join(left_out)}: no room at {width} "
                                  "columns; widen the terminal", style="dim", no_wrap=True,
                                  overflow="ellipsis"))
            if hidden:
                advice = "; widen or heighten the terminal, or use --run" if width >= 100 else ""
                parts.append(Text(f"  … {hidden} more worker(s) not shown (the healthiest){advice}",
                                  style="dim", no_wrap=True, overflow="ellipsis"))
        if alerts is not None:
            parts.append(alerts)
        parts.append(self._footer())
        yield Group(*parts)

    def _header(self, width: int) -> Table:
        banner = self.state.banner(self.now)
        left = Text()
        left.append(f" {banner.state} ", style=BANNER_STYLE[banner.state])
        left.append("  ")
        counts = banner.counts
        bits = [(f"{counts.get('live', 0)} live", "")]
        for key, style in (("stale", "magenta"), ("NaN", "bold red"), ("critical", "red"),
                           ("warning", "yellow"), ("done", "dim")):
            if counts.get(key):
                bits.append((f"{counts[key]} {key}", style))
        if counts.get("alerts"):
            bits.append((f"{counts['alerts']} alert{'s' if counts['alerts'] > 1 else ''} firing", "red"))
        for i, (bit, style) in enumerate(bits):
            if i:
                left.append(" · ", style="dim")
            left.append(bit, style=style)
        if banner.detail:
            left.append(" · ", style="dim")
            left.append(banner.detail, style="dim")
        right = Text(f"trainbus monitor {time.strftime('%H:%M:%S', time.localtime(self.wall_time))}",
                     style="dim")
        grid = Table.grid(expand=True)
        grid.add_column(ratio=1)
        grid.add_column(justify="right", no_wrap=True)
        grid.add_row(left, right if width >= 100 else Text(""))
        return grid

    def _table(self, views: list[RunView], tier: int, width: int) -> _Lines:
        """The rows, laid out by hand: one line of merged (text, style) pieces each.

        Not a rich ``Table``: measuring and padding ~900 cells through rich's layout
        engine took ~200 ms a frame on the 2-core bench machine under load (the redraw
        rate could not reach 4 Hz, let alone 10); fixed columns need none of it. Nor a
        ``Text`` per cell: building and rendering them span by span was still half of a
        frame's cost; a line is a few pieces, neighbours of one style merged, so it
        renders to few segments (each segment costs rich work on every redraw). It draws
        what the table did: a bold header, a rule, runs separated by a blank line, cells
        justified in their column and cut with "…" when too long, a column wider than its
        normal width when its content needs it and the width allows (``worst w299 12.00``),
        stale and finished rows dimmed as a whole."""
        columns = visible_columns(tier, self.state.columns, width)
        keys = [column.key for column in columns]
        wanted = frozenset(keys)
        # (cells, their widths, the line's style); None: a blank line between runs
        body: list[tuple[dict[str, Cell], dict[str, int], str] | None] = []
        state, now = self.state, self.now

        def add(cells: dict[str, Cell], style: str = "") -> None:
            body.append((cells, {key: cell_len(cell) for key, cell in cells.items()}, style))

        for i, view in enumerate(views):
            if i:
                body.append(None)
            add(_fleet_cells(state, view.run, now, tier))
            if view.fleet_view:
                for cells in _distribution_cells(state, view.run, now, view.counts or []):
                    add(cells)
            for row in view.rows:
                old_news = state.row_status(row, now) in (STALE, DONE)
                add(_worker_cells(state, row, now, tier, wanted), "dim" if old_news else "")
        widths: list[int] = []
        for column in columns:
            base = column_width(column, tier)
            key = column.key
            content = max([len(column.header)] + [entry[1].get(key, 0)
                                                  for entry in body if entry is not None])
            widths.append(min(content, base) if key == "worker" else max(base, content))
        over = sum(widths) + 2 * (len(widths) - 1) - width
        for j in sorted(range(len(columns)), key=lambda j: column_width(columns[j], tier) - widths[j]):
            if over <= 0:
                break
            cut = min(over, max(0, widths[j] - column_width(columns[j], tier)))
            widths[j] -= cut
            over -= cut
        total = sum(widths) + 2 * (len(widths) - 1)
        header = "  ".join(column.header.rjust(widths[j]) if column.justify == "right"
                           else column.header.ljust(widths[j]) for j, column in enumerate(columns))
        lines: list[tuple[Cell, str]] = [([(header, "")], "bold"), ([("─" * total, "")], "")]
        right = [column.justify == "right" for column in columns]
        for entry in body:
            if entry is None:
                lines.append(([], ""))
                continue
            cells, cell_widths, style = entry
            flat: Cell = []
            push = flat.append
            for j, key in enumerate(keys):
                lead = "  " if j else ""
                cell = cells.get(key)
                w = widths[j]
                if not cell:
                    push((lead + " " * w, ""))
                    continue
                used = cell_widths[key]
                if used > w:
                    cell, used = _truncate(cell, w), w
                if right[j]:
                    push((lead + " " * (w - used), ""))
                    flat += cell
                else:
                    push((lead, ""))
                    flat += cell
                    push((" " * (w - used), ""))
            lines.append((_merged(flat), style))
        return _Lines(lines)

    def _alerts_panel(self, width: int) -> Panel | None:
        """Firing alerts, critical first then oldest first; one line each (cut at the
        right edge, never wrapped), the rule's summary appended when there is room."""
        alerts = sorted(self.state.alerts.values(),
                        key=lambda a: (a.severity != "critical", a.since))
        if not alerts:
            return None
        lines: list[Text] = []
        for alert in alerts[:MAX_ALERT_LINES]:
            line = Text(no_wrap=True, overflow="ellipsis")
            line.append(f"{alert.severity.upper():8}", style="bold red" if alert.severity == "critical" else "yellow")
            line.append(f" {alert.run}/{alert.worker} ")
            line.append(alert.rule, style="bold")
            line.append(f" {alert.metric}={fmt(alert.value)}")
            if alert.threshold is not None:
                line.append(f" (limit {fmt(alert.threshold)})", style="dim")
            line.append(f" for {fmt_age(self.wall_time - alert.since)}", style="dim")
            if alert.summary:
                line.append(f" — {alert.summary}", style="dim")
            lines.append(line)
        if len(alerts) > MAX_ALERT_LINES:
            lines.append(Text(f"+{len(alerts) - MAX_ALERT_LINES} more", style="dim"))
        critical = any(a.severity == "critical" for a in alerts)
        return Panel(Group(*lines), title=f"firing alerts ({len(alerts)})", title_align="left",
                     border_style="red" if critical else "yellow", box=box.ROUNDED,
                     expand=True, width=min(width, max(60, max(len(t) for t in lines) + 4)))

    def _footer(self) -> Text:
        state = self.state
        text = Text(style="dim")
        text.append(f"{state.events_received:,} events")
        if self.refresh_hz is not None:
            text.append(f" · {state.rate_eps:,.0f}/s")
        text.append(" · ")
        text.append(f"lost {state.lost}", style="yellow" if state.lost else "")
        text.append(" · ")
        text.append(f"rejected {state.rejected}", style="yellow" if state.rejected else "")
        if state.skipped:
            # Read and accounted for, not drawn: updates of a stream superseded by a newer
            # one before the frame while the monitor was behind (never a NaN/critical one).
            text.append(" · ")
            text.append(f"skipped {state.skipped:,} (load)", style="yellow")
        if not state.alerts:  # firing ones have their own panel
            text.append(" · alerts: none firing" if state.alert_events
                        else " · alerts: no alerting process seen")
        if state.bus_stats is not None:
            text.append(f" · daemon fwd {state.bus_stats[0].get('forwarded', 0):,}")
        if state.endpoint:
            text.append(f" · {state.endpoint}")
        if self.refresh_hz is not None:
            text.append(f" · redraw {self.refresh_hz:g} Hz · Ctrl-C quits")
        for line in state.log_lines:
            text.append("\n" + line)
        return text


def _merged(pieces: Cell) -> Cell:
    """``pieces`` with neighbours of the same style joined (each piece becomes a segment,
    and rich does work per segment on every redraw)."""
    out: Cell = []
    texts: list[str] = []
    current = ""
    for text, style in pieces:
        if not text:
            continue
        if style != current and texts:
            out.append(("".join(texts), current))
            texts = []
        current = style
        texts.append(text)
    if texts:
        out.append(("".join(texts), current))
    return out


def _truncate(cell: Cell, width: int) -> Cell:
    """A cell cut to ``width`` terminal cells, its last one an "…" (in the style of the
    piece it cuts)."""
    out: Cell = []
    room = width - 1
    for text, style in cell:
        size = _cell_len(text)
        if size <= room:
            out.append((text, style))
            room -= size
            continue
        out.append((set_cell_size(text, room) + "…" if room > 0 else "…", style))
        return out
    return out


class _Lines:
    """Lines of (text, style) pieces, one per screen line, rendered straight to segments
    (no wrapping or measuring: :meth:`MonitorView._table` made them fit). ``line style``
    is under each piece's own, as a ``Text``'s style is under its spans."""

    def __init__(self, lines: list[tuple[Cell, str]]) -> None:
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        new_line = Segment.line()
        styles: dict[tuple[str, str], Style | None] = {}
        get_style = console.get_style
        for pieces, line_style in self.lines:
            for text, style in pieces:
                key = (line_style, style)
                resolved = styles.get(key, _UNSET)
                if resolved is _UNSET:
                    if not line_style and not style:
                        resolved = None
                    elif not line_style:
                        resolved = get_style(style)
                    elif not style:
                        resolved = get_style(line_style)
                    else:
                        resolved = get_style(line_style) + get_style(style)
                    styles[key] = resolved
                yield Segment(text, resolved)  # type: ignore[arg-type]
            yield new_line


_UNSET: Any = object()


def alerts_lines(state: MonitorState) -> int:
    """Lines the alerts panel takes (for the height budget)."""
    shown = min(len(state.alerts), MAX_ALERT_LINES)
    return 0 if not shown else shown + 2 + (1 if len(state.alerts) > MAX_ALERT_LINES else 0)


def render_text(state: MonitorState, now: float, width: int = 120,
                wall_time: float | None = None) -> str:
    """A frame as plain text (tests, ``--once`` into a file)."""
    console = Console(width=width, record=True, file=_NullFile(), color_system=None)
    console.print(MonitorView(state, now, wall_time=wall_time))
    return console.export_text()


class _NullFile:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
