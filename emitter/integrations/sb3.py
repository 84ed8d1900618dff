"""stable-baselines3 -> trainbus: one ``ppo_update`` event per SB3 PPO update.

Two lines in an SB3 script::

    from emitter.integrations.sb3 import TrainbusCallback
    model.learn(total_timesteps, callback=TrainbusCallback(run="cartpole-sb3"))

Supported: ``stable_baselines3.PPO`` and sb3-contrib's ``MaskablePPO`` and ``RecurrentPPO``
(and subclasses of them), whose ``train()`` is the same minibatch loop: zero_grad, backward,
``clip_grad_norm_``, ``optimizer.step()``, the same logger keys, ``_n_updates`` counting
epochs, and ``target_kl`` early stopping *before* a minibatch's backward. Anything else (A2C,
TRPO, SAC, DQN, ...) is refused with a ``TypeError`` when ``learn()`` starts, because the
fields below would not mean what the protocol says.

**Gradient norms, measured without patching torch or SB3.** ``PPO.train()`` calls
``th.nn.utils.clip_grad_norm_`` and throws its result away, so two hooks watch instead:

* a multi-gradient hook (``torch.autograd.graph.register_multi_grad_hook``, mode ``"all"``)
  on the policy's parameters fires once per ``backward()``, after every gradient exists and
  before SB3 clips them. It takes the per-tensor L2 norms with torch's fused foreach kernel
  (the kernel ``clip_grad_norm_`` itself uses) and stacks them, on the gradients' device:
  no ``.item()``, no host read, no second pass;
* an optimizer step pre-hook (``Optimizer.register_step_pre_hook``) fires after clipping,
  just before the step. It files the pending norms as one optimizer step, so a backward that
  no step follows is never counted.

Nothing else happens per minibatch. When the update is complete, one vectorised pass turns
the filed norms into the fields and reads them on the host once (one transfer per update on
CUDA, like :meth:`emitter.gradients.UpdateStats.resolve`): the pre-clip norm is the float32
combination of the per-tensor norms, exactly the number ``clip_grad_norm_`` returned (the
tests check it bit for bit against torch's own return values); the post-clip norm follows
from torch's clip coefficient, ``pre * min(1, max_norm / (pre + 1e-6))``, with no pass over
the gradients (DESIGN.md, "Gradient measurement"). Where the float32 combination is not
finite although each per-tensor norm is, the float64 combination is reported instead (the
right magnitude; torch's coefficient was 0 there, and the post-clip norm says so). Per
update: ``pre_clip_grad_norm`` and ``grad_norm`` are means over the update's optimizer
steps (as the reference worker reduces them) and ``pre_clip_grad_norm_max`` is the largest
pre-clip norm, the one spike a mean hides.

**When an update is complete.** SB3 has no callback after ``train()``. The learn loop is:
rollout (``_on_rollout_start``, ``_on_step`` per env step, ``_on_rollout_end``), log dump,
``train()``, next rollout. ``train()`` records its values in the logger at its end, so the
values of update k are all there at the *next* ``_on_rollout_start`` (and at
``_on_training_end`` for the last update of a ``learn()``), which is where update k is
emitted; at ``_on_rollout_end`` the logger still holds update k-1's values. The rollout's
own facts (``env_steps``, episodes, advantages) are taken at ``_on_rollout_end``, before
``train()`` starts and before the next rollout resets the buffer.

**SB3's conventions converted** (the README's field table is the contract):

===============================  =============================================================
protocol field                   from
===============================  =============================================================
``update``                       PPO updates (``train()`` calls), counted here; SB3's
                                 ``_n_updates`` counts epochs. Continues across ``learn(...,
                                 reset_num_timesteps=False)``; restarts with
                                 ``num_timesteps`` when SB3 resets it
``env_steps``                    ``model.num_timesteps`` after the update's rollout
``grad_norm``                    mean post-clip norm over optimizer steps (measured, above)
``pre_clip_grad_norm``           mean pre-clip norm over optimizer steps (measured, above)
``pre_clip_grad_norm_max``       largest pre-clip norm of the update
``max_grad_norm``                ``model.max_grad_norm``
``policy_loss``                  ``train/policy_gradient_loss`` (same sign: the clipped
                                 surrogate as a loss)
``value_loss``                   ``train/value_loss``: SB3's MSE, mean over minibatches (the
                                 reference worker logs 1/2 MSE, as CleanRL does)
``entropy``                      ``-train/entropy_loss`` (SB3 logs minus the mean entropy)
``approx_kl``                    ``train/approx_kl``: SB3's mean over the *last epoch's*
                                 minibatches only
``clip_fraction``                ``train/clip_fraction`` (mean over all minibatches)
``lr``                           ``train/learning_rate`` (the optimizer's lr as fallback)
``explained_variance``           ``train/explained_variance``; None when the rollout's returns
                                 have no variance (SB3 logs NaN then: undefined, not news)
``episode_return_mean``,         over episodes that *finished during the rollout* (Monitor's
``episode_length_mean``          ``info["episode"]``), None when none did: not SB3's
                                 100-episode ``ep_info_buffer`` window
``advantage_mean``,              over the rollout buffer's GAE advantages before SB3's
``advantage_std``                per-minibatch normalisation
``sps``, ``update_time_ms``      rollout + train wall time of the update
``optimizer_steps`` (extra)      minibatch steps taken (fewer when ``target_kl`` stopped early)
``epochs`` (extra)               epochs started (SB3's ``_n_updates`` increment)
===============================  =============================================================

With ``target_kl``, SB3 breaks out *before* the offending minibatch's backward: the norms
are means over the steps that happened, while SB3's loss, entropy and clip-fraction means
also include that last, not-applied minibatch. Not measured (so absent, never a made-up 0):
``ratio_min``/``ratio_max`` and ``nonfinite_grad_count`` (a NaN gradient still shows as a NaN
norm). An update with no optimizer step at all (``target_kl`` hit on its first minibatch)
reports both norms as 0.0, as applied, with ``optimizer_steps: 0``.

Cost: two hook calls and one foreach norm per minibatch, a few tensor ops and one emit per
update (``make bench``, group ``sb3``: steps/s with the callback vs without). The emitter
never blocks (ZeroMQ NOBLOCK), so a missing or stalled daemon costs training nothing.
Hooks are removed at the end of every ``learn()``, by :meth:`TrainbusCallback.close`, and
when the callback is garbage-collected; the hooks never reference the callback itself.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

try:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("emitter.integrations.sb3 needs stable-baselines3: "
                      "pip install 'trainbus[sb3]'") from exc

from emitter.telemetry import TelemetryEmitter

__all__ = ["TrainbusCallback", "supported_algorithms"]

log = logging.getLogger(__name__)

#: Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does.
EPS = 1e-6
#: sb3-contrib classes whose train() is PPO.train()'s loop (checked in sb3-contrib 2.9.2).
CONTRIB_PPO_VARIANTS = ("MaskablePPO", "RecurrentPPO")
#: Where the update count lives on the model, so that a new callback (or a saved and
#: loaded model: SB3 pickles plain attributes) continues the numbering.
UPDATES_ATTR = "_trainbus_updates"
#: Logger keys read after train(); required ones become NaN (with a warning) if missing.
_LOGGED = ("train/policy_gradient_loss", "train/value_loss", "train/entropy_loss",
           "train/approx_kl", "train/clip_fraction")
_FOREACH_DEVICES = frozenset({"cpu", "cuda"})


def supported_algorithms() -> tuple[type, ...]:
    """PPO, plus sb3-contrib's PPO variants when sb3-contrib is imported (a model of theirs
    can only exist once it is, so it is never imported here)."""
    classes: list[type] = [PPO]
    contrib = sys.modules.get("sb3_contrib")
    if contrib is not None:
        classes += [c for c in (getattr(contrib, n, None) for n in CONTRIB_PPO_VARIANTS)
                    if isinstance(c, type)]
    return tuple(classes)


# ---------------------------------------------------------------------------- gradients


#: Runs a function once the current backward has finished, after every gradient has been
#: accumulated into ``.grad`` (torch's own DistributedDataParallel and FSDP rely on it).
#: Underscored in torch, so looked up defensively; without it, the public
#: ``register_multi_grad_hook`` does the same job at two to several times the Python cost.
_queue_callback: Callable[[Callable[[], None]], None] | None = getattr(
    getattr(torch.autograd.Variable, "_execution_engine", None), "queue_callback", None)


class _GradientProbe:
    """The hooks and what they recorded. Holds no reference to the callback, so the
    callback can be garbage-collected (and remove the hooks) while the model lives on.

    Per backward: a tensor hook on each parameter (a flag check; the first one queues the
    end-of-backward function), then one end-of-backward function that takes the per-tensor
    norms of the accumulated ``.grad``s -- what ``clip_grad_norm_`` is about to read.
    Measured on a loaded 2-core VM with SB3's CartPole policy (12 tensors, ~1.9 ms per
    minibatch step): 15-80 us per minibatch in all across runs, against 140-180 us with
    ``register_multi_grad_hook``, whose Python bookkeeping per tensor (a lock, dicts and an
    engine query on every call) costs more than the norm itself.
    """

    def __init__(self, params: list[Tensor], optimizer: torch.optim.Optimizer, *,
                 use_queue_callback: bool = True) -> None:
        #: Only between a rollout's end and the update's end: a backward through the policy
        #: elsewhere (a user's own code, another callback) is not this update's.
        self.recording = False
        #: Per optimizer step: the stacked per-tensor gradient norms (on the grads' device).
        self.steps: list[Tensor] = []
        self._params = params
        self._pending: Tensor | None = None
        self._queued = False
        first = params[0]
        # Same selection as clip_grad_norm_: foreach kernel on CPU/CUDA, grouped by
        # (device, dtype) in first-seen order; decided once, from the parameters.
        self._foreach = all(p.device.type in _FOREACH_DEVICES for p in params)
        self._grouped = any(p.device != first.device or p.dtype != first.dtype for p in params)
        self._handles: list[Any] = []
        if use_queue_callback and _queue_callback is not None:
            self._handles += [p.register_hook(self._on_gradient) for p in params]
        else:
            self._handles.append(torch.autograd.graph.register_multi_grad_hook(
                params, self._on_all_gradients, mode="all"))
        self._handles.append(optimizer.register_step_pre_hook(self._on_optimizer_step))

    def _on_gradient(self, grad: Tensor) -> None:
        """A parameter's gradient is being computed: have the norms taken once backward is
        done (once per backward, whichever parameter comes first)."""
        if self.recording and not self._queued:
            self._queued = True
            assert _queue_callback is not None
            _queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        """Backward is done, SB3 has not clipped yet: per-tensor norms, left on the device."""
        self._queued = False
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            self._pending = self._norms(grads)

    def _on_all_gradients(self, grads: Sequence[Tensor | None]) -> None:
        """Fallback path (register_multi_grad_hook): the same norms from the hook's grads."""
        if not self.recording:
            return
        present = [g for g in grads if g is not None]
        if present:
            self._pending = self._norms(present)

    def _norms(self, grads: list[Tensor]) -> Tensor:
        if not self._grouped:
            if self._foreach:
                return torch.stack(torch._foreach_norm(grads, 2.0))
            return torch.stack([torch.linalg.vector_norm(g) for g in grads])
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g)
        device = grads[0].device
        norms: list[Tensor] = []
        for (dev, _), group in groups.items():
            if dev.type in _FOREACH_DEVICES:
                norms.extend(torch._foreach_norm(group, 2.0))
            else:
                norms.extend(torch.linalg.vector_norm(g) for g in group)
        return torch.stack([n.to(device) for n in norms])

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After clipping, before the step: the pending backward is being applied."""
        self._queued = False  # (a backward that raised never ran its end function)
        pending = self._pending
        if pending is not None:
            self.steps.append(pending)
            self._pending = None

    def take(self) -> list[Tensor]:
        """The filed steps (and forget them)."""
        steps, self.steps = self.steps, []
        self._pending = None
        self._queued = False
        return steps

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.recording = False
        self.take()


@torch.no_grad()
def _reduce_norms(steps: list[Tensor], max_norm: float
                  ) -> tuple[float, float, float, list[float]]:
    """(mean pre-clip, mean post-clip, max pre-clip, every pre-clip) over an update's
    optimizer steps.

    One vectorised pass and ONE host read for the whole update. The float32 row norm is
    clip_grad_norm_'s total (the same reduction over the same stacked per-tensor norms); its
    clip coefficient is torch's, in float32, so post = pre * coef needs no pass over the
    gradients.
    """
    if len({s.shape for s in steps}) == 1:
        stacked = torch.stack(steps)
        total = torch.linalg.vector_norm(stacked, dim=1)
        safe = torch.linalg.vector_norm(stacked.to(torch.float64), dim=1)
    else:  # a parameter without a gradient in some minibatch: rows of different lengths
        total = torch.stack([torch.linalg.vector_norm(s) for s in steps])
        safe = torch.stack([torch.linalg.vector_norm(s.to(torch.float64)) for s in steps])
    coef = torch.clamp(max_norm / (total + EPS), max=1.0)
    pre = torch.where(torch.isfinite(total), total.to(torch.float64), safe)
    post = pre * coef.to(torch.float64)
    host = torch.cat([torch.stack([pre.mean(), post.mean(), pre.max()]), pre]).tolist()
    return host[0], host[1], host[2], host[3:]


# ---------------------------------------------------------------------------- callback


@dataclass
class _Rollout:
    """What the update in flight knew at its rollout's end."""

    t_start: float
    steps_at_start: int
    env_steps: int
    epochs_before: int
    episodes: int
    episode_return_sum: float
    episode_length_sum: float
    advantage_mean: float | None
    advantage_std: float | None
    returns_vary: bool


