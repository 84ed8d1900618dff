"""Who is publishing: run name, worker id and node, from arguments or the launcher's env.

A training script started by a launcher already knows its place in the job; making the user
copy it into ``TelemetryEmitter(run=..., worker=...)`` by hand on every rank is how ranks end
up publishing over each other. So, when the caller leaves them out:

========================  ==========================  ===============================
what                      variable                    set by
========================  ==========================  ===============================
worker id                 ``RANK``                    torchrun, Ray Train (global rank)
run name                  ``TRAINBUS_RUN``            you (any launcher, any machine)
run name (fallback)       ``TORCHELASTIC_RUN_ID``     torchrun: the rendezvous id, the same
                                                      on every rank and node of one job
node (heartbeats)         ``GROUP_RANK``              torchrun (the node's index)
node (fallback)           ``NODE_RANK``               Ray Train
========================  ==========================  ===============================

With none of them a process is worker 0 of a generated run (``run-<date>-<time>-<hex>``),
generated once per process and logged once, so one process's emitters agree with each
other. Ray Train sets no shared job id: give every rank ``TRAINBUS_RUN`` (for instance via
the ``runtime_env``'s ``env_vars``), or each rank gets a run of its own.

Names (passed or from the environment) are *sanitised* into the protocol's alphabet
``[A-Za-z0-9._-]{1,64}`` — other characters become ``-``, the rest is cut at 64, an empty
result is replaced by a generated name — with one warning: an environment id such as
``ALE/Breakout-v5`` is a perfectly good thing to name a run after, and an exception from a
telemetry constructor must not stop a training job. A worker id is different: a ``RANK``
that is not a non-negative integer means the launcher set-up is wrong, so it is a clear
error at construction, before training starts. A bad ``GROUP_RANK``/``NODE_RANK`` only
costs the heartbeat its ``node`` field (one warning).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from bus import protocol

log = logging.getLogger(__name__)

__all__ = ["Identity", "RunNameWarning", "generated_run_name", "resolve_identity",
           "sanitize_run_name"]

MAX_RUN_LEN = 64
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9._-]")
#: torchrun's ``--rdzv-id`` default: every job started without one shares it.
TORCHRUN_DEFAULT_RUN_ID = "none"

_generated_lock = threading.Lock()
_generated: str | None = None


class RunNameWarning(UserWarning):
    """A run name was changed to fit the protocol (or is a launcher default shared by
    unrelated jobs); training goes on under the name the warning gives."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Where one emitter's events go: ``run`` and ``worker`` make its topics, ``node`` (or
    None) goes into its heartbeats. ``run_source`` and ``worker_source`` say where each
    came from (``"argument"``, a variable's name, ``"generated"``, ``"default"``), for
    logs and error messages."""

    run: str
    worker: int
    node: int | None = None
    run_source: str = "argument"
    worker_source: str = "argument"


def generated_run_name() -> str:
    """This process's generated run name (``run-YYYYmmdd-HHMMSS-xxxx``), made and logged
    on first use only, so every emitter of the process publishes under the same one."""
    global _generated
    with _generated_lock:
        if _generated is None:
            _generated = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
            log.warning("trainbus: no run name given (argument, TRAINBUS_RUN or "
                        "TORCHELASTIC_RUN_ID); publishing as run %r", _generated)
        return _generated


def sanitize_run_name(name: str, *, what: str = "run name", stacklevel: int = 2) -> str:
    """``name`` in the protocol's alphabet ``[A-Za-z0-9._-]{1,64}``: other characters become
    ``-`` and the result is cut at 64 characters; an empty result becomes the process's
    generated name. Warns once (:class:`RunNameWarning`) when anything changed; never raises
    for a string. ``stacklevel`` as in ``warnings.warn`` (2: this function's caller)."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__} {name!r:.40}")
    if protocol.RUN_PATTERN.fullmatch(name):
        return name
    fixed = _NOT_ALLOWED.sub("-", name)[:MAX_RUN_LEN]
    if not fixed:
        fixed = generated_run_name()
    warnings.warn(f"trainbus: {what} {name!r:.80} has characters outside [A-Za-z0-9._-] or is "
                  f"not 1-64 long; publishing as run {fixed!r}", RunNameWarning,
                  stacklevel=stacklevel)
    return fixed


def _non_negative_int(text: str) -> int | None:
    text = text.strip()
    if text.isascii() and text.isdigit():
        return int(text)
    return None


def resolve_identity(run: str | None = None, worker: int | None = None, *,
                     env: Mapping[str, str] | None = None, stacklevel: int = 2) -> Identity:
    """The (run, worker, node) an emitter publishes as: explicit arguments first, then the
    launcher's environment (see the module docstring for which launcher sets what).

    Raises ValueError for a ``RANK`` that is not a non-negative integer, and
    ``bus.protocol.ProtocolError`` for an explicit ``worker`` that is not one (both are
    set-up errors, raised before training starts). Never raises for a run name: it is
    sanitised with one :class:`RunNameWarning`. ``stacklevel`` as in ``warnings.warn`` (2:
    this function's caller; TelemetryEmitter passes 3, the line that created it).
    """
    env = os.environ if env is None else env

    if worker is not None:
        if isinstance(worker, bool) or not isinstance(worker, int) or worker < 0:
            raise protocol.ProtocolError(
                "bad_worker", f"worker must be a non-negative int, got {worker!r}")
        worker_source = "argument"
    elif "RANK" in env:
        rank = _non_negative_int(env["RANK"])
        if rank is None:
            raise ValueError(f"trainbus takes its worker id from RANK (set by torchrun and "
                             f"Ray Train), but RANK={env['RANK']!r} is not a non-negative "
                             f"integer; fix the launcher's environment or pass worker=N")
        worker, worker_source = rank, "RANK"
    else:
        worker, worker_source = 0, "default"

    level = stacklevel + 1
    if run is not None:
        run, run_source = sanitize_run_name(run, stacklevel=level), "argument"
    elif env.get("TRAINBUS_RUN"):
        run = sanitize_run_name(env["TRAINBUS_RUN"], what="TRAINBUS_RUN", stacklevel=level)
        run_source = "TRAINBUS_RUN"
    elif env.get("TORCHELASTIC_RUN_ID"):
        run_id = env["TORCHELASTIC_RUN_ID"]
        if run_id == TORCHRUN_DEFAULT_RUN_ID:
            warnings.warn(f"trainbus: TORCHELASTIC_RUN_ID is torchrun's default "
                          f"{run_id!r} (no --rdzv-id), shared by every such job; publishing "
                          f"as run {run_id!r}. Set TRAINBUS_RUN or torchrun --rdzv-id to "
                          f"tell runs apart", RunNameWarning, stacklevel=stacklevel)
        run = sanitize_run_name(run_id, what="TORCHELASTIC_RUN_ID", stacklevel=level)
        run_source = "TORCHELASTIC_RUN_ID"
    else:
        run, run_source = generated_run_name(), "generated"

    node = None
    for name in ("GROUP_RANK", "NODE_RANK"):
        if name in env:
            node = _non_negative_int(env[name])
            if node is None:
                log.warning("trainbus: %s=%r is not a non-negative integer; heartbeats "
                            "carry no node", name, env[name])
            break
    return Identity(run, worker, node, run_source, worker_source)
