"""stable-baselines3 integration: real SB3 PPO on CartPole-v1, published through a real daemon.

What is checked, and against what: the events a subscriber receives (one per update, every
field sane), the callback's gradient norms against the values torch's own
``clip_grad_norm_`` returned inside SB3 (recorded by wrapping it *in the test only*; the
callback itself patches nothing), the other fields against SB3's own logger, the update
numbering across ``learn()`` calls, ``target_kl`` early stopping, hook removal, and the
refusal of other algorithms. Small rollouts (128 steps, minibatch 32, 2 epochs) keep each
``learn()`` under a second or two on a 2-core CPU. Waits are polls with deadlines.
"""

from __future__ import annotations

import gc
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest

sb3 = pytest.importorskip(
    "stable_baselines3",
    reason="stable-baselines3 is not installed: pip install 'trainbus[sb3]' (make install does)")
torch = pytest.importorskip("torch")

from stable_baselines3 import A2C, PPO  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback, CallbackList  # noqa: E402

from bus import protocol  # noqa: E402
from consumers.runtime import Subscriber  # noqa: E402
from emitter.integrations.sb3 import (  # noqa: E402
    UPDATES_ATTR,
    TrainbusCallback,
    _GradientProbe,
    _reduce_norms,
)
from tests.conftest import wait_for  # noqa: E402

