"""CartPole-v1 as batched torch tensor ops: M environments stepped at once, no gym.

Why not gym: the reference worker must run anywhere torch runs (and on the GPU when there
is one) without a simulator dependency, and stepping M environments as a handful of tensor
ops is faster than M Python ``env.step`` calls. The dynamics, thresholds, reward and
initial-state distribution follow Gym/Gymnasium's CartPole-v1 (Barto, Sutton & Anderson,
1983; explicit Euler integration at tau = 0.02 s):

* observation ``[x, x_dot, theta, theta_dot]``; actions 0 (push left) and 1 (push right);
* reward 1.0 on every step, the terminating one included;
* terminated when ``|x| > 2.4`` or ``|theta| > 12 degrees``; truncated after 500 steps;
* start state uniform in [-0.05, 0.05]^4.

Environments reset automatically: the observation returned for an environment whose
episode just ended is the first observation of its next episode (as gym's vector envs do),
and :class:`StepResult` carries the finished episode's return and length and its *final*
observation (gymnasium's ``final_observation``, SB3's ``terminal_observation``): a learner
needs it to bootstrap ``V(final observation)`` for an episode that was cut off by the time
limit rather than ended by falling over. Nothing here reads a tensor on the host, so stepping
on CUDA never synchronises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

GRAVITY = 9.8
MASS_CART = 1.0
MASS_POLE = 0.1
TOTAL_MASS = MASS_CART + MASS_POLE
HALF_POLE_LENGTH = 0.5
POLE_MASS_LENGTH = MASS_POLE * HALF_POLE_LENGTH
FORCE_MAG = 10.0
TAU = 0.02
THETA_THRESHOLD = 12 * 2 * math.pi / 360
X_THRESHOLD = 2.4
MAX_EPISODE_STEPS = 500
OBS_DIM = 4
NUM_ACTIONS = 2


@dataclass(frozen=True, slots=True)
class StepResult:
    """One batched step. ``obs`` is already reset where ``done``; ``final_obs`` is the state
    the step reached before that reset (equal to ``obs`` where not ``done``), so a truncated
    episode's last state can still be valued; ``episode_return`` and ``episode_length`` hold
    the finished episode's totals where ``done`` and 0 elsewhere."""

    obs: Tensor
    final_obs: Tensor
    reward: Tensor
    terminated: Tensor
    truncated: Tensor
    done: Tensor
    episode_return: Tensor
    episode_length: Tensor


class CartPole:
    """M independent CartPole-v1 environments on one device.

    ``seed`` seeds this instance's own generator (initial states), so workers with
    different seeds see different episodes and a seed reproduces a run.
    """

    def __init__(self, num_envs: int, *, seed: int = 0, device: torch.device | str = "cpu",
                 max_episode_steps: int = MAX_EPISODE_STEPS) -> None:
        if num_envs <= 0:
            raise ValueError(f"num_envs must be > 0, got {num_envs}")
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.max_episode_steps = max_episode_steps
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(seed)
        self.state = torch.zeros(num_envs, OBS_DIM, device=self.device)
        self.steps = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.returns = torch.zeros(num_envs, device=self.device)

    def _initial_states(self, n: int) -> Tensor:
        return torch.rand(n, OBS_DIM, generator=self._gen, device=self.device) * 0.1 - 0.05

    def reset(self) -> Tensor:
        """Start a fresh episode in every environment; returns the observations (M, 4)."""
        self.state = self._initial_states(self.num_envs)
        self.steps.zero_()
        self.returns.zero_()
        return self.state.clone()

    @torch.no_grad()
    def step(self, action: Tensor) -> StepResult:
        """Advance every environment by one step with ``action`` (M,) in {0, 1}."""
        x, x_dot, theta, theta_dot = self.state.unbind(1)
        force = torch.where(action.to(self.device) == 1, FORCE_MAG, -FORCE_MAG)
        cos_t, sin_t = torch.cos(theta), torch.sin(theta)
        temp = (force + POLE_MASS_LENGTH * theta_dot.square() * sin_t) / TOTAL_MASS
        theta_acc = (GRAVITY * sin_t - cos_t * temp) / (
            HALF_POLE_LENGTH * (4.0 / 3.0 - MASS_POLE * cos_t.square() / TOTAL_MASS))
        x_acc = temp - POLE_MASS_LENGTH * theta_acc * cos_t / TOTAL_MASS
        # Explicit Euler, in gym's order: positions use the old velocities.
        state = torch.stack([x + TAU * x_dot, x_dot + TAU * x_acc,
                             theta + TAU * theta_dot, theta_dot + TAU * theta_acc], dim=1)

        reward = torch.ones(self.num_envs, device=self.device)
        self.steps += 1
        self.returns += reward
        terminated = (state[:, 0].abs() > X_THRESHOLD) | (state[:, 2].abs() > THETA_THRESHOLD)
        truncated = (self.steps >= self.max_episode_steps) & ~terminated
        done = terminated | truncated

        episode_return = torch.where(done, self.returns, 0.0)
        episode_length = torch.where(done, self.steps, 0)
        # Auto-reset: draw fresh start states for every env (cheap) and keep the done ones.
        # torch.where makes a new tensor, so ``state`` stays the pre-reset (final) state.
        next_state = torch.where(done.unsqueeze(1), self._initial_states(self.num_envs), state)
        self.state = next_state
        self.steps = torch.where(done, 0, self.steps)
        self.returns = torch.where(done, 0.0, self.returns)
        return StepResult(obs=next_state.clone(), final_obs=state, reward=reward,
                          terminated=terminated, truncated=truncated, done=done,
                          episode_return=episode_return, episode_length=episode_length)
