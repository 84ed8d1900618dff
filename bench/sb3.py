"""stable-baselines3 PPO steps/s with :class:`TrainbusCallback` vs without (CartPole-v1).

Why this shape: the callback's cost is a few tens of microseconds per minibatch against a
~0.5 s update, while separate runs on a shared 2-core box differ by several percent. So two
identical models (same seed, SB3's default PPO hyperparameters except ``n_steps``, one
env, 1 torch thread) are trained in alternating one-update chunks
(``learn(n_steps, reset_num_timesteps=False)``), one with the callback (publishing through a
running daemon to a draining subscriber) and one without, the order inside each pair drawn
at random. The hooks change no number, so both models do the same work chunk after chunk
and each pair is a like-for-like comparison under the same momentary load. The first pair
is warm-up.

The figure is the median over pairs of (steps/s with the callback) / (steps/s without),
each pair's two chunks being adjacent in time and identical in work, so a burst of load
from the neighbours cancels within a pair instead of landing on one side of a ratio of
medians (on the project's loaded 2-core VM that ratio of medians swung 0.90-1.14 between
runs, the median pair ratio 0.95-1.00). Times are the process's CPU time
(``time.process_time``: the training thread plus the emitter's heartbeat and ZeroMQ I/O
threads, so every cycle the callback adds is counted), because wall time on a shared box
mostly measures the neighbours; with one torch thread on an idle machine the two agree.
The row's value is that ratio against a baseline of 1 (no callback); the note gives the
absolute medians and the wall-clock figure.
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

RUN = "sb3bench"
NAME = "SB3 PPO steps/s, TrainbusCallback on / off"
TARGET = 0.97
#: SB3's PPO defaults (batch 64, 10 epochs) with a shorter rollout: 80 minibatch steps per
#: 512 env steps keeps the optimisation phase, where the hooks run, as heavy relative to the
#: rollout as SB3's default (320 per 2048), in a quarter of the time.
N_STEPS = 512


def _make(seed: int) -> Any:
    from stable_baselines3 import PPO

    return PPO("MlpPolicy", "CartPole-v1", n_steps=N_STEPS, seed=seed, device="cpu")


def run(quick: bool = False) -> list[Row]:
    try:
        import torch  # noqa: F401  (the set-up needs it: unavailable row otherwise)

        from emitter.integrations.sb3 import TrainbusCallback
    except ImportError as exc:
        return [unavailable(NAME, "x", f">= {TARGET}x",
                            f"stable-baselines3 is not installed ({exc}); pip install "
                            "'trainbus[sb3]'")]

    pairs = 3 if quick else 16
    on_times: list[float] = []  # CPU seconds per chunk
    off_times: list[float] = []
    on_wall: list[float] = []
    off_wall: list[float] = []
    with emitter_into_daemon(RUN) as sink:
        callback = TrainbusCallback(emitter=sink.emitter)
        models = {True: _make(1), False: _make(1)}
        rng = random.Random(7)
        for pair in range(pairs + 1):  # pair 0 is warm-up
            order = [True, False]
            rng.shuffle(order)
            for on in order:
                c0, t0 = time.process_time(), time.perf_counter()
                models[on].learn(N_STEPS, callback=callback if on else None,
                                 reset_num_timesteps=False)
                cpu, wall = time.process_time() - c0, time.perf_counter() - t0
                if pair:
                    (on_times if on else off_times).append(cpu)
                    (on_wall if on else off_wall).append(wall)
        callback.close()
        same = models[True].num_timesteps == models[False].num_timesteps
    sent, seen = sink.sent, sink.seen

    ratios = sorted(off / on for on, off in zip(on_times, off_times, strict=True))
    wall_ratios = [off / on for on, off in zip(on_wall, off_wall, strict=True)]
    ratio = median(ratios)
    return [ratio_row(
        NAME, ratio, "x", "no callback", 1.0, min_ratio=TARGET,
        note=f"median over {len(ratios)} pairs of (steps/s on) / (steps/s off), CPU time; "
             f"CartPole-v1, PPO defaults but n_steps={N_STEPS} (80 minibatch steps per "
             f"update), 1 torch thread, one-update learn() chunks interleaved; pair ratios "
             f"{ratios[0]:.3f}..{ratios[-1]:.3f}; median chunk CPU time "
             f"{median(on_times) * 1e3:.0f} ms on ({N_STEPS / median(on_times):.0f} steps/s) "
             f"vs {median(off_times) * 1e3:.0f} ms off ({N_STEPS / median(off_times):.0f} "
             f"steps/s); wall clock: median pair ratio {median(wall_ratios):.3f}x; "
             f"{'same' if same else 'DIFFERENT'} num_timesteps on both sides; subscriber "
             f"received {seen['received']} of {sent} events")]
