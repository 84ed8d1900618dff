"""The CUDA path of gradient measurement: one host synchronisation per update, right values.

DESIGN.md promises that telemetry adds no per-minibatch sync on CUDA: the update's scalars
stay on the device and reach the host in one transfer. These tests count synchronisations
with torch's own sync debugger (``torch.cuda.set_sync_debug_mode("warn")`` warns on every
synchronising call) around real training code. They need a GPU and skip without one, with
the reason shown; CPU runs cover the same code with the deferred path forced
(tests/test_gradients.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here (run on a GPU machine to check "
                                       "the one-sync-per-update path)")

from emitter.gradients import UpdateStats  # noqa: E402
from emitter.ppo import PPOConfig, train  # noqa: E402


@contextmanager
def counted_syncs() -> Iterator[list[str]]:
    """Collect one message per synchronising CUDA call made inside the block."""
    seen: list[str] = []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (The debugger also warns once that it is a prototype: not a sync, not counted.)
    seen.extend(str(w.message) for w in caught
                if "called a synchronizing CUDA operation" in str(w.message))


def _minibatch_loop(stats: UpdateStats, model: Any, opt: Any, data: Any, steps: int) -> None:
    for _ in range(steps):
        loss = model(data).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        stats.clip(model.parameters(), 0.5)
        opt.step()
        stats.add("loss", loss.detach())


def test_update_stats_minibatches_never_sync_and_resolve_syncs_once():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(),
                                torch.nn.Linear(256, 1)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.randn(512, 64, device="cuda")
    _minibatch_loop(UpdateStats("cuda"), model, opt, data, 2)  # warm-up (lazy init)
    stats = UpdateStats("cuda")
    with counted_syncs() as during:
        _minibatch_loop(stats, model, opt, data, 16)
    assert during == [], f"per-minibatch syncs: {during[:3]}"
    with counted_syncs() as at_resolve:
        values = stats.resolve()
    assert len(at_resolve) == 1, at_resolve
    assert all(math.isfinite(values[k]) for k in ("grad_norm", "pre_clip_grad_norm", "loss"))
    assert values["grad_norm"] <= 0.5 + 1e-6


def test_deferred_pre_clip_norm_matches_torch_clip_on_cuda():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 512), torch.nn.Tanh(),
                                torch.nn.Linear(512, 8)).cuda()
    data = torch.randn(256, 32, device="cuda")

    def grads() -> None:
        model.zero_grad(set_to_none=True)
        (model(data).square().mean() * 1e3).backward()

    grads()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).item()
    grads()
    stats = UpdateStats("cuda")
    stats.clip(model.parameters(), 0.5)
    got = stats.resolve()
    assert got["pre_clip_grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert got["grad_norm"] == pytest.approx(0.5, rel=1e-5)


def test_reference_worker_syncs_once_per_update_on_cuda():
    """The whole PPO update (rollout on device, GAE, minibatch epochs, telemetry): the
    sync count per update is what telemetry may add (one) and nothing else."""
    cfg = PPOConfig(device="cuda", num_updates=4, num_envs=16, num_steps=64)
    per_update: list[int] = []
    fields: list[dict[str, Any]] = []
    state: dict[str, Callable[[], None] | None] = {"close": None}

    def on_update(f: dict[str, Any]) -> None:
        fields.append(f)
        # Close the previous update's window, open the next one.
        if state["close"] is not None:
            state["close"]()
        cm = counted_syncs()
        seen = cm.__enter__()
        state["close"] = lambda: (cm.__exit__(None, None, None), per_update.append(len(seen)))

    train(cfg, on_update=on_update)
    if state["close"] is not None:
        state["close"]()
    # Windows: updates 2, 3 and 4 each entirely (update 1 includes set-up), then the
    # return from train() after update 4.
    assert len(per_update) == 4 and len(fields) == 4
    assert per_update == [1, 1, 1, 0], per_update
    assert all(math.isfinite(f["pre_clip_grad_norm"]) for f in fields)
