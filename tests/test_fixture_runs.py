"""The recorded runs in tests/fixtures/runs/ are whole, valid, small, and show what they say.

Other tests judge consumers (alert rules, thresholds) on these files, so a fixture that was
regenerated badly, truncated by a copy, mangled by a checkout or quietly lost its fault
would make those tests pass or fail for the wrong reason. The checks are the regeneration
script's own (tests/fixtures/runs/make_fixtures.py), so the two cannot drift apart.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from bus.recording import scan

RUNS = Path(__file__).resolve().parent / "fixtures" / "runs"
#: The brief's budget for all fixtures together: they live in git.
MAX_TOTAL_BYTES = 3 * 1024 * 1024


def _load_make_fixtures() -> ModuleType:
    """tests/fixtures/runs is no package: load the script as a module by path."""
    spec = importlib.util.spec_from_file_location("make_fixtures", RUNS / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_fixtures", module)
    spec.loader.exec_module(module)
    return module


make_fixtures = _load_make_fixtures()
NAMES = tuple(make_fixtures.FIXTURES)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_a_complete_run_that_shows_its_fault(name):
    fixture = make_fixtures.FIXTURES[name]
    path = RUNS / f"{name}.tbrec"
    result = scan(path)
    assert result.problem is None, f"{path.name}: {result.problem}"  # no torn tail
    by_worker, heartbeats = make_fixtures.read_updates(path)  # protocol-validated events
    assert sorted(by_worker) == list(range(make_fixtures.WORKERS))
    for worker, events in by_worker.items():
        assert [e["update"] for e in events] == list(range(1, fixture.updates + 1)), worker
        assert {e["run"] for e in events} == {name}
        assert len({e["session"] for e in events}) == 1  # one process, never restarted
    assert heartbeats >= make_fixtures.WORKERS  # at least each worker's closing heartbeat
    assert fixture.check(by_worker) is None, fixture.check(by_worker)


def test_fixtures_are_documented_and_small():
    readme = (RUNS / "README.md").read_text()
    for name in NAMES:
        assert f"`{name}.tbrec`" in readme
    recordings = sorted(RUNS.glob("*.tbrec"))
    assert [p.stem for p in recordings] == sorted(NAMES)  # nothing stray, nothing missing
    assert sum(p.stat().st_size for p in recordings) <= MAX_TOTAL_BYTES
