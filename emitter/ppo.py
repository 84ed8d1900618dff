"""The reference PPO worker: CartPole-v1, vectorized, publishing one ``ppo_update`` per update.

Read it top to bottom like CleanRL's ``ppo.py``: every hyperparameter is in
:class:`PPOConfig`, and :func:`train` walks through PPO in labelled blocks — learning-rate
annealing, rollout, truncation bootstrap, GAE(lambda), minibatch epochs (clipped surrogate,
clipped value loss, entropy bonus, gradient clipping, Adam), telemetry. Differences from a
plain script, and why:

* time-limit truncation is not termination (as in Stable-Baselines3, unlike CleanRL): an
  episode cut off at ``max_episode_steps`` would have gone on, so that step's reward gets
  ``gamma * V(final observation)`` added, the value of the state the env reached before its
  auto-reset. Treating it as termination asks the critic to predict an ending it cannot see
  (CartPole's state has no clock): at return 500 its value loss stayed ~50. Bootstrapped,
  the critic fits (value loss ~1e-5), but explained variance does not become a better
  signal on a solved CartPole: every state of a balancing pole is then worth about
  1/(1 - gamma), so the returns hardly vary and EV is a ratio of two near-zero variances
  (the README's reference-worker section has the before/after numbers). The values are
  taken once per update, in one batched no-grad pass over the rollout's final
  observations: the policy does not change during a rollout, so this equals valuing them
  step by step; it costs ~1 ms per update on a 2-core CPU, against ~8 ms for valuing every
  env at every step and ~1.7 ms for valuing only the truncated ones (which also needs a
  host read per step, a sync on CUDA);
* no script-level state: everything lives inside :func:`train`, so N workers can run it in
  N processes (``trainbus train``) and tests can run it in-process;
* no ``.item()`` per minibatch: minibatch scalars go into
  :class:`emitter.gradients.UpdateStats` and reach the host once per update (on CUDA that
  is the only synchronisation telemetry adds; on CPU there is none to add);
* one ``ppo_update`` event per update through :class:`emitter.telemetry.TelemetryEmitter`,
  which never blocks, so a missing, killed or restarting daemon costs training nothing.

Reported per update (losses, KL, clip fraction, norms: means over all minibatches of all
epochs, as Stable-Baselines3 logs them; ``pre_clip_grad_norm_max``, the largest pre-clip
norm of any of them, since a mean hides one spiking minibatch; ratio min/max over all of
them; advantage mean/std over the rollout before per-minibatch normalisation; episode return/length over
episodes that *finished* during the rollout, ``None`` when none did — never a made-up 0).
``update`` counts from 1; ``env_steps`` is cumulative.

Fault injection (so an operator can see the warning, critical and NaN paths live):

* ``inject_nan_at=U``: at update U one gradient element is set to NaN after ``backward()``
  in the first minibatch. Clipping then reports a NaN pre/post-clip norm and
  ``nonfinite_grad_count >= 1``, and that minibatch's optimizer step is skipped, as
  ``torch.amp.GradScaler`` skips steps with non-finite gradients, so the run recovers
  and the alert can resolve.
* ``explode_at=U``: from update U on the loss is multiplied by ``explode_growth ** (u - U + 1)``
  before ``backward()``, so gradients grow geometrically (x1.15 per update by default, capped at x1e4).
  Adam is invariant to that scale, so the policy keeps learning while the measured norms
  climb. With clipping disabled the *post-clip* norm climbs past 5 and then past 10::

      trainbus train --max-grad-norm inf --explode-at 5

  (measured with seed 1 on CPU: grad_norm 2.4-3.9 for updates 1-4, 5.7 at update 5, 10.1
  at update 7, then on up to ~1e5 where the scale is capped). Even ``--max-grad-norm inf``
  alone goes there more slowly, because CartPole's unnormalised value loss has large
  gradients: past 5 at update 6, hovering 6-10, first past 10 at update 15. With the
  default ``--max-grad-norm 0.5`` the explode flag shows clipping at work instead: the
  pre-clip norm climbs while grad_norm stays at 0.5.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from emitter.cartpole import NUM_ACTIONS, OBS_DIM, CartPole
from emitter.gradients import UpdateStats

__all__ = ["ActorCritic", "PPOConfig", "train"]

#: explode_at stops growing here, so a long demo stays finite (norms ~1e4-1e5) forever.
EXPLODE_MAX_SCALE = 1e4


@dataclass
class PPOConfig:
    """Every knob of the reference worker. Defaults learn CartPole-v1 (mean return >= 195)
    within 150 updates on a 2-core CPU (~80 ms per update with ``torch.set_num_threads(1)``,
    which is what ``trainbus train`` workers use: intra-op threads only slow a 64x64 MLP)."""

    seed: int = 1
    device: str = "cpu"
    num_envs: int = 8
    max_episode_steps: int = 500  # CartPole-v1's time limit (truncation, bootstrapped)
    num_steps: int = 128  # rollout length per env; batch = num_envs * num_steps
    num_updates: int = 150  # 0 = run until stopped (then the learning rate is constant)
    learning_rate: float = 2.5e-3
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    norm_adv: bool = True
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5  # inf = no clipping
    hidden: int = 64
    # Fault injection (see the module docstring).
    inject_nan_at: int | None = None
    explode_at: int | None = None
    explode_growth: float = 1.15

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches


def _layer(in_dim: int, out_dim: int, std: float = math.sqrt(2)) -> nn.Linear:
    """Orthogonal weights, zero bias: the initialisation PPO implementations rely on."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, 0.0)
    return layer


