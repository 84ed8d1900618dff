"""``trainbus train``: N reference PPO workers (CartPole-v1), each publishing telemetry.

Usage::

    trainbus train [--publish EP] [--curve-client DIR] [--workers N] [--envs M]
                   [--updates K] [--run NAME] [--seed S] [--max-grad-norm X] [--lr X]
                   [--inject-nan-at U] [--explode-at U] [--explode-growth G]
                   [--device cpu|cuda]

Each worker is its own process (multiprocessing *spawn*: a fresh interpreter, so no
inherited torch threads, ZeroMQ context or locks), with worker id i and seed ``S + i``,
and creates its own :class:`~emitter.telemetry.TelemetryEmitter` (and so its own zmq
Context) inside the child. Workers publish whether or not a daemon is listening: the
emitter never blocks, so start/stop the daemon at will.

Fault drills (what an operator's monitor and alerts should show; see emitter/ppo.py)::

    trainbus train --inject-nan-at 20              # NaN grad norm at update 20, then recovery
    trainbus train --max-grad-norm inf --explode-at 5   # grad_norm past 5 at update 5, 10 at 7
    trainbus train --max-grad-norm inf             # unclipped: past 5 at 6, past 10 at 15
    trainbus train --explode-at 20 --explode-growth 2   # clipped: only the pre-clip norm
                                                   # explodes (the spike rule's drill)

Stopping: Ctrl-C (SIGINT to the foreground group), SIGTERM to this process or its terminal
closing (SIGHUP) stops every worker after its current update (each closes its emitter,
flushing queued events for at most the linger time); a worker still alive after a grace period is killed, so no process
outlives the command. Workers also ask the kernel for SIGTERM if this process dies
(``PR_SET_PDEATHSIG`` on Linux) and check their parent between updates.

Exit status: 0 when every worker finished its updates, 128 + the signal's number after a
stop signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP), 1 when a worker failed.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bus import endpoints, lifecycle, supervise
from bus.cli import (
    UsageError,
    add_publisher_arguments,
    nonneg_int,
    positive_float,
    positive_int,
    run_name,
)

log = logging.getLogger("trainbus.train")

#: Seconds a worker gets to finish its update and flush after being asked to stop.
STOP_GRACE_S = 5.0
#: A worker logs a progress line every this many updates.
PROGRESS_EVERY = 10
_STOP_SIGNALS = lifecycle.STOP_SIGNALS  # Ctrl-C, a supervisor, a closed terminal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``trainbus train`` (the CLI registry calls this only for this command)."""
    add_publisher_arguments(parser)
    parser.add_argument("--workers", type=positive_int, default=1, metavar="N",
                        help="worker processes (default 1)")
    parser.add_argument("--envs", type=positive_int, default=8, metavar="M",
                        help="CartPole environments per worker (default 8)")
    parser.add_argument("--updates", type=nonneg_int, default=0, metavar="K",
                        help="PPO updates per worker; 0 = until stopped, with a constant "
                             "learning rate (default 0)")
    parser.add_argument("--run", type=run_name, metavar="NAME",
                        help="run name in every topic (default cartpole-<4 hex digits>)")
    parser.add_argument("--seed", type=int, default=1, metavar="S",
                        help="base seed; worker i uses S+i (default 1)")
    parser.add_argument("--max-grad-norm", type=positive_float, default=0.5, metavar="X",
                        help="gradient clipping threshold; 'inf' disables clipping (default 0.5)")
    parser.add_argument("--lr", type=positive_float, default=2.5e-3, metavar="X",
                        help="Adam learning rate (default 2.5e-3)")
    parser.add_argument("--inject-nan-at", type=positive_int, metavar="U",
                        help="fault drill: poison one gradient element with NaN at update U")
    parser.add_argument("--explode-at", type=positive_int, metavar="U",
                        help="fault drill: from update U, scale the loss by --explode-growth more "
                             "per update (use with --max-grad-norm inf to see grad_norm pass 5 "
                             "then 10)")
    parser.add_argument("--explode-growth", type=_growth, default=1.15, metavar="G",
                        help="fault drill: per-update growth of --explode-at's loss scale, > 1 "
                             "(default 1.15: a slow climb; 2 doubles the gradients every update, "
                             "a blow-up the pre-clip spike rule sees even under clipping)")
    parser.add_argument("--device", default="cpu", metavar="DEV",
                        help="torch device for the workers, e.g. cpu or cuda (default cpu)")


