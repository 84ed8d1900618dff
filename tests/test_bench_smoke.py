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
