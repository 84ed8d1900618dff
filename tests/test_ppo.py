"""The reference worker: CartPole dynamics, learning, telemetry fields, faults, no-daemon runs."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import pytest

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
torch = pytest.importorskip("torch")

from bus import protocol  # noqa: E402
from consumers.runtime import Subscriber  # noqa: E402
from emitter import ppo  # noqa: E402
from emitter.cartpole import THETA_THRESHOLD, X_THRESHOLD, CartPole  # noqa: E402
from emitter.ppo import ActorCritic, PPOConfig, train  # noqa: E402
from emitter.telemetry import TelemetryEmitter  # noqa: E402
from tests.conftest import wait_for  # noqa: E402

OPTIONAL = tuple(protocol.PPO_UPDATE_OPTIONAL)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As in a worker process: intra-op threads only slow a 64x64 MLP down (and here two
    cores are shared with whatever else runs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run(cfg: PPOConfig, emitter: Any = None) -> list[dict[str, Any]]:
    history: list[dict[str, Any]] = []
    train(cfg, emitter, on_update=history.append)
    return history


# ------------------------------------------------------------------ CartPole


def test_cartpole_one_step_matches_the_equations():
    env = CartPole(1, seed=0)
    env.reset()
    env.state = torch.zeros(1, 4)
    out = env.step(torch.tensor([1]))
    # From rest, pushing right: x_acc = 9.7561, theta_acc = -14.6341 (gym's equations).
    x, x_dot, theta, theta_dot = out.obs[0].tolist()
    assert x == 0.0 and theta == 0.0
    assert x_dot == pytest.approx(0.02 * 9.7561, abs=1e-5)
    assert theta_dot == pytest.approx(0.02 * -14.6341, abs=1e-5)
    assert out.reward.tolist() == [1.0] and not bool(out.done[0])


def test_cartpole_auto_reset_and_episode_tracking():
    env = CartPole(16, seed=3)
    obs = env.reset()
    assert obs.shape == (16, 4) and bool((obs.abs() <= 0.05).all())
    finished_returns, finished_lengths = [], []
    for _ in range(60):  # always pushing right topples every pole within ~10 steps
        out = env.step(torch.ones(16, dtype=torch.int64))
        done = out.done
        if bool(done.any()):
            # Reset observations for finished envs, totals reported for them only.
            assert bool((out.obs[done].abs() <= 0.05).all())
            # ... while final_obs keeps the state that ended them: past a threshold.
            final = out.final_obs[done]
            assert bool(((final[:, 0].abs() > X_THRESHOLD)
                         | (final[:, 2].abs() > THETA_THRESHOLD)).all())
            assert torch.equal(out.final_obs[~done], out.obs[~done])
            finished_returns += out.episode_return[done].tolist()
            finished_lengths += out.episode_length[done].tolist()
            assert bool((out.episode_return[~done] == 0).all())
        assert bool((out.terminated & out.truncated).logical_not().all())
    assert len(finished_returns) >= 16
    assert finished_returns == [float(n) for n in finished_lengths]
    assert all(5 <= n <= 20 for n in finished_lengths)


def test_cartpole_truncates_at_the_step_limit():
    env = CartPole(4, seed=1, max_episode_steps=5)
    env.reset()
    for step in range(5):
        # Alternate pushes: the pole stays up for 5 steps, so episodes end by truncation.
        out = env.step(torch.full((4,), step % 2, dtype=torch.int64))
    assert bool(out.truncated.all()) and not bool(out.terminated.any())
    assert out.episode_length.tolist() == [5, 5, 5, 5]
    assert out.episode_return.tolist() == [5.0] * 4


def test_cartpole_final_obs_is_the_state_before_auto_reset():
    """A truncated episode's last state (what a learner must value to bootstrap) is in
    final_obs; obs already holds the next episode's start."""
    limited = CartPole(4, seed=1, max_episode_steps=5)
    endless = CartPole(4, seed=1)  # same seed and actions, but no truncation at step 5
    assert torch.equal(limited.reset(), endless.reset())
    for step in range(5):
        action = torch.full((4,), step % 2, dtype=torch.int64)
        out, ref = limited.step(action), endless.step(action)
        if step < 4:
            assert torch.equal(out.obs, ref.obs) and torch.equal(out.final_obs, out.obs)
    assert bool(out.truncated.all()) and not bool(ref.done.any())
    assert torch.equal(out.final_obs, ref.obs)  # the state step 5 reached
    assert not torch.equal(out.obs, ref.obs)  # the reset state
    assert bool((out.obs.abs() <= 0.05).all())
    assert bool((out.final_obs[:, 1].abs() > 0.05).all())  # moving: not a start state


