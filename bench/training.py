"""Training overhead of telemetry, and learning speed, with the reference PPO worker.

* **Steps/s with telemetry on vs off.** One :func:`emitter.ppo.train` run (1 torch thread,
  as ``trainbus train`` sets it) with a TelemetryEmitter connected to a running daemon
  (and a draining subscriber) behind a switch: for each update a balanced random draw
  decides whether that update's ``emit_ppo_update`` goes out (on) or is skipped (off).
  The time from one ``on_update`` callback to the next is that update's emit plus the
  next update's compute, so on and off intervals are paired in one process under the same
  load, which separate runs on a shared 2-core box cannot be (their spread is several
  percent, the quantity measured is a few microseconds per ~80 ms update). Steps/s are
  ``batch_size / median interval``. UpdateStats (the one-pass gradient measurement) is
  part of the worker in both halves: it is how the worker computes what it reports.
* **Updates to reach mean return 195** (1 worker, seed 1, default config, telemetry on):
  the first update at which the mean of ``episode_return_mean`` over the last 10 updates
  (the consumers' history length) is >= 195. Target: within 150 updates, the worker's
  documented default budget.
"""

from __future__ import annotations

import random
import time
from collections import deque
from typing import Any

from bench.common import (
    Row,
    emitter_into_daemon,
    median,
    ratio_row,
    unavailable,
)

RUN = "trainbench"
LEARN_TARGET = 195.0
LEARN_BUDGET = 150


class _Switch:
    """Forwards emit_ppo_update to the real emitter only while ``on``."""

    def __init__(self, emitter: Any) -> None:
        self.emitter = emitter
        self.on = False

    def emit_ppo_update(self, **fields: Any) -> bool:
        if self.on:
            return self.emitter.emit_ppo_update(**fields)
        return False


def _overhead(cfg_cls: Any, train: Any, emitter: Any, updates: int) -> dict[str, Any]:
    switch = _Switch(emitter)
    rng = random.Random(7)
    modes: list[bool] = []
    for _ in range(updates // 2 + 1):
        pair = [True, False]
        rng.shuffle(pair)
        modes += pair
    marks: list[tuple[float, bool]] = []

    def on_update(fields: dict[str, Any]) -> None:
        mode = modes[fields["update"] - 1]
        switch.on = mode
        marks.append((time.perf_counter(), mode))

    cfg = cfg_cls(num_updates=updates, seed=1)
    train(cfg, switch, on_update=on_update)
    on: list[float] = []
    off: list[float] = []
    # Skip the first two intervals (allocator and JIT-ish warm-up of the first updates).
    for (t0, mode), (t1, _) in list(zip(marks, marks[1:], strict=False))[2:]:
        (on if mode else off).append(t1 - t0)
    return {"on": on, "off": off, "batch": cfg.batch_size, "sent": emitter.sent}


def _learn(cfg_cls: Any, train: Any, emitter: Any) -> dict[str, Any]:
    recent: deque[float] = deque(maxlen=10)
    reached: list[int] = []

    def on_update(fields: dict[str, Any]) -> None:
        ret = fields.get("episode_return_mean")
        if ret is not None:
            recent.append(ret)
        if not reached and len(recent) == recent.maxlen and sum(recent) / len(recent) >= LEARN_TARGET:
            reached.append(fields["update"])

    t0 = time.perf_counter()
    last = train(cfg_cls(seed=1, num_updates=LEARN_BUDGET), emitter,
                 should_stop=lambda: bool(reached), on_update=on_update)
    return {"reached": reached[0] if reached else None, "updates": last.get("update", 0),
            "seconds": time.perf_counter() - t0,
            "final_mean": sum(recent) / len(recent) if recent else None}


def run(quick: bool = False, learn: bool = True) -> list[Row]:
    try:
        import torch  # noqa: F401  (the set-up needs it: unavailable row otherwise)

        from emitter.ppo import PPOConfig, train
    except ImportError as exc:
        why = f"emitter.ppo is not importable ({exc})"
        return [unavailable("training steps/s, telemetry on vs off", "steps/s", ">= 0.99x", why),
                unavailable("updates to mean return 195", "updates", f"<= {LEARN_BUDGET}", why)]

    updates = 12 if quick else 80
    rows: list[Row] = []
    with emitter_into_daemon(RUN) as sink:
        ov = _overhead(PPOConfig, train, sink.emitter, updates)
        learned = _learn(PPOConfig, train, sink.emitter) if learn else None
    seen = sink.seen

    on_sps = ov["batch"] / median(ov["on"])
    off_sps = ov["batch"] / median(ov["off"])
    rows.append(ratio_row(
        "training steps/s, telemetry on vs off", on_sps, "steps/s", "telemetry off", off_sps,
        min_ratio=0.99,
        note=f"reference PPO worker, 1 thread; {len(ov['on'])} on / {len(ov['off'])} off "
             f"update intervals interleaved in one run (median "
             f"{median(ov['on']) * 1e3:.1f} vs {median(ov['off']) * 1e3:.1f} ms); "
             f"subscriber received {seen['received']} of {sink.sent} events sent"))
    if learned is None:
        rows.append(Row("updates to mean return 195", None, "updates", "", None, None,
                        f"<= {LEARN_BUDGET}", None, note="skipped (--no-learn)"))
    else:
        reached = learned["reached"]
        rows.append(Row(
            "updates to mean return 195", float(reached) if reached else None, "updates", "",
            None, None, f"<= {LEARN_BUDGET} (10-update mean)", reached is not None,
            note=f"seed 1, 1 worker, default PPOConfig, telemetry on; {learned['seconds']:.1f}s"
                 + ("" if reached else f"; not reached in {learned['updates']} updates, "
                                       f"last 10-update mean {learned['final_mean']}")))
    return rows
