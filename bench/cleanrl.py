"""A CleanRL-style PPO loop's steps/s with trainbus telemetry vs without (CartPole-v1).

The loop is the one docs/integrations.md shows (gymnasium CartPole-v1, 4 sync envs, 128
steps, 4 epochs x 4 minibatches, 64x64 MLP), with the telemetry lines behind a per-update
switch: *on* is ``UpdateStats`` per update, ``stats.clip`` in place of
``nn.utils.clip_grad_norm_``, five ``stats.add`` per minibatch and one ``emit_ppo_update``
(to a running daemon with a draining subscriber); *off* is the plain script,
``clip_grad_norm_`` and nothing else. Everything else, the KL and clip-fraction tensors a
CleanRL script computes for its own logging included, runs in both.

Why this shape (as bench/training.py): the difference is tens of microseconds per
minibatch against a ~50-100 ms update, while separate runs on a shared 2-core box differ
by several percent. So one process alternates, each pair of updates drawn on/off in random
order, and compares medians of per-update times. Times are the process's CPU time
(``time.process_time``: the training thread plus the emitter's heartbeat and ZeroMQ I/O
threads, so every cycle telemetry adds is counted), because wall time on a shared box
mostly measures the neighbours; the wall-clock ratio is in the note. The first pair is
warm-up.
"""

from __future__ import annotations

import random
import time
from typing import Any

from bench.common import (
    Row,
    emitter_into_daemon,
    median,
    ratio_row,
    unavailable,
)

RUN = "cleanrlbench"
NAME = "CleanRL-style loop steps/s, telemetry on vs off"
TARGET = 0.97
NUM_ENVS, NUM_STEPS, EPOCHS, MINIBATCHES = 4, 128, 4, 4
MAX_GRAD_NORM, CLIP_COEF = 0.5, 0.2


def _loop(emitter: Any, modes: list[bool]) -> tuple[list[tuple[bool, float, float]], int]:
    """Run ``len(modes)`` PPO updates, telemetry on for update i when ``modes[i]``; return
    (mode, CPU seconds, wall seconds) per update and the env steps done."""
    import gymnasium as gym
    import torch
    from torch import nn
    from torch.distributions import Categorical

    from emitter.gradients import UpdateStats

    torch.manual_seed(1)
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * NUM_ENVS,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs_dim, n_actions = envs.single_observation_space.shape[0], int(envs.single_action_space.n)

    def mlp(out: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                             nn.Linear(64, out))

    actor, critic = mlp(n_actions), mlp(1)
    params = [*actor.parameters(), *critic.parameters()]
    optimizer = torch.optim.Adam(params, lr=2.5e-4, eps=1e-5)

    def act(obs: torch.Tensor, action: torch.Tensor | None = None):
        dist = Categorical(logits=actor(obs))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), critic(obs).squeeze(-1)

    shape = (NUM_STEPS, NUM_ENVS)
    batch = NUM_STEPS * NUM_ENVS
    mb_size = batch // MINIBATCHES
    obs = torch.zeros(*shape, obs_dim)
    actions = torch.zeros(shape, dtype=torch.long)
    logprobs, rewards, dones, values = (torch.zeros(shape) for _ in range(4))
    next_obs = torch.tensor(envs.reset(seed=1)[0], dtype=torch.float32)
    next_done = torch.zeros(NUM_ENVS)
    global_step = 0
    timings: list[tuple[bool, float, float]] = []
    for update, on in enumerate(modes, start=1):
        c0, t0 = time.process_time(), time.perf_counter()
        stats = UpdateStats("cpu") if on else None
        for step in range(NUM_STEPS):
            global_step += NUM_ENVS
            obs[step], dones[step] = next_obs, next_done
            with torch.no_grad():
                action, logprob, _, value = act(next_obs)
            actions[step], logprobs[step], values[step] = action, logprob, value
            next_np, reward, terminated, truncated, _ = envs.step(action.numpy())
            rewards[step] = torch.as_tensor(reward, dtype=torch.float32)
            next_obs = torch.as_tensor(next_np, dtype=torch.float32)
            next_done = torch.as_tensor(terminated | truncated, dtype=torch.float32)
        with torch.no_grad():
            advantages = torch.zeros_like(rewards)
            gae = torch.zeros(NUM_ENVS)
            for t in reversed(range(NUM_STEPS)):
                last = t == NUM_STEPS - 1
                not_done = 1.0 - (next_done if last else dones[t + 1])
                next_value = critic(next_obs).squeeze(-1) if last else values[t + 1]
                delta = rewards[t] + 0.99 * next_value * not_done - values[t]
                gae = delta + 0.99 * 0.95 * not_done * gae
                advantages[t] = gae
            returns = advantages + values
        b_obs, b_actions = obs.reshape(-1, obs_dim), actions.reshape(-1)
        b_logprobs, b_adv, b_returns = (x.reshape(-1) for x in (logprobs, advantages, returns))
        for _epoch in range(EPOCHS):
            order = torch.randperm(batch)
            for start in range(0, batch, mb_size):
                mb = order[start:start + mb_size]
                _, new_logprob, entropy, new_value = act(b_obs[mb], b_actions[mb])
                log_ratio = new_logprob - b_logprobs[mb]
                ratio = log_ratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean()
                    clip_fraction = ((ratio - 1).abs() > CLIP_COEF).float().mean()
                adv = (b_adv[mb] - b_adv[mb].mean()) / (b_adv[mb].std() + 1e-8)
                pg_loss = torch.max(-adv * ratio,
                                    -adv * ratio.clamp(1 - CLIP_COEF, 1 + CLIP_COEF)).mean()
                v_loss = 0.5 * (new_value - b_returns[mb]).square().mean()
                entropy_loss = entropy.mean()
                loss = pg_loss - 0.01 * entropy_loss + 0.5 * v_loss
                optimizer.zero_grad()
                loss.backward()
                if stats is None:
                    nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                    optimizer.step()
                    continue
                stats.clip(params, MAX_GRAD_NORM)
                optimizer.step()
                stats.add("policy_loss", pg_loss.detach())
                stats.add("value_loss", v_loss.detach())
                stats.add("entropy", entropy_loss.detach())
                stats.add("approx_kl", approx_kl)
                stats.add("clip_fraction", clip_fraction)
        if stats is not None:
            emitter.emit_ppo_update(update=update, env_steps=global_step, lr=2.5e-4,
                                    max_grad_norm=MAX_GRAD_NORM, **stats.resolve())
        timings.append((on, time.process_time() - c0, time.perf_counter() - t0))
    envs.close()
    return timings, global_step