def test_cartpole_seeds_differ_and_reproduce():
    a, b, c = CartPole(8, seed=1).reset(), CartPole(8, seed=1).reset(), CartPole(8, seed=2).reset()
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ PPO worker


def test_every_update_has_valid_fields():
    history = run(PPOConfig(num_updates=3, num_envs=4, num_steps=64))
    assert [f["update"] for f in history] == [1, 2, 3]
    assert [f["env_steps"] for f in history] == [256, 512, 768]
    for fields in history:
        payload = dict(fields, v=1, type="ppo_update", run="r", worker=0, session="s",
                       seq=0, ts=1.0)
        event = protocol.decode(protocol.encode(payload))  # valid protocol v1
        for name in protocol.PPO_UPDATE_REQUIRED:
            assert event.fields[name] is not None
        for name in OPTIONAL:
            assert name in fields
        assert fields["grad_norm"] <= 0.5 + 1e-6  # default max_grad_norm
        assert fields["pre_clip_grad_norm"] >= fields["grad_norm"]
        assert fields["pre_clip_grad_norm_max"] >= fields["pre_clip_grad_norm"]
        assert fields["ratio_min"] <= 1.0 <= fields["ratio_max"]
        assert fields["nonfinite_grad_count"] == 0
        assert fields["sps"] > 0 and fields["update_time_ms"] > 0
        # Early on, episodes of ~20 steps finish in every rollout: measured, not made up.
        assert fields["episode_return_mean"] == pytest.approx(fields["episode_length_mean"])
    assert history[0]["lr"] > history[-1]["lr"]  # annealed


def test_no_finished_episode_means_none_not_zero():
    # 8 steps per env: no CartPole episode can end that fast from the start distribution.
    fields = run(PPOConfig(num_updates=1, num_envs=2, num_steps=8, num_minibatches=2))[0]
    assert fields["episode_return_mean"] is None
    assert fields["episode_length_mean"] is None


@pytest.mark.timeout(60)
def test_learning_return_rises_within_30_updates():
    history = run(PPOConfig(num_updates=30))
    returns = [f["episode_return_mean"] for f in history if f["episode_return_mean"] is not None]
    early = sum(returns[:3]) / 3
    best_late = max(returns[-10:])
    assert early < 40, returns
    assert best_late >= 150, returns


class _EndlessCritic(ActorCritic):
    """A fixed critic saying 1 / (1 - gamma) everywhere: the exact value of an endless
    stream of rewards of 1, which is what an episode cut off by the time limit still has."""

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return super().value(obs) * 0.0 + 1.0 / (1.0 - PPOConfig.gamma)


class _OnePushCritic(ActorCritic):
    """A fixed critic that tells a start state (|x_dot| <= 0.05) from a state one push later
    (|x_dot| ~0.2): 0 for the former, 100 for the latter."""

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return super().value(obs) * 0.0 + 100.0 * (obs[:, 1].abs() > 0.1)


def test_truncation_is_bootstrapped_so_an_exact_critic_sees_zero_advantage(monkeypatch):
    """With the true value of an endless episode, every TD error is 1 + gamma*V - V = 0, the
    truncated steps' included, only if they are bootstrapped; treating truncation as
    termination would make them 1 - 100."""
    monkeypatch.setattr(ppo, "ActorCritic", _EndlessCritic)
    history = run(PPOConfig(num_updates=2, num_envs=4, num_steps=32, max_episode_steps=5))
    for fields in history:
        assert fields["episode_length_mean"] == 5  # every episode ended by truncation
        assert abs(fields["advantage_mean"]) < 1e-4, fields["advantage_mean"]
        assert fields["advantage_std"] < 1e-4


def test_truncation_bootstraps_from_the_final_observation_not_the_reset_one(monkeypatch):
    """Episodes of one step: every obs is a start state (V = 0) and every final state is
    one push away (V = 100), so each advantage is 1 + 0.99 * 100 = 100 when V(final_obs)
    is used, and 1 when the reset observation or nothing is."""
    monkeypatch.setattr(ppo, "ActorCritic", _OnePushCritic)
    history = run(PPOConfig(num_updates=2, num_envs=4, num_steps=16, max_episode_steps=1,
                            num_minibatches=2))
    for fields in history:
        assert fields["episode_length_mean"] == 1
        assert fields["advantage_mean"] == pytest.approx(100.0, abs=1e-3)
        assert fields["advantage_std"] < 1e-3