N_STEPS = 128
BATCH = 32
EPOCHS = 2
STEPS_PER_UPDATE = (N_STEPS // BATCH) * EPOCHS
RUN = "sb3-test"
NOWHERE = "tcp://127.0.0.1:9"  # nothing listens there: emits are queued or dropped, never block


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class ClipRecorder:
    """Records what ``torch.nn.utils.clip_grad_norm_`` returned inside SB3's train(), keyed
    by ``tag()`` at the time of the call (here: the callback's count of emitted updates,
    which is the in-flight update's number minus one)."""

    def __init__(self) -> None:
        self.tag: Callable[[], Any] = lambda: None
        self.returned: dict[Any, list[float]] = defaultdict(list)


@pytest.fixture
def clip_returns(monkeypatch: pytest.MonkeyPatch) -> ClipRecorder:
    recorder = ClipRecorder()
    original = torch.nn.utils.clip_grad_norm_

    def recording_clip(*args: Any, **kwargs: Any) -> Any:
        total = original(*args, **kwargs)
        recorder.returned[recorder.tag()].append(float(total))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    return recorder


def make_ppo(**kwargs: Any) -> Any:
    return PPO("MlpPolicy", "CartPole-v1", n_steps=N_STEPS, batch_size=BATCH, n_epochs=EPOCHS,
               seed=0, device="cpu", **kwargs)


def quiet_callback(**kwargs: Any) -> TrainbusCallback:
    """A callback whose emitter points at nothing (for checks that need no daemon)."""
    return TrainbusCallback(run=RUN, worker=0, publish=NOWHERE, heartbeat_interval=None,
                            linger_ms=0, **kwargs)


def collect(sub: Subscriber, want: int, timeout: float = 20.0) -> list[protocol.Event]:
    got: list[protocol.Event] = []
    wait_for(lambda: got.extend(sub.poll(50)) or len(got) >= want, timeout,
             message=f"{want} ppo_update events")
    return got


def connected(sub: Subscriber, cb: TrainbusCallback) -> None:
    assert cb.emitter.wait_for_bus(10), "the daemon never subscribed to the emitter"
    wait_for(lambda: sub.poll(20) is not None and sub.connected, 10, message="subscriber")


def hooks_left(model: Any) -> int:
    """Hooks still registered on the policy's parameters and optimizer (SB3 registers none)."""
    params = sum(len(p._backward_hooks or {}) for p in model.policy.parameters())
    return params + len(model.policy.optimizer._optimizer_step_pre_hooks)


def post_clip(pre: float, max_norm: float) -> float:
    """torch's coefficient applied to the pre-clip norm (DESIGN.md: no second pass)."""
    return pre * min(1.0, max_norm / (pre + 1e-6))


def assert_sane(fields: dict[str, Any], max_norm: float) -> None:
    for name in protocol.PPO_UPDATE_REQUIRED:
        value = fields[name]
        if name != "max_grad_norm":
            assert value is not None and math.isfinite(value), (name, value)
    assert fields["max_grad_norm"] == max_norm
    assert 0.0 < fields["grad_norm"] <= max_norm + 1e-6
    assert fields["grad_norm"] <= fields["pre_clip_grad_norm"] + 1e-9
    assert fields["pre_clip_grad_norm"] <= fields["pre_clip_grad_norm_max"]
    assert 0.0 < fields["entropy"] <= math.log(2) + 1e-6  # CartPole: two actions
    assert fields["value_loss"] >= 0.0 and fields["approx_kl"] >= 0.0
    assert 0.0 <= fields["clip_fraction"] <= 1.0
    assert fields["lr"] == pytest.approx(3e-4)
    assert fields["sps"] > 0 and fields["update_time_ms"] > 0
    assert fields["advantage_std"] > 0


# ---------------------------------------------------------------------------- through a daemon


def test_ppo_publishes_one_measured_event_per_update(daemon, clip_returns):
    model = make_ppo()
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_update"], run=RUN) as sub, \
            TrainbusCallback(run=RUN, worker=3, publish=daemon.publish,
                             heartbeat_interval=None) as cb:
        connected(sub, cb)
        clip_returns.tag = lambda: cb.updates_emitted
        model.learn(4 * N_STEPS, callback=cb)
        assert not cb.hooks_attached and hooks_left(model) == 0
        events = collect(sub, 4)
        last_step_norms = cb.last_pre_clip_norms

        # One event per update, in order, nothing extra sent.
        assert cb.emitter.sent == 4
        assert [e.get("update") for e in events] == [1, 2, 3, 4]
        assert [e.seq for e in events] == [0, 1, 2, 3]
        assert {(e.run, e.worker) for e in events} == {(RUN, 3)}
        assert [e.get("env_steps") for e in events] == [N_STEPS * k for k in (1, 2, 3, 4)]
        assert events[-1].get("env_steps") == model.num_timesteps

        for event in events:
            f = event.fields
            assert_sane(f, model.max_grad_norm)
            returned = clip_returns.returned[f["update"] - 1]
            assert f["optimizer_steps"] == len(returned) == STEPS_PER_UPDATE
            assert f["epochs"] == EPOCHS
            # Mean and max of what clip_grad_norm_ returned, minibatch by minibatch.
            assert f["pre_clip_grad_norm_max"] == max(returned)
            assert f["pre_clip_grad_norm"] == pytest.approx(statistics.fmean(returned), rel=1e-12)
            expected_post = statistics.fmean(post_clip(r, model.max_grad_norm) for r in returned)
            assert f["grad_norm"] == pytest.approx(expected_post, rel=1e-6)
            # CartPole pays 1 per step: an episode's return is its length.
            assert f["episode_return_mean"] == pytest.approx(f["episode_length_mean"])
            assert f["episode_return_mean"] > 0
        # Bit for bit on the last update: each optimizer step's pre-clip norm is the very
        # number torch's clip_grad_norm_ returned for that minibatch.
        assert last_step_norms == clip_returns.returned[3]

        # The other fields are SB3's own logged values, converted (its logger still holds
        # the last train()'s values after learn()).
        logged = model.logger.name_to_value
        last = events[-1].fields
        assert last["entropy"] == -float(logged["train/entropy_loss"])
        assert last["policy_loss"] == float(logged["train/policy_gradient_loss"])
        assert last["value_loss"] == float(logged["train/value_loss"])
        assert last["approx_kl"] == float(logged["train/approx_kl"])
        assert last["clip_fraction"] == float(logged["train/clip_fraction"])
        assert last["explained_variance"] == float(logged["train/explained_variance"])
        assert last["lr"] == float(logged["train/learning_rate"])

        # A second learn() that continues the run continues the numbering (same session).
        model.learn(2 * N_STEPS, callback=cb, reset_num_timesteps=False)
        more = collect(sub, 2)
        assert [e.get("update") for e in more] == [5, 6]
        assert [e.get("env_steps") for e in more] == [5 * N_STEPS, 6 * N_STEPS]
        assert more[-1].get("env_steps") == model.num_timesteps
        assert {e.session for e in more} == {events[0].session}
        assert hooks_left(model) == 0

    # So does a new callback (a new session) on the same model: the count lives on the model.
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_update"], run=RUN) as sub, \
            TrainbusCallback(run=RUN, worker=3, publish=daemon.publish,
                             heartbeat_interval=None) as cb2:
        connected(sub, cb2)
        model.learn(N_STEPS, callback=cb2, reset_num_timesteps=False)
        (event,) = collect(sub, 1)
        assert event.get("update") == 7 and event.get("env_steps") == 7 * N_STEPS
        assert event.session != events[0].session