class ActorCritic(nn.Module):
    """Separate 2x``hidden`` tanh MLPs for the policy logits and the state value."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.critic = nn.Sequential(_layer(OBS_DIM, hidden), nn.Tanh(),
                                    _layer(hidden, hidden), nn.Tanh(),
                                    _layer(hidden, 1, std=1.0))
        self.actor = nn.Sequential(_layer(OBS_DIM, hidden), nn.Tanh(),
                                   _layer(hidden, hidden), nn.Tanh(),
                                   _layer(hidden, NUM_ACTIONS, std=0.01))

    def value(self, obs: Tensor) -> Tensor:
        return self.critic(obs).squeeze(-1)

    def act(self, obs: Tensor, action: Tensor | None = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(action, log-prob, entropy, value); samples an action when none is given.

        A hand-rolled categorical (log_softmax + multinomial) instead of
        ``torch.distributions.Categorical``: same maths, a fraction of the Python overhead
        on the rollout's many tiny batches.
        """
        log_probs = torch.log_softmax(self.actor(obs), dim=-1)
        if action is None:
            action = torch.multinomial(log_probs.exp(), 1).squeeze(-1)
        log_prob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return action, log_prob, entropy, self.value(obs)


def train(cfg: PPOConfig, emitter: Any | None = None, *,
          should_stop: Callable[[], bool] | None = None,
          on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run PPO on CartPole-v1 for ``cfg.num_updates`` updates (or until ``should_stop()``).

    ``emitter`` (a TelemetryEmitter, or None for no telemetry) gets one
    ``emit_ppo_update(**fields)`` per update; ``on_update(fields)`` sees the same fields
    (tests, progress lines). Returns the last update's fields (empty if none ran).
    """
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    envs = CartPole(cfg.num_envs, seed=cfg.seed, device=device,
                    max_episode_steps=cfg.max_episode_steps)
    agent = ActorCritic(cfg.hidden).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5)
    params = list(agent.parameters())
    poison_target = agent.critic[0].weight  # the gradient inject_nan_at poisons

    # Rollout storage, reused every update.
    shape = (cfg.num_steps, cfg.num_envs)
    obs = torch.zeros(*shape, OBS_DIM, device=device)
    actions = torch.zeros(shape, dtype=torch.int64, device=device)
    logprobs = torch.zeros(shape, device=device)
    rewards = torch.zeros(shape, device=device)
    dones = torch.zeros(shape, device=device)
    values = torch.zeros(shape, device=device)
    final_obs = torch.zeros(*shape, OBS_DIM, device=device)  # state before auto-reset
    truncateds = torch.zeros(shape, dtype=torch.bool, device=device)  # time limit cut it

    next_obs = envs.reset()
    next_done = torch.zeros(cfg.num_envs, device=device)
    env_steps = 0
    update = 0
    last: dict[str, Any] = {}

    while cfg.num_updates <= 0 or update < cfg.num_updates:
        if should_stop is not None and should_stop():
            break
        update += 1
        t_start = time.perf_counter()
        stats = UpdateStats(device)

        # ---- 1. Learning-rate annealing: linear to 0 over the run (constant if unbounded).
        lr = cfg.learning_rate
        if cfg.anneal_lr and cfg.num_updates > 0:
            lr = cfg.learning_rate * (1.0 - (update - 1) / cfg.num_updates)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- 2. Rollout: num_steps steps of all envs with the current policy.
        episode_return_sum = torch.zeros((), device=device)
        episode_length_sum = torch.zeros((), device=device)
        episodes = torch.zeros((), device=device)
        with torch.no_grad():
            for step in range(cfg.num_steps):
                obs[step] = next_obs
                dones[step] = next_done
                action, logprob, _, value = agent.act(next_obs)
                actions[step] = action
                logprobs[step] = logprob
                values[step] = value
                result = envs.step(action)
                rewards[step] = result.reward
                final_obs[step] = result.final_obs
                truncateds[step] = result.truncated
                next_obs = result.obs
                next_done = result.done.to(torch.float32)
                episode_return_sum += result.episode_return.sum()
                episode_length_sum += result.episode_length.sum()
                episodes += result.done.sum()
        env_steps += cfg.batch_size

        # ---- 3. Truncation bootstrap: an episode cut off by the time limit did not end, so
        # its last reward also gets gamma * V(final state), the state before the auto-reset
        # (as Stable-Baselines3 does). GAE below still stops at every done, truncated or not:
        # the next observation belongs to a new episode. One batched pass for all envs and
        # steps, then kept only where truncated (no host read, so CUDA stays sync-free).
        with torch.no_grad():
            final_values = agent.value(final_obs.reshape(-1, OBS_DIM)).reshape(shape)
            rewards += torch.where(truncateds, cfg.gamma * final_values, 0.0)

        # ---- 4. GAE(lambda): advantages and returns, bootstrapped from V(next_obs).
        with torch.no_grad():
            next_value = agent.value(next_obs)
            advantages = torch.zeros_like(rewards)
            last_gae = torch.zeros(cfg.num_envs, device=device)
            for t in reversed(range(cfg.num_steps)):
                if t == cfg.num_steps - 1:
                    next_nonterminal, next_values = 1.0 - next_done, next_value
                else:
                    next_nonterminal, next_values = 1.0 - dones[t + 1], values[t + 1]
                delta = rewards[t] + cfg.gamma * next_values * next_nonterminal - values[t]
                last_gae = delta + cfg.gamma * cfg.gae_lambda * next_nonterminal * last_gae
                advantages[t] = last_gae
            returns = advantages + values

        # Flatten the rollout into one batch.
        b_obs = obs.reshape(-1, OBS_DIM)
        b_actions = actions.reshape(-1)
        b_logprobs = logprobs.reshape(-1)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)

        # ---- 5. Optimise: update_epochs passes over shuffled minibatches.
        loss_scale = 1.0
        if cfg.explode_at is not None and update >= cfg.explode_at:
            loss_scale = min(cfg.explode_growth ** (update - cfg.explode_at + 1),
                             EXPLODE_MAX_SCALE)
        for epoch in range(cfg.update_epochs):
            order = torch.randperm(cfg.batch_size, device=device)
            for first in range(0, cfg.batch_size, cfg.minibatch_size):
                mb = order[first:first + cfg.minibatch_size]
                _, new_logprob, entropy, new_value = agent.act(b_obs[mb], b_actions[mb])
                log_ratio = new_logprob - b_logprobs[mb]
                ratio = log_ratio.exp()

                with torch.no_grad():
                    # KL estimator (r - 1) - log r (Schulman), and how often clipping bit.
                    stats.add("approx_kl", ((ratio - 1) - log_ratio).mean())
                    stats.add("clip_fraction",
                              ((ratio - 1.0).abs() > cfg.clip_coef).float().mean())
                    stats.add("ratio_min", ratio.min(), "min")
                    stats.add("ratio_max", ratio.max(), "max")

                mb_adv = b_advantages[mb]
                if cfg.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)

                # Clipped surrogate objective (as a loss: the max of the two negatives).
                pg_loss = torch.max(
                    -mb_adv * ratio,
                    -mb_adv * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef),
                ).mean()

                # Value loss, clipped around the rollout's value estimates.
                if cfg.clip_vloss:
                    v_unclipped = (new_value - b_returns[mb]).square()
                    v_clipped = b_values[mb] + torch.clamp(
                        new_value - b_values[mb], -cfg.clip_coef, cfg.clip_coef)
                    v_loss = 0.5 * torch.max(v_unclipped,
                                             (v_clipped - b_returns[mb]).square()).mean()
                else:
                    v_loss = 0.5 * (new_value - b_returns[mb]).square().mean()

                # Entropy bonus keeps the policy exploring.
                entropy_mean = entropy.mean()
                loss = pg_loss - cfg.ent_coef * entropy_mean + cfg.vf_coef * v_loss

                optimizer.zero_grad(set_to_none=True)
                (loss * loss_scale).backward()
                poisoned = cfg.inject_nan_at == update and epoch == 0 and first == 0
                if poisoned:
                    poison_target.grad.view(-1)[0] = float("nan")
                # Clip (one norm pass) and record pre/post-clip norms without a host read.
                stats.clip(params, cfg.max_grad_norm)
                if not poisoned:
                    optimizer.step()

                stats.add("policy_loss", pg_loss.detach())
                stats.add("value_loss", v_loss.detach())
                stats.add("entropy", entropy_mean.detach())

        # ---- 6. Telemetry: rollout statistics, then ONE host read for the whole update.
        with torch.no_grad():
            var_returns = b_returns.var()
            stats.add("var_returns", var_returns)
            stats.add("explained_variance", 1.0 - (b_returns - b_values).var() / var_returns)
            stats.add("advantage_mean", b_advantages.mean())
            stats.add("advantage_std", b_advantages.std())
            stats.add("episode_return_sum", episode_return_sum, "sum")
            stats.add("episode_length_sum", episode_length_sum, "sum")
            stats.add("episodes", episodes, "sum")
        s = stats.resolve()  # on CUDA: the update's single synchronisation
        elapsed = time.perf_counter() - t_start

        n_episodes = int(s["episodes"])
        fields: dict[str, Any] = {
            "update": update,
            "env_steps": env_steps,
            "grad_norm": s["grad_norm"],
            "pre_clip_grad_norm": s["pre_clip_grad_norm"],
            "pre_clip_grad_norm_max": s["pre_clip_grad_norm_max"],
            "max_grad_norm": float(cfg.max_grad_norm),
            "policy_loss": s["policy_loss"],
            "value_loss": s["value_loss"],
            "entropy": s["entropy"],
            "approx_kl": s["approx_kl"],
            "clip_fraction": s["clip_fraction"],
            "lr": lr,
            # explained variance is undefined (not 0) when the returns have no variance.
            "explained_variance": s["explained_variance"] if s["var_returns"] != 0 else None,
            "episode_return_mean": s["episode_return_sum"] / n_episodes if n_episodes else None,
            "episode_length_mean": s["episode_length_sum"] / n_episodes if n_episodes else None,
            "sps": cfg.batch_size / elapsed,
            "update_time_ms": elapsed * 1e3,
            "nonfinite_grad_count": int(s["nonfinite_grad_count"]),
            "ratio_min": s["ratio_min"],
            "ratio_max": s["ratio_max"],
            "advantage_mean": s["advantage_mean"],
            "advantage_std": s["advantage_std"],
        }
        if on_update is not None:
            on_update(dict(fields))
        if emitter is not None:
            emitter.emit_ppo_update(**fields)
        last = fields
    return last