def test_inject_nan_reports_nan_then_recovers():
    history = run(PPOConfig(num_updates=4, num_envs=4, num_steps=64, inject_nan_at=2))
    before, poisoned, after = history[0], history[1], history[3]
    assert math.isfinite(before["grad_norm"]) and before["nonfinite_grad_count"] == 0
    assert math.isnan(poisoned["grad_norm"]) and math.isnan(poisoned["pre_clip_grad_norm"])
    assert poisoned["nonfinite_grad_count"] >= 1
    # The poisoned step was skipped, so the parameters (and later norms) stay finite.
    assert math.isfinite(after["grad_norm"]) and after["nonfinite_grad_count"] == 0
    assert math.isfinite(after["policy_loss"])


def test_explode_drill_drives_post_clip_norm_past_5_then_10():
    """The documented drill: --max-grad-norm inf --explode-at 5."""
    history = run(PPOConfig(num_updates=20, max_grad_norm=math.inf, explode_at=5))
    norms = [f["grad_norm"] for f in history]
    assert all(f["grad_norm"] == f["pre_clip_grad_norm"] for f in history)  # no clipping
    assert all(math.isinf(f["max_grad_norm"]) for f in history)
    first_past_5 = next(i for i, n in enumerate(norms) if n > 5)
    first_past_10 = next(i for i, n in enumerate(norms) if n > 10)
    assert first_past_5 < first_past_10 <= 15, norms
    assert all(math.isfinite(n) for n in norms)


def test_explode_with_clipping_keeps_grad_norm_at_max():
    history = run(PPOConfig(num_updates=8, num_envs=4, num_steps=64, explode_at=1))
    assert all(f["grad_norm"] <= 0.5 + 1e-6 for f in history)
    assert history[-1]["pre_clip_grad_norm"] > 10 * history[-1]["grad_norm"]


@pytest.mark.timeout(30)
def test_worker_without_daemon_never_blocks_or_raises(tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody-binds-this.sock"
    start = time.monotonic()
    with TelemetryEmitter("no-daemon", 0, endpoint, heartbeat_interval=None) as emitter:
        history = run(PPOConfig(num_updates=3, num_envs=4, num_steps=64), emitter)
        assert emitter.sent + emitter.dropped == 3
    assert len(history) == 3
    assert time.monotonic() - start < 20


@pytest.mark.timeout(30)
def test_worker_events_carry_the_updates_largest_pre_clip_norm(daemon):
    """Over a real daemon: every update's event has pre_clip_grad_norm_max, the value the
    worker measured, and it is at least the update's mean pre-clip norm."""
    history: list[dict[str, Any]] = []
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_update"], run="maxnorm") as sub, \
            TelemetryEmitter("maxnorm", 0, daemon.publish, heartbeat_interval=None) as emitter:
        assert emitter.wait_for_bus(10)
        wait_for(lambda: sub.poll(20) is not None and sub.connected, 10, message="connection")
        train(PPOConfig(num_updates=3, num_envs=4, num_steps=64), emitter,
              on_update=history.append)
        got: list[protocol.Event] = []
        wait_for(lambda: got.extend(sub.poll(50)) or len(got) >= 3, 10, message="3 updates")
    assert [e.get("update") for e in got] == [1, 2, 3]
    for event, fields in zip(got, history, strict=True):
        value = event.get("pre_clip_grad_norm_max")
        assert isinstance(value, float) and math.isfinite(value)
        assert value == fields["pre_clip_grad_norm_max"]
        assert value >= event.get("pre_clip_grad_norm") > 0


def test_should_stop_ends_the_loop_between_updates():
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    last = train(PPOConfig(num_updates=0, num_envs=2, num_steps=16), should_stop=should_stop)
    assert last["update"] == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_learns_cartpole_to_195_within_150_updates():
    history = run(PPOConfig())  # defaults: 150 updates
    returns = [f["episode_return_mean"] for f in history]
    assert returns[0] is not None and returns[0] < 40
    # Reached: mean over the last 5 reported updates with finished episodes >= 195.
    window: list[float] = []
    reached_at = None
    for fields, ret in zip(history, returns, strict=True):
        if ret is None:
            continue
        window = (window + [ret])[-5:]
        if len(window) == 5 and sum(window) / 5 >= 195:
            reached_at = fields["update"]
            break
    assert reached_at is not None and reached_at <= 150, returns
