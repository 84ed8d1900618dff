"""docs/integrations.md: the CleanRL-style script runs exactly as written and publishes one
valid ppo_update per update to a real daemon."""

from __future__ import annotations

import math
import re
import sys

import pytest

from bus import protocol
from consumers.runtime import Subscriber
from tests.conftest import REPO, wait_for

pytest.importorskip("torch")
pytest.importorskip("gymnasium")

DOC = REPO / "docs" / "integrations.md"
SCRIPT_FIRST_LINE = "# cleanrl_ppo.py"
TRAINBUS_MARK = "# trainbus"


def cleanrl_script() -> str:
    """The fenced python block of the doc's "A CleanRL-style script" section, as written."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## A CleanRL-style script", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
              if b.startswith(SCRIPT_FIRST_LINE)]
    assert len(blocks) == 1, "expected exactly one script block in the CleanRL section"
    return blocks[0]


def test_the_added_lines_are_the_marked_ones_and_few():
    """Every line touching trainbus carries the `# trainbus` mark, so a reader sees the whole
    change at a glance, and the change stays small (the point of the section)."""
    lines = cleanrl_script().splitlines()
    marked = [line for line in lines if TRAINBUS_MARK in line]
    for line in lines:
        if re.search(r"\b(emitter|stats|UpdateStats|TelemetryEmitter)\b", line) \
                and not line.lstrip().startswith("#"):
            assert TRAINBUS_MARK in line, f"unmarked trainbus line: {line!r}"
    assert not any("clip_grad_norm_(" in line for line in lines)  # replaced by stats.clip
    assert 10 <= len(marked) <= 16, marked


@pytest.mark.timeout(120)
def test_cleanrl_script_from_the_doc_publishes_every_update(procs, daemon, tmp_path):
    script = tmp_path / "cleanrl_ppo.py"
    script.write_text(cleanrl_script(), encoding="utf-8")
    updates, batch = 3, 4 * 64
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_update", "heartbeat"]) as sub:
        wait_for(lambda: sub.poll(20) is not None and sub.stats.snapshots >= 1, 10,
                 message="subscriber connected")
        job = procs.start([sys.executable, str(script), "--total-timesteps", str(updates * batch),
                           "--num-envs", "4", "--num-steps", "64", "--seed", "3"],
                          env={**daemon.env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
        got: list[protocol.Event] = []

        def closed() -> bool:
            got.extend(sub.poll(50))
            return (any(e.type == protocol.HEARTBEAT and e.get("closing") for e in got)
                    or job.popen.poll() not in (None, 0))

        wait_for(closed, 100, message="the script's closing heartbeat")
        assert job.wait(20) == 0, job.stderr.text()[-3000:]
    assert not [line for line in job.stderr.snapshot() if "Warning" in line], job.stderr.text()
    events = [e for e in got if e.type == protocol.PPO_UPDATE]
    assert [e.get("update") for e in events] == [1, 2, 3]
    assert {e.worker for e in events} == {0}
    assert len({e.run for e in got}) == 1
    assert re.fullmatch(r"CartPole-v1__ppo__3__\d+", events[0].run)
    for event in events:
        for name in protocol.PPO_UPDATE_REQUIRED:
            assert math.isfinite(event.get(name)), name
        assert event.get("env_steps") == event.get("update") * batch
        assert event.get("grad_norm") <= event.get("max_grad_norm") + 1e-6 == 0.5 + 1e-6
        assert event.get("pre_clip_grad_norm_max") >= event.get("pre_clip_grad_norm") \
            >= event.get("grad_norm") > 0
        assert event.get("nonfinite_grad_count") == 0
        assert 0 <= event.get("clip_fraction") <= 1 and event.get("entropy") > 0
        assert event.get("sps") > 0
    # Random-ish CartPole episodes last ~20 steps: 64 steps x 4 envs finish some.
    assert all(e.get("episode_return_mean") > 0 for e in events)
    assert events[0].get("lr") > events[-1].get("lr")  # annealed as written
    closing = [e for e in got if e.type == protocol.HEARTBEAT and e.get("closing")]
    assert closing[0].get("events_sent") == 3 and closing[0].get("last_update") == 3