class TrainbusCallback(BaseCallback):
    """Publishes one ``ppo_update`` per PPO update of ``model.learn(...)``.

    ``run``, ``worker``, ``publish`` and ``emitter_kwargs`` go to
    :class:`emitter.telemetry.TelemetryEmitter` (left out, they come from the environment:
    ``TRAINBUS_RUN``, ``RANK``, ``TRAINBUS_PUBLISH``). Or pass ``emitter=`` to publish
    through one you own (this callback then never closes it). The callback can serve
    several ``learn()`` calls; :meth:`close` (or leaving a ``with`` block, or garbage
    collection) closes the emitter it created.
    """

    def __init__(self, run: str | None = None, worker: int | None = None,
                 publish: str | None = None, *, emitter: TelemetryEmitter | None = None,
                 verbose: int = 0, **emitter_kwargs: Any) -> None:
        super().__init__(verbose)
        if emitter is not None:
            if run is not None or worker is not None or publish is not None or emitter_kwargs:
                raise ValueError("TrainbusCallback: pass either emitter= or the emitter's "
                                 "arguments (run, worker, publish, ...), not both")
            self.emitter = emitter
            self._owns_emitter = False
        else:
            self.emitter = TelemetryEmitter(run, worker, publish, **emitter_kwargs)
            self._owns_emitter = True
        self._probe: _GradientProbe | None = None
        self._rollout: _Rollout | None = None
        self._update = 0
        self._t_start = 0.0
        self._steps_at_start = 0
        self._episodes = 0
        self._episode_return_sum = 0.0
        self._episode_length_sum = 0.0
        self._warned_missing: set[str] = set()
        self._closed = False
        #: The fields of the last emitted update (a copy of what went on the wire).
        self.last_fields: dict[str, Any] | None = None
        #: The last emitted update's pre-clip norm of every optimizer step, in order (they
        #: came to the host with the update's one transfer anyway).
        self.last_pre_clip_norms: list[float] = []
        #: Updates emitted by this callback (across learn() calls).
        self.updates_emitted = 0

    # ------------------------------------------------------------------ SB3 events

    def _init_callback(self) -> None:
        """At every ``learn()``: check the algorithm, (re)attach the hooks, and find where
        the update numbering stands."""
        model = self.model
        supported = supported_algorithms()
        if not isinstance(model, supported):
            raise TypeError(
                "TrainbusCallback supports PPO and sb3-contrib's MaskablePPO and RecurrentPPO, "
                "whose train() is SB3's PPO minibatch loop; got "
                f"{type(model).__module__}.{type(model).__name__}. Other "
                f"train() is SB3's PPO minibatch loop; got {type(model).__name__}. Other "
                "algorithms log different things (no clip fraction or approx KL, another "
                "gradient step); publish them with TelemetryEmitter directly.")
        if self._closed:
            raise RuntimeError("TrainbusCallback is closed; create a new one")
        self._detach()
        params = [p for p in model.policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("TrainbusCallback: the policy has no trainable parameters")
        self._probe = _GradientProbe(params, model.policy.optimizer)
        self._rollout = None
        if model.num_timesteps == 0:  # a new model, or learn(reset_num_timesteps=True)
            self._update = 0
        else:
            known = getattr(model, UPDATES_ATTR, None)
            if isinstance(known, int):
                self._update = known
            else:  # trained before without trainbus: every update consumes one full rollout
                self._update = model.num_timesteps // (model.n_steps * model.n_envs)
        setattr(model, UPDATES_ATTR, self._update)

    def _on_rollout_start(self) -> None:
        self._finish_update()
        self._t_start = time.perf_counter()
        self._steps_at_start = self.model.num_timesteps
        self._episodes = 0
        self._episode_return_sum = 0.0
        self._episode_length_sum = 0.0

    def _on_step(self) -> bool:
        # Monitor's info["episode"] marks an episode that just finished (what SB3 puts in
        # ep_info_buffer): summed here so the mean covers exactly this rollout's episodes.
        for info in self.locals.get("infos", ()):
            episode = info.get("episode")
            if episode is not None:
                self._episodes += 1
                self._episode_return_sum += episode["r"]
                self._episode_length_sum += episode["l"]
        return True

    def _on_rollout_end(self) -> None:
        model = self.model
        adv_mean = adv_std = None
        returns_vary = True
        buffer = getattr(model, "rollout_buffer", None)
        advantages = getattr(buffer, "advantages", None)
        if isinstance(advantages, np.ndarray) and advantages.size > 1:
            adv_mean = float(advantages.mean())
            adv_std = float(advantages.std(ddof=1))
        returns = getattr(buffer, "returns", None)
        if isinstance(returns, np.ndarray) and returns.size:
            returns_vary = bool(returns.var() != 0)
        self._rollout = _Rollout(
            t_start=self._t_start, steps_at_start=self._steps_at_start,
            env_steps=model.num_timesteps, epochs_before=model._n_updates,
            episodes=self._episodes, episode_return_sum=self._episode_return_sum,
            episode_length_sum=self._episode_length_sum, advantage_mean=adv_mean,
            advantage_std=adv_std, returns_vary=returns_vary)
        if self._probe is not None:
            self._probe.take()
            self._probe.recording = True

    def _on_training_end(self) -> None:
        self._finish_update()
        self._detach()

    # ------------------------------------------------------------------ the update

    def _finish_update(self) -> None:
        """Emit the update in flight, if train() ran since its rollout ended."""
        rollout, self._rollout = self._rollout, None
        probe = self._probe
        steps: list[Tensor] = []
        if probe is not None:
            probe.recording = False
            steps = probe.take()
        if rollout is None:
            return
        model = self.model
        epochs = model._n_updates - rollout.epochs_before
        if epochs <= 0:
            return  # no train() after this rollout (learn() was stopped): nothing to report
        elapsed = time.perf_counter() - rollout.t_start
        max_norm = float(model.max_grad_norm)
        if steps:
            pre, post, pre_max, self.last_pre_clip_norms = _reduce_norms(steps, max_norm)
        else:  # target_kl stopped before the first step: nothing was applied
            pre, post, pre_max, self.last_pre_clip_norms = 0.0, 0.0, None, []
        logged = model.logger.name_to_value  # a defaultdict: .get() never invents a 0
        lr = logged.get("train/learning_rate")
        if lr is None:
            lr = model.policy.optimizer.param_groups[0]["lr"]
        ev = logged.get("train/explained_variance")
        if ev is not None:
            ev = float(ev)
            if math.isnan(ev) and not rollout.returns_vary:
                ev = None  # undefined (SB3 logs NaN), not a NaN to alert on
        self._update += 1
        setattr(model, UPDATES_ATTR, self._update)
        n = rollout.episodes
        steps_done = rollout.env_steps - rollout.steps_at_start
        fields: dict[str, Any] = {
            "update": self._update,
            "env_steps": int(rollout.env_steps),
            "grad_norm": post,
            "pre_clip_grad_norm": pre,
            "pre_clip_grad_norm_max": pre_max,
            "max_grad_norm": max_norm,
            "policy_loss": self._logged(logged, "train/policy_gradient_loss"),
            "value_loss": self._logged(logged, "train/value_loss"),
            "entropy": -self._logged(logged, "train/entropy_loss"),
            "approx_kl": self._logged(logged, "train/approx_kl"),
            "clip_fraction": self._logged(logged, "train/clip_fraction"),
            "lr": float(lr),
            "explained_variance": ev,
            "episode_return_mean": rollout.episode_return_sum / n if n else None,
            "episode_length_mean": rollout.episode_length_sum / n if n else None,
            "sps": steps_done / elapsed if elapsed > 0 else None,
            "update_time_ms": elapsed * 1e3,
            "advantage_mean": rollout.advantage_mean,
            "advantage_std": rollout.advantage_std,
            "optimizer_steps": len(steps),
            "epochs": int(epochs),
        }
        self.last_fields = dict(fields)
        self.emitter.emit_ppo_update(**fields)
        self.updates_emitted += 1

    def _logged(self, logged: Any, key: str) -> float:
        value = logged.get(key)
        if value is None:
            if key not in self._warned_missing:
                self._warned_missing.add(key)
                log.warning("TrainbusCallback: SB3's logger has no %r after train() "
                            "(another callback dumped it first?); sending NaN", key)
            return math.nan
        return float(value)

    # ------------------------------------------------------------------ lifecycle

    @property
    def hooks_attached(self) -> bool:
        """True while the gradient hooks are registered (during ``learn()``)."""
        return self._probe is not None and self._probe.attached

    def _detach(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.remove()

    def close(self) -> None:
        """Remove the hooks (if a ``learn()`` was interrupted by an exception) and close the
        emitter this callback created (sending its closing heartbeat)."""
        self._detach()
        if self._closed:
            return
        self._closed = True
        if self._owns_emitter:
            self.emitter.close()

    def __enter__(self) -> TrainbusCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to tell anyone
            pass