def _growth(text: str) -> float:
    value = positive_float(text)
    if not value > 1 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite growth factor > 1, got {text!r}")
    return value


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs; pickled to the spawned child."""

    worker: int
    run: str
    publish: str
    curve_client: str | None
    parent_pid: int
    log_level: str
    config: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- worker side


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of one worker process (runs in the spawned child)."""
    stop = lifecycle.StopFlag()  # set from the handler below: no lock (see StopFlag)
    running = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        if not running:
            # Still starting (importing torch takes seconds on a busy machine): nothing is
            # open and nothing needs flushing, so leave now rather than after the import.
            os._exit(0)
        stop.set()

    for signum in _STOP_SIGNALS:
        signal.signal(signum, request_stop)
    # The parent blocked these signals around start(); the mask survives exec. Unblocking
    # now delivers anything that arrived during start-up to the handler above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    supervise.set_parent_death_signal()  # SIGTERM if `trainbus train` dies, even by SIGKILL
    if os.getppid() != spec.parent_pid:  # orphaned before prctl took effect
        return

    logging.basicConfig(level=spec.log_level, stream=sys.stderr,
                        format=f"%(asctime)s trainbus train[{spec.worker}] %(levelname)s %(message)s")
    # This interpreter may lack NumPy, which torch only needs for interop: hush its warning.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch  # imported here so that `trainbus train --help` and the parent stay light

    from emitter.ppo import PPOConfig, train
    from emitter.telemetry import TelemetryEmitter

    torch.set_num_threads(1)  # N workers share few cores; intra-op threads would fight
    cfg = PPOConfig(**spec.config)

    def should_stop() -> bool:
        return stop.is_set() or os.getppid() != spec.parent_pid

    def progress(fields: dict[str, Any]) -> None:
        update = fields["update"]
        if update % PROGRESS_EVERY == 0 or update == 1:
            ret = fields["episode_return_mean"]
            log.info("update %d env_steps %d return %s grad_norm %.3g (pre-clip %.3g) %.0f sps",
                     update, fields["env_steps"], "-" if ret is None else f"{ret:.1f}",
                     fields["grad_norm"], fields["pre_clip_grad_norm"], fields["sps"])

    running = True  # from here on a stop signal finishes the update and closes cleanly
    with TelemetryEmitter(spec.run, spec.worker, spec.publish,
                          curve_client=spec.curve_client) as emitter:
        log.info("worker %d (pid %d) publishing run %s to %s, seed %d",
                 spec.worker, os.getpid(), spec.run, emitter.endpoint, cfg.seed)
        last = train(cfg, emitter, should_stop=should_stop, on_update=progress)
        log.info("worker %d stopped after update %s (%d events sent, %d dropped)",
                 spec.worker, last.get("update", 0), emitter.sent, emitter.dropped)


# ---------------------------------------------------------------------------- parent side


def _check_curve_dir(curve: str | None) -> None:
    if curve is None:
        return
    for name in ("client.key_secret", "server.key"):
        path = Path(curve) / name
        if not path.is_file():
            raise FileNotFoundError(f"CURVE key file not found: {path} "
                                    "(create keys with: trainbus keys init DIR)")


def run(args: argparse.Namespace) -> int:
    """Start the workers, wait for them, stop them all on SIGINT/SIGTERM."""
    run_id = args.run or f"cartpole-{secrets.token_hex(2)}"
    publish = endpoints.resolve("publish", args.publish)
    curve = endpoints.resolve_curve_client(args.curve_client)
    _check_curve_dir(curve)
    if args.device != "cpu" and not args.device.startswith(("cuda", "mps", "xpu")):
        raise UsageError(f"unsupported --device {args.device!r} (use cpu or cuda)")
    log_level = getattr(args, "log_level", "INFO") or "INFO"

    received: list[int] = []
    wake_r, wake_w = os.pipe()  # self-pipe: a signal wakes the wait below at once
    os.set_blocking(wake_w, False)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        try:
            os.write(wake_w, b"x")
        except OSError:
            pass

    previous = {s: signal.signal(s, on_signal) for s in _STOP_SIGNALS}
    ctx = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []
    failed = False
    try:
        for i in range(args.workers):
            config = {
                "seed": args.seed + i, "device": args.device, "num_envs": args.envs,
                "num_updates": args.updates, "learning_rate": args.lr,
                "max_grad_norm": args.max_grad_norm, "inject_nan_at": args.inject_nan_at,
                "explode_at": args.explode_at, "explode_growth": args.explode_growth,
            }
            spec = WorkerSpec(i, run_id, publish, curve, os.getpid(), log_level, config)
            proc = ctx.Process(target=worker_main, args=(spec,), name=f"trainbus-worker-{i}")
            # Block stop signals across start(): the child inherits the mask, so a Ctrl-C
            # during its start-up waits for its handler instead of a traceback mid-import.
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                proc.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            procs.append(proc)
            if received:
                break
        log.info("run %s: %d worker(s) publishing to %s (Ctrl-C to stop)",
                 run_id, len(procs), publish)

        while not received:
            alive = [p for p in procs if p.exitcode is None]
            if not alive:
                break
            ready = multiprocessing.connection.wait([p.sentinel for p in alive] + [wake_r],
                                                    timeout=1.0)
            for p in procs:
                if p.sentinel in ready:
                    p.join(timeout=1.0)
                    if p.exitcode:
                        log.error("%s exited with status %s; stopping the others",
                                  p.name, p.exitcode)
                        failed = True
            if failed:
                break
    finally:
        _stop_all(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(wake_r)
        os.close(wake_w)

    if received:
        return 128 + received[0]  # the shell's convention: 130 SIGINT, 143 SIGTERM
    if failed or any(p.exitcode for p in procs):
        return 1
    return 0


def _stop_all(procs: list[multiprocessing.process.BaseProcess]) -> None:
    """SIGTERM every live worker, wait up to STOP_GRACE_S for all, then SIGKILL the rest."""

    def killing(child: supervise.Stoppable) -> None:
        log.warning("%s did not stop within %.0fs; killing it", child.name, STOP_GRACE_S)

    supervise.stop_all([supervise.MultiprocessingChild(p) for p in procs], STOP_GRACE_S,
                       on_kill=killing)
