"""`python -m bench` runs end to end and writes well-formed rows.

Deliberately no assertion on any number: benchmarks are not timed unit tests (they live
in `make bench`); this only guards the harness itself (processes start and are reaped,
the table prints, results.json has the documented shape).
"""

from __future__ import annotations

import json
import subprocess
import sys
from numbers import Real
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KEYS = {"name", "value", "unit", "baseline_name", "baseline_value", "ratio", "target", "pass"}


@pytest.mark.timeout(240)
def test_bench_quick_emit_writes_well_formed_rows(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "emit",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASS" in proc.stdout or "MISS" in proc.stdout
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        assert row.keys() >= KEYS, row
        assert isinstance(row["name"], str) and row["name"]
        assert isinstance(row["unit"], str) and isinstance(row["target"], str)
        assert isinstance(row["baseline_name"], str)
        for key in ("value", "baseline_value", "ratio"):
            assert row[key] is None or (isinstance(row[key], Real) and not isinstance(row[key], bool)), row
        assert row["pass"] in (True, False, None), row
    names = [row["name"] for row in rows]
    assert "emit ppo_update (daemon up)" in names
    assert not any(name.endswith(": failed") for name in names), names


@pytest.mark.timeout(120)
def test_bench_memory_group_runs_real_consumers_and_reports_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory group end to end on a tiny fleet (the real one takes ~3 minutes): a daemon,
    the four consumers and the churn publisher start, every sample is taken, one row per
    consumer plus the daemon's comes back, and nothing is left running."""
    from bench import common, memory

    monkeypatch.setattr(memory, "QUICK", memory.Shape(runs=12, workers=2, sessions=3, updates=5,
                                                      live_runs=3, rate=2000.0))
    monkeypatch.setenv(memory.FORGET_ENV, "1")
    rows = memory.run(quick=True)
    names = [row.name for row in rows]
    assert len(rows) == 5, names
    for consumer in ("monitor", "aggregate", "alert", "prometheus", "daemon"):
        assert any(name.startswith(f"memory: {consumer} RSS") for name in names), names
    for row in rows[:4]:
        assert row.value is not None and row.value > 0 and row.ratio is not None, row
        assert row.passed in (True, False), row
        for label in ("2%", "50%", "100%", "idle"):
            assert f"{label} " in row.note, row.note
    assert "published 360 ppo_update" in rows[4].note and "in 72 sessions over 12 runs" in rows[4].note
    assert "took in" in rows[0].note and "lost" in rows[0].note
    assert not common._started_popen