def test_target_kl_early_stop_still_one_event_per_update(daemon, clip_returns):
    # target_kl 1e-5 stops every update after a few minibatches of its first epoch.
    model = make_ppo(target_kl=1e-5)
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_update"], run=RUN) as sub, \
            TrainbusCallback(run=RUN, worker=0, publish=daemon.publish,
                             heartbeat_interval=None) as cb:
        connected(sub, cb)
        clip_returns.tag = lambda: cb.updates_emitted
        model.learn(3 * N_STEPS, callback=cb)
        events = collect(sub, 3)
    assert [e.get("update") for e in events] == [1, 2, 3]
    assert cb.emitter.sent == 3
    for event in events:
        f = event.fields
        assert_sane(f, model.max_grad_norm)
        returned = clip_returns.returned[f["update"] - 1]
        # The means are over the optimizer steps that happened, no more.
        assert 1 <= f["optimizer_steps"] == len(returned) < STEPS_PER_UPDATE
        assert f["epochs"] == 1
        assert f["pre_clip_grad_norm"] == pytest.approx(statistics.fmean(returned), rel=1e-12)
        assert f["pre_clip_grad_norm_max"] == max(returned)
    assert model._n_updates == 3  # SB3 counted one epoch per update; we counted updates


# ---------------------------------------------------------------------------- in process


def test_an_update_without_any_optimizer_step_is_reported_as_such():
    # A negative target_kl stops every update before its first backward.
    model = make_ppo(target_kl=-1.0)
    with quiet_callback() as cb:
        model.learn(2 * N_STEPS, callback=cb)
        assert cb.updates_emitted == 2
        f = cb.last_fields
        assert f is not None and f["update"] == 2
        assert f["optimizer_steps"] == 0
        assert f["grad_norm"] == 0.0 and f["pre_clip_grad_norm"] == 0.0  # nothing applied
        assert f["pre_clip_grad_norm_max"] is None  # not measured, not a made-up 0
        assert math.isfinite(f["entropy"]) and f["entropy"] > 0


def test_reset_num_timesteps_restarts_the_numbering_with_env_steps():
    model = make_ppo()
    with quiet_callback() as cb:
        model.learn(2 * N_STEPS, callback=cb)
        assert cb.last_fields["update"] == 2 and getattr(model, UPDATES_ATTR) == 2
        model.learn(N_STEPS, callback=cb)  # SB3's default: reset_num_timesteps=True
        assert cb.last_fields["update"] == 1
        assert cb.last_fields["env_steps"] == model.num_timesteps == N_STEPS