def run(quick: bool = False) -> list[Row]:
    try:
        import gymnasium  # noqa: F401
        import torch  # noqa: F401  (the set-up needs it: unavailable row otherwise)
    except ImportError as exc:
        return [unavailable(NAME, "steps/s", f">= {TARGET}x",
                            f"gymnasium/torch not installed ({exc}); pip install "
                            "'trainbus[train,sb3]'")]

    pairs = 6 if quick else 30
    rng = random.Random(7)
    modes: list[bool] = []
    for _ in range(pairs + 1):  # pair 0 is warm-up
        pair = [True, False]
        rng.shuffle(pair)
        modes += pair
    with emitter_into_daemon(RUN) as sink:
        timings, _steps = _loop(sink.emitter, modes)
    sent, seen = sink.sent, sink.seen

    measured = timings[2:]
    on_cpu = [c for on, c, _ in measured if on]
    off_cpu = [c for on, c, _ in measured if not on]
    on_wall = [w for on, _, w in measured if on]
    off_wall = [w for on, _, w in measured if not on]
    batch = NUM_ENVS * NUM_STEPS
    wall_ratio = median(off_wall) / median(on_wall)
    return [ratio_row(
        NAME, batch / median(on_cpu), "steps/s", "telemetry off", batch / median(off_cpu),
        min_ratio=TARGET,
        note=f"docs/integrations.md's loop: CartPole-v1, {NUM_ENVS} envs x {NUM_STEPS} steps, "
             f"{EPOCHS}x{MINIBATCHES} minibatches, 1 thread; {len(on_cpu)} on / "
             f"{len(off_cpu)} off updates interleaved in random pairs; CPU-time medians "
             f"{median(on_cpu) * 1e3:.1f} vs {median(off_cpu) * 1e3:.1f} ms; wall-clock "
             f"ratio {wall_ratio:.3f}x ({median(on_wall) * 1e3:.1f} vs "
             f"{median(off_wall) * 1e3:.1f} ms); subscriber received {seen['received']} "
             f"of {sent} events")]
