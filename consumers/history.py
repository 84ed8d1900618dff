"""Rolling 10-entry histories per (run, worker), trend arrows and sparklines.

Every consumer keeps its own histories (DESIGN.md, "Consumers' semantics"): a
``deque(maxlen=10)`` per ppo_update metric, where a skipped or missing value is *not*
appended (absent means "not measured", and a made-up 0 would draw a false dip) while NaN
and inf *are* appended (a non-finite gradient norm is the news, so it must stay visible
for ten updates).

The functions here are pure and allocation-light because the monitor and the aggregator
call :meth:`History.add` once per event at up to tens of thousands of events a second;
:func:`trend` and :func:`sparkline` run only when a frame is drawn (at most 10 Hz).

Trend (one character, from the last 10 values):

* ``""`` — no value yet; ``"→"`` — a single finite value (nothing has moved yet).
* ``"~"`` **volatile** — the latest value is non-finite (the series broke, it has no
  direction), or, with at least 4 finite values, the RMS deviation from the least-squares
  line is at least 10 % of the series' mean magnitude *and* at least half of the fitted
  change across the window. In words: the swings are large compared with the level and
  with any direction the series has, so an arrow would be a guess.
* ``"→"`` **flat** — the fitted change across the window is under 5 % of the mean
  magnitude.
* ``"↑"`` / ``"↓"`` — otherwise, the sign of the fitted change.

Non-finite values in the middle of the window are left out of the fit (they are shown by
the sparkline's red glyph instead). Direction only: whether "up" is good or bad is the
health table's call, shown by colour.

Sparkline: one cell per value, newest on the right, always ``width`` (10) cells. Fewer
values are padded on the left with blanks, so the newest value always sits at the same
place. Finite values are scaled between the window's min and max onto ``▁..█``; a flat
series (spread under 0.1 % of its magnitude) is drawn at mid-height (``▄``) rather than on
the floor, so "steady" does not read as "zero"; a non-finite value is ``×``, which the
renderers colour red.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bus import protocol

HISTORY_LEN = 10

#: Every numeric ppo_update metric worth a history (counters like ``update`` and
#: ``env_steps`` only grow, so the latest value is all anyone needs of them).
TRACKED_METRICS: tuple[str, ...] = tuple(
    name for name, kind in {**protocol.PPO_UPDATE_REQUIRED, **protocol.PPO_UPDATE_OPTIONAL}.items()
    if kind in ("float", "int") and name not in ("update", "env_steps"))

#: Every ppo_update field the protocol names (envelope included): anything else in an
#: update is a producer's own field.
KNOWN_PPO_FIELDS: frozenset[str] = frozenset(
    (*protocol.ENVELOPE_FIELDS, *protocol.SCHEMAS[protocol.PPO_UPDATE][0],
     *protocol.SCHEMAS[protocol.PPO_UPDATE][1]))
#: A producer's own metric name ("your own metrics"): what a rule, a monitor column or an
#: exporter gauge can name. Letters, digits, ``_ . -``, starting with a letter or ``_``.
CUSTOM_METRIC_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
#: Most custom metrics one consumer tracks (first seen first): a producer adding a new
#: field name per update must not grow every consumer's per-worker memory without bound.
MAX_CUSTOM_METRICS = 16


def is_custom_metric(name: str) -> bool:
    """A name a producer's own numeric field may have (not a protocol field)."""
    return name not in KNOWN_PPO_FIELDS and CUSTOM_METRIC_PATTERN.fullmatch(name) is not None


def custom_metrics(fields: Mapping[str, Any]) -> list[str]:
    """The producer's own numeric fields in one update's payload (bools are not numbers)."""
    return [name for name in fields.keys() - KNOWN_PPO_FIELDS
            if isinstance(fields[name], (int, float)) and not isinstance(fields[name], bool)
            and CUSTOM_METRIC_PATTERN.fullmatch(name)]


TREND_UP = "↑"
TREND_DOWN = "↓"
TREND_FLAT = "→"
TREND_VOLATILE = "~"
TRENDS = (TREND_UP, TREND_DOWN, TREND_FLAT, TREND_VOLATILE)

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_FLAT = "▄"
SPARK_NONFINITE = "×"
SPARK_PAD = " "
#: A window whose spread is under 0.1 % of its magnitude is drawn flat: eight levels would
#: otherwise blow float noise (a clipped norm of 0.4999998 next to 0.5) up to full height.
SPARK_FLAT_FRACTION = 1e-3

#: Trend thresholds, relative to the window's mean magnitude (see the module docstring).
FLAT_FRACTION = 0.05
VOLATILE_NOISE_FRACTION = 0.10
VOLATILE_NOISE_TO_RISE = 0.5
VOLATILE_MIN_POINTS = 4