def test_other_algorithms_are_refused_before_training():
    model = A2C("MlpPolicy", "CartPole-v1", n_steps=8, seed=0, device="cpu")
    with quiet_callback() as cb:
        with pytest.raises(TypeError, match="supports PPO"):
            model.learn(64, callback=cb)
        assert model.num_timesteps == 0  # refused at learn()'s start, nothing ran
        assert not cb.hooks_attached and hooks_left(model) == 0
        assert cb.emitter.sent == 0


def test_emitter_or_its_arguments_not_both():
    with quiet_callback() as owner:
        with pytest.raises(ValueError, match="not both"):
            TrainbusCallback(run="x", emitter=owner.emitter)
        borrowed = TrainbusCallback(emitter=owner.emitter)
        borrowed.close()
        # A borrowed emitter stays open: its owner closes it.
        assert owner.emitter.emit_ppo_update(**_fields())


class _Boom(BaseCallback):
    """Raises at the second rollout's start, i.e. after the first train()."""

    def __init__(self) -> None:
        super().__init__()
        self.rollouts = 0

    def _on_rollout_start(self) -> None:
        self.rollouts += 1
        if self.rollouts == 2:
            raise RuntimeError("boom")

    def _on_step(self) -> bool:
        return True


def test_hooks_removed_by_close_and_by_garbage_collection_after_a_failed_learn():
    model = make_ppo()
    cb = quiet_callback()
    try:
        model.learn(3 * N_STEPS, callback=CallbackList([_Boom(), cb]))
    except RuntimeError:
        pass
    else:
        pytest.fail("learn() should have raised")
    assert cb.hooks_attached and hooks_left(model) > 0  # learn() never reached its end
    cb.close()
    assert not cb.hooks_attached and hooks_left(model) == 0

    cb = quiet_callback()
    try:
        model.learn(3 * N_STEPS, callback=CallbackList([_Boom(), cb]), reset_num_timesteps=False)
    except RuntimeError:
        pass
    assert hooks_left(model) > 0
    del cb
    gc.collect()  # the hooks do not keep the callback alive; its finaliser removes them
    assert hooks_left(model) == 0


# ---------------------------------------------------------------------------- the probe


def _tiny_model() -> tuple[Any, Any, list[Any]]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    return net, opt, list(net.parameters())


@pytest.mark.parametrize("use_queue_callback", [True, False], ids=["end-of-backward", "multi-hook"])
def test_probe_matches_clip_grad_norm_bit_for_bit(use_queue_callback):
    net, opt, params = _tiny_model()
    probe = _GradientProbe(params, opt, use_queue_callback=use_queue_callback)
    probe.recording = True
    returned = []
    try:
        for scale in (1e-3, 1.0, 50.0, 1.0):
            opt.zero_grad()
            (net(torch.randn(8, 4)).square().sum() * scale).backward()
            returned.append(float(torch.nn.utils.clip_grad_norm_(params, 0.5)))
            opt.step()
        opt.zero_grad()
        net(torch.randn(8, 4)).sum().backward()  # a backward without a step: not counted
        steps = probe.take()
    finally:
        probe.remove()
    assert len(steps) == 4
    mean_pre, mean_post, max_pre, every = _reduce_norms(steps, 0.5)
    assert every == returned
    assert max_pre == max(returned)
    assert mean_post == pytest.approx(statistics.fmean(post_clip(r, 0.5) for r in returned))
    assert all(not p._backward_hooks for p in params) and not opt._optimizer_step_pre_hooks


def test_probe_records_nothing_unless_recording():
    net, opt, params = _tiny_model()
    probe = _GradientProbe(params, opt)
    try:
        opt.zero_grad()
        net(torch.randn(8, 4)).sum().backward()
        opt.step()
        assert probe.take() == []
    finally:
        probe.remove()


