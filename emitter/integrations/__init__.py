"""Adapters that make training code people already run publish ``ppo_update`` events.

Each adapter lives in its own module and imports its framework at import time, so this
package itself imports nothing heavy: ``import emitter.integrations`` works without
stable-baselines3, and only ``emitter.integrations.sb3`` needs it (``pip install
'trainbus[sb3]'``). Adapters build on :mod:`emitter` and :mod:`bus` only, never on
:mod:`consumers`.

* :mod:`emitter.integrations.sb3` -- :class:`~emitter.integrations.sb3.TrainbusCallback`,
  a stable-baselines3 callback for PPO (and sb3-contrib's MaskablePPO and RecurrentPPO).
"""

from __future__ import annotations

__all__: list[str] = []