_isfinite = math.isfinite


class History:
    """The rolling histories of one (run, worker): one bounded deque per metric.

    Deques are created up front for a fixed metric tuple, so a hostile or chatty producer
    adding unknown fields cannot grow a consumer's memory: cost is O(metrics) per worker.
    """

    __slots__ = ("maxlen", "series")

    def __init__(self, metrics: Iterable[str] = TRACKED_METRICS, maxlen: int = HISTORY_LEN) -> None:
        self.maxlen = maxlen
        self.series: dict[str, deque[float]] = {name: deque(maxlen=maxlen) for name in metrics}

    def add(self, fields: Mapping[str, Any]) -> None:
        """Append one update's values: None/absent skipped, NaN/inf kept, ints as floats."""
        get = fields.get
        for name, values in self.series.items():
            value = get(name)
            if value is None:
                continue
            cls = value.__class__
            if cls is not float:
                if cls is bool or not isinstance(value, (int, float)):
                    continue
                value = float(value)
            values.append(value)

    def track(self, metric: str) -> None:
        """Start a window for one more metric (a custom one, admitted by the caller)."""
        self.series.setdefault(metric, deque(maxlen=self.maxlen))

    def values(self, metric: str) -> list[float]:
        """Oldest-first copy of a metric's window (empty for an untracked metric)."""
        series = self.series.get(metric)
        return list(series) if series is not None else []

    def latest(self, metric: str) -> float | None:
        series = self.series.get(metric)
        return series[-1] if series else None

    def clear(self) -> None:
        for series in self.series.values():
            series.clear()

    def __len__(self) -> int:
        """Length of the longest window (how much this worker has told us, up to maxlen)."""
        return max((len(s) for s in self.series.values()), default=0)


def trend(values: Sequence[float]) -> str:
    """Direction of a window: ``↑ ↓ →``, ``~`` when volatile, ``""`` when empty."""
    if not values:
        return ""
    if not _isfinite(values[-1]):
        return TREND_VOLATILE
    xs: list[int] = []
    ys: list[float] = []
    for i, value in enumerate(values):
        if _isfinite(value):
            xs.append(i)
            ys.append(value)
    n = len(ys)
    if n < 2:
        return TREND_FLAT
    # Work on values divided by the largest magnitude: the thresholds are relative, and
    # squares of 1e200-sized gradient norms would otherwise overflow.
    peak = max(abs(y) for y in ys)
    if peak == 0.0:
        return TREND_FLAT
    ys = [y / peak for y in ys]
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    rise = slope * (xs[-1] - xs[0])
    scale = sum(abs(y) for y in ys) / n
    if n >= VOLATILE_MIN_POINTS:
        intercept = mean_y - slope * mean_x
        noise = math.sqrt(sum((y - (intercept + slope * x)) ** 2
                              for x, y in zip(xs, ys, strict=True)) / n)
        if noise >= VOLATILE_NOISE_FRACTION * scale and noise >= VOLATILE_NOISE_TO_RISE * abs(rise):
            return TREND_VOLATILE
    if abs(rise) < FLAT_FRACTION * scale:
        return TREND_FLAT
    return TREND_UP if rise > 0 else TREND_DOWN


def sparkline_cells(values: Sequence[float], width: int = HISTORY_LEN) -> list[tuple[str, bool]]:
    """``width`` cells as (glyph, is_nonfinite), oldest first; renderers colour the
    non-finite ones red. Only the newest ``width`` values are drawn."""
    values = list(values)[-width:] if width > 0 else []
    finite = [v for v in values if _isfinite(v)]
    cells: list[tuple[str, bool]] = [(SPARK_PAD, False)] * (width - len(values))
    if finite:
        # Halved, so that a window spanning -1e308..1e308 does not overflow to inf.
        lo, hi = min(finite) / 2, max(finite) / 2
        span = hi - lo
        flat = span <= SPARK_FLAT_FRACTION * max(abs(lo), abs(hi), 1e-300)
    else:
        lo = span = 0.0
        flat = True
    top = len(SPARK_BLOCKS) - 1
    for value in values:
        if not _isfinite(value):
            cells.append((SPARK_NONFINITE, True))
        elif flat:
            cells.append((SPARK_FLAT, False))
        else:
            level = round((value / 2 - lo) / span * top)
            cells.append((SPARK_BLOCKS[min(top, max(0, level))], False))
    return cells


def sparkline(values: Sequence[float], width: int = HISTORY_LEN) -> str:
    """The sparkline as plain text (see :func:`sparkline_cells`)."""
    return "".join(glyph for glyph, _ in sparkline_cells(values, width))