def test_reduce_norms_nan_and_float32_overflow():
    nan = torch.tensor([1.0, float("nan")])
    ok = torch.tensor([3.0, 4.0])
    pre, post, pre_max, every = _reduce_norms([ok, nan], 0.5)
    assert every[0] == 5.0 and math.isnan(every[1])
    assert math.isnan(pre) and math.isnan(post) and math.isnan(pre_max)  # the news, carried
    # Per-tensor norms finite, their float32 combination not: the float64 one is reported,
    # and torch's coefficient (0: it zeroed the gradients) gives the post-clip norm.
    huge = torch.tensor([3e38, 3e38])
    pre, post, pre_max, _ = _reduce_norms([huge], 0.5)
    assert pre == pytest.approx(math.hypot(3e38, 3e38)) and math.isfinite(pre)
    assert post == 0.0
    # max_norm inf: nothing clipped.
    pre, post, _, _ = _reduce_norms([ok], math.inf)
    assert pre == post == 5.0


# ---------------------------------------------------------------------------- sb3-contrib


def _contrib_model(name: str) -> Any:
    contrib = pytest.importorskip(
        "sb3_contrib", reason="sb3-contrib is not installed (optional: pip install sb3-contrib)")
    if name == "RecurrentPPO":
        return contrib.RecurrentPPO("MlpLstmPolicy", "CartPole-v1", n_steps=64, batch_size=32,
                                    n_epochs=2, seed=0, device="cpu")
    from sb3_contrib.common.envs import InvalidActionEnvDiscrete

    return contrib.MaskablePPO("MlpPolicy", InvalidActionEnvDiscrete(dim=20, n_invalid_actions=10),
                               n_steps=64, batch_size=32, n_epochs=2, seed=0, device="cpu")


@pytest.mark.parametrize("name", ["MaskablePPO", "RecurrentPPO"])
def test_sb3_contrib_ppo_variants(name, clip_returns):
    model = _contrib_model(name)
    with quiet_callback() as cb:
        clip_returns.tag = lambda: cb.updates_emitted
        model.learn(2 * 64, callback=cb)
        assert cb.updates_emitted == 2 and not cb.hooks_attached
        f = cb.last_fields
        assert f["update"] == 2 and f["env_steps"] == model.num_timesteps
        assert f["optimizer_steps"] == len(clip_returns.returned[1]) > 0
        assert cb.last_pre_clip_norms == clip_returns.returned[1]
        assert f["entropy"] == -float(model.logger.name_to_value["train/entropy_loss"]) > 0


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_probe_adds_no_host_sync_per_minibatch():
    # The probe's per-minibatch work must not synchronise with the device (SB3's own
    # .item() calls do, so the probe is checked on its own loop, under torch's sync debugger).
    net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)).cuda()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    params = list(net.parameters())
    probe = _GradientProbe(params, opt)
    probe.recording = True
    x = torch.randn(32, 4, device="cuda")
    returned = []
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                opt.zero_grad()
                net(x).square().sum().backward()
                returned.append(torch.nn.utils.clip_grad_norm_(params, 0.5))
                opt.step()
            with pytest.raises(RuntimeError, match="synchroniz"):  # the debugger is watching
                probe.steps[0].tolist()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        steps = probe.take()
    finally:
        probe.remove()
    *_, every = _reduce_norms(steps, 0.5)  # the one host read, after the minibatches
    assert every == [float(r) for r in returned]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_ppo_norms_match_clip_grad_norm(clip_returns):
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=N_STEPS, batch_size=BATCH, n_epochs=EPOCHS,
                seed=0, device="cuda")
    with quiet_callback() as cb:
        clip_returns.tag = lambda: cb.updates_emitted
        model.learn(2 * N_STEPS, callback=cb)
        assert cb.last_pre_clip_norms == clip_returns.returned[1]
        assert_sane(cb.last_fields, model.max_grad_norm)


def _fields() -> dict[str, Any]:
    return {"update": 1, "env_steps": 1, "grad_norm": 0.1, "pre_clip_grad_norm": 0.1,
            "max_grad_norm": 0.5, "policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.5,
            "approx_kl": 0.0, "clip_fraction": 0.0, "lr": 1e-3}
