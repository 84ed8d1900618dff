"""Rolling history, trend arrows and sparklines (pure units)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers.history import (
    HISTORY_LEN,
    SPARK_BLOCKS,
    SPARK_FLAT,
    SPARK_NONFINITE,
    SPARK_PAD,
    TRACKED_METRICS,
    TREND_DOWN,
    TREND_FLAT,
    TREND_UP,
    TREND_VOLATILE,
    TRENDS,
    History,
    sparkline,
    sparkline_cells,
    trend,
)
from tests.conftest import ppo_fields


def test_history_keeps_last_ten_and_skips_missing_but_keeps_nan():
    history = History()
    for update in range(15):
        history.add(ppo_fields(update, grad_norm=float(update)))
    assert history.values("grad_norm") == [float(u) for u in range(5, 15)]
    assert len(history) == HISTORY_LEN
    # A skipped value (None) and an absent optional field append nothing ...
    history.add(ppo_fields(15, grad_norm=1.0, explained_variance=None))
    assert history.values("explained_variance") == []
    # ... while NaN is appended: it is the news.
    history.add(ppo_fields(16, grad_norm=math.nan))
    values = history.values("grad_norm")
    assert len(values) == HISTORY_LEN and math.isnan(values[-1])
    assert math.isnan(history.latest("grad_norm"))
    assert history.latest("explained_variance") is None


def test_history_ignores_unknown_fields_and_converts_ints():
    history = History()
    history.add({"grad_norm": 2, "nonfinite_grad_count": 3, "surprise": 1.0, "entropy": True})
    assert history.values("grad_norm") == [2.0]
    assert history.values("nonfinite_grad_count") == [3.0]
    assert history.values("entropy") == []  # bool is not a number here
    assert "surprise" not in history.series
    assert history.values("surprise") == []
    assert "update" not in TRACKED_METRICS and "grad_norm" in TRACKED_METRICS


def test_history_with_chosen_metrics_only():
    history = History(("grad_norm",), maxlen=3)
    for v in (1.0, 2.0, 3.0, 4.0):
        history.add({"grad_norm": v, "approx_kl": 0.1})
    assert history.values("grad_norm") == [2.0, 3.0, 4.0]
    assert history.values("approx_kl") == []
    history.clear()
    assert len(history) == 0


@pytest.mark.parametrize("values, expected", [
    ([], ""),
    ([1.0], TREND_FLAT),
    ([1.0, 2.0], TREND_UP),
    ([2.0, 1.0], TREND_DOWN),
    ([float(i) for i in range(10)], TREND_UP),
    ([10.0 - i for i in range(10)], TREND_DOWN),
    ([3.0] * 10, TREND_FLAT),
    ([0.0] * 10, TREND_FLAT),
    ([1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.01, 0.99, 1.0], TREND_FLAT),  # tiny jitter
    ([1.0, 3.0] * 5, TREND_VOLATILE),  # zig-zag with no direction
    ([1.0, 5.0, 0.5, 4.0, 1.0, 6.0, 0.2, 5.0, 1.0, 4.5], TREND_VOLATILE),
    ([1.0 * 1.25 ** i for i in range(10)], TREND_UP),  # explosion is a direction, not noise
    ([1.0, 1.1, 1.3, 1.2, 1.4, 1.5, 1.45, 1.7, 1.8, 1.9], TREND_UP),  # noisy but clearly rising
    ([1.0, 2.0, math.nan], TREND_VOLATILE),  # the series broke: no direction
    ([1.0, math.inf], TREND_VOLATILE),
    ([1.0, math.nan, 2.0, 3.0], TREND_UP),  # a NaN in the middle is left out of the fit
    ([math.nan, 5.0], TREND_FLAT),
    ([1e308, 1e308, -1e308, 1e308], TREND_VOLATILE),  # sums overflow: no trustworthy arrow
])
def test_trend(values, expected):
    assert trend(values) == expected


def test_sparkline_ten_values_spans_floor_to_top():
    line = sparkline([float(i) for i in range(10)])
    assert len(line) == 10
    assert line[0] == SPARK_BLOCKS[0] and line[-1] == SPARK_BLOCKS[-1]
    assert list(line) == sorted(line, key=SPARK_BLOCKS.index)


def test_sparkline_pads_fewer_values_on_the_left():
    line = sparkline([1.0, 2.0, 3.0])
    assert line == SPARK_PAD * 7 + SPARK_BLOCKS[0] + SPARK_BLOCKS[4] + SPARK_BLOCKS[-1]
    assert sparkline([]) == SPARK_PAD * 10
    assert sparkline([5.0]) == SPARK_PAD * 9 + SPARK_FLAT


def test_sparkline_flat_series_is_mid_height():
    assert sparkline([2.5] * 10) == SPARK_FLAT * 10
    assert sparkline([0.0] * 4) == SPARK_PAD * 6 + SPARK_FLAT * 4


def test_sparkline_marks_nonfinite_cells():
    values = [1.0, 2.0, math.nan, 3.0, math.inf, -math.inf]
    cells = sparkline_cells(values)
    assert len(cells) == 10
    glyphs = [g for g, _ in cells]
    assert glyphs[:4] == [SPARK_PAD] * 4
    assert [bad for _, bad in cells] == [False] * 6 + [True, False, True, True]
    assert glyphs[6] == glyphs[8] == glyphs[9] == SPARK_NONFINITE
    assert glyphs[4] == SPARK_BLOCKS[0] and glyphs[7] == SPARK_BLOCKS[-1]
    # All non-finite: every cell is the red glyph.
    assert sparkline([math.nan] * 3) == SPARK_PAD * 7 + SPARK_NONFINITE * 3


def test_sparkline_keeps_only_newest_width_values():
    assert sparkline([float(i) for i in range(20)]) == sparkline([float(i) for i in range(10, 20)])
    assert sparkline([1.0, 2.0], width=0) == ""


finite_or_not = st.floats(allow_nan=True, allow_infinity=True)


@given(st.lists(finite_or_not, max_size=15))
def test_sparkline_and_trend_never_fail(values):
    cells = sparkline_cells(values)
    assert len(cells) == HISTORY_LEN
    assert all(g in SPARK_BLOCKS + SPARK_NONFINITE + SPARK_PAD for g, _ in cells)
    assert trend(values) in (*TRENDS, "")


def test_sparkline_huge_range_does_not_overflow():
    assert sparkline([-1e308, 1e308]) == SPARK_PAD * 8 + SPARK_BLOCKS[0] + SPARK_BLOCKS[-1]


def test_sparkline_float_noise_is_flat():
    # A clipped norm: 0.5 * min(1, 0.5 / (pre + 1e-6)) is 0.4999998.., not 0.5.
    assert sparkline([0.5, 0.4999998, 0.5, 0.4999999]) == SPARK_PAD * 6 + SPARK_FLAT * 4
