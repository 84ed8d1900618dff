"""``trainbus publish``: synthetic ppo_update streams, for demos, smoke tests and machines
without torch.

Each pattern tells one story an operator should recognise on the monitor:

* ``healthy`` — post-clip grad norm wandering in 0.3..2, KL and clip fraction low.
* ``rising``  — grad norm climbing steadily from ~1 past 5 (warning) and 10 (critical).
* ``explode`` — healthy for 20 updates, then growing ~25 % per update (critical in ~10).
* ``nan``     — healthy until update 20, then NaN gradients from there on.

Events are ordinary protocol-v1 events sent through :class:`bus.publisher.EventPublisher`:
one session per (run, worker), ``seq`` per type, heartbeats every 2 s. Two options shape
the fleet rather than the story:

* ``--worker-offset K`` numbers the workers K, K+1, ..., so several publishers (each one
  process, one core) can simulate one big run together without their streams colliding.
* ``--restart-every N`` makes every worker restart after each N of its updates, as a
  preempted or crashed-and-requeued worker does: a new session, ``seq`` from 0 again, no
  closing heartbeat from the old one, and ``update`` carrying on from where it was (it
  resumed from its checkpoint). Consumers must count that as a restart, not as loss, and
  their memory must not keep every session ever seen: ``make bench``'s memory group
  drives them with exactly this churn.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
import uuid
from typing import Any

from bus import protocol
from bus.lifecycle import install_stop_handlers
from bus.publisher import EventPublisher

log = logging.getLogger("trainbus.publish")

PATTERNS = ("healthy", "rising", "explode", "nan")
HEARTBEAT_INTERVAL_S = 2.0
STEPS_PER_UPDATE = 2048


def synthetic_update(pattern: str, update: int, rng: random.Random) -> dict[str, Any]:
    """The ppo_update fields of one synthetic update (deterministic for a seeded rng)."""
    progress = min(update / 150.0, 1.0)
    base = 0.8 + 0.4 * math.sin(update / 7.0) + rng.uniform(-0.3, 0.3)
    if pattern == "rising":
        pre = 1.0 + 0.25 * update + rng.uniform(-0.2, 0.2)
    elif pattern == "explode" and update >= 20:
        pre = base * 1.25 ** (update - 19)
    elif pattern == "nan" and update >= 20:
        pre = math.nan
    else:
        pre = base * 2.5
    # Synthetic streams pretend nothing clips (max_grad_norm inf) unless healthy, so the
    # post-clip norm the rules watch follows the story being told.
    max_norm = 0.5 if pattern == "healthy" else math.inf
    post = pre if not math.isfinite(pre) else pre * min(1.0, max_norm / (pre + 1e-6))
    broken = not math.isfinite(pre)
    return {
        "update": update,
        "env_steps": (update + 1) * STEPS_PER_UPDATE,
        "grad_norm": post,
        "pre_clip_grad_norm": pre,
        "max_grad_norm": max_norm,
        "policy_loss": math.nan if broken else -0.02 + rng.uniform(-0.01, 0.01),
        "value_loss": math.nan if broken else 40.0 * (1.0 - progress) + rng.uniform(0, 5),
        "entropy": math.nan if broken else 0.69 - 0.3 * progress + rng.uniform(-0.01, 0.01),
        "approx_kl": math.nan if broken else abs(rng.gauss(0.006, 0.002)),
        "clip_fraction": 0.05 + 0.1 * rng.random(),
        "lr": 2.5e-4 * (1.0 - 0.9 * progress),
        # A healthy critic explains most of the returns within a few dozen updates.
        "explained_variance": min(0.95, 0.2 + 2.0 * progress) + rng.uniform(-0.05, 0.05),
        "episode_return_mean": 20.0 + 480.0 * progress + rng.uniform(-10, 10),
        "episode_length_mean": 20.0 + 480.0 * progress,
        "sps": 5000.0 + rng.uniform(-200, 200),
        "update_time_ms": 400.0 + rng.uniform(-20, 20),
        "nonfinite_grad_count": 1 if broken else 0,
        "synthetic": pattern,
    }


class SyntheticWorker:
    """One simulated worker's identity on the bus: run, worker id, session and per-type seq.

    Why not :meth:`EventPublisher.publish`'s stamping: that gives each (run, worker) one
    session for the life of the process (right for the aggregator and alerting, which never
    restart in place), while a simulated worker must be able to :meth:`restart` with a new
    session and seq from 0 on the same socket, as a requeued worker would after a crash.
    """

    __slots__ = ("run", "worker", "session", "_seq", "sessions")

    def __init__(self, run: str, worker: int) -> None:
        self.run = run
        self.worker = worker
        self.session = ""
        self._seq: dict[str, int] = {}
        #: Sessions this worker has had (1 + restarts).
        self.sessions = 0
        self.restart()

    def restart(self) -> None:
        """Become a new emitter instance: fresh session id, every seq back to 0."""
        self.session = uuid.uuid4().hex[:16]
        self._seq.clear()
        self.sessions += 1

    def frames(self, event_type: str, fields: dict[str, Any]) -> list[bytes]:
        """Both frames of this worker's next event of ``event_type`` (envelope added, the
        type's schema checked: a bad field is a bug here, so it raises ProtocolError)."""
        seq = self._seq.get(event_type, 0)
        payload = dict(fields)
        payload.update(v=protocol.PROTOCOL_VERSION, type=event_type, run=self.run,
                       worker=self.worker, session=self.session, seq=seq, ts=time.time())
        protocol.validate_fields(payload, event_type)
        self._seq[event_type] = seq + 1
        return [protocol.make_topic(event_type, self.run, self.worker), protocol.pack(payload)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bus.cli import add_publisher_arguments, nonneg_int, positive_float, positive_int, run_name

    add_publisher_arguments(parser)
    parser.add_argument("--run", type=run_name, default=None,
                        help="run name (default: synthetic-<4 hex>)")
    parser.add_argument("--workers", type=positive_int, default=1, help="workers to simulate (default 1)")
    parser.add_argument("--worker-offset", metavar="K", type=nonneg_int, default=0,
                        help="number the workers K, K+1, ... so several publishers can simulate "
                             "one big run together (default 0)")
    parser.add_argument("--restart-every", metavar="N", type=nonneg_int, default=0,
                        help="restart each worker after every N of its updates: new session, "
                             "seq from 0, update carries on (default 0: never)")
    parser.add_argument("--rate", type=positive_float, default=10.0,
                        help="updates per second per worker (default 10)")
    parser.add_argument("--count", type=nonneg_int, default=0,
                        help="updates per worker, then exit (default 0: until Ctrl-C)")
    parser.add_argument("--pattern", choices=PATTERNS, default="healthy", help="story to tell (default healthy)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--wait", type=positive_float, default=5.0,
                        help="seconds to wait for the daemon before publishing anyway (default 5)")


def run(args: argparse.Namespace) -> int:
    run_id = args.run or f"synthetic-{uuid.uuid4().hex[:4]}"
    stop = install_stop_handlers()
    publisher = EventPublisher(args.publish, args.curve_client)
    if not publisher.wait_for_bus(args.wait):
        log.warning("no daemon at %s after %.1fs; publishing anyway (events are dropped until it is up)",
                    publisher.endpoint, args.wait)
    ids = range(args.worker_offset, args.worker_offset + args.workers)
    log.info("publishing run %s: worker(s) %d..%d at %.1f Hz, pattern %s%s", run_id, ids[0], ids[-1],
             args.rate, args.pattern,
             f", each restarting every {args.restart_every} update(s)" if args.restart_every else "")
    # Seeded by the worker's own id, so worker 7 tells the same story whichever publisher
    # (and offset) simulates it.
    workers = [(SyntheticWorker(run_id, w), random.Random(args.seed * 1000 + w)) for w in ids]
    start = time.monotonic()
    next_heartbeat = start
    update = 0
    try:
        while not stop.is_set() and (args.count == 0 or update < args.count):
            restart = args.restart_every and update and update % args.restart_every == 0
            for worker, rng in workers:
                if restart:
                    worker.restart()
                publisher.send_frames(worker.frames(protocol.PPO_UPDATE,
                                                    synthetic_update(args.pattern, update, rng)))
            update += 1
            now = time.monotonic()
            if now >= next_heartbeat:
                for worker, _rng in workers:
                    publisher.send_frames(worker.frames(
                        protocol.HEARTBEAT, {"interval_s": HEARTBEAT_INTERVAL_S, "last_update": update - 1}))
                next_heartbeat = now + HEARTBEAT_INTERVAL_S
            delay = start + update / args.rate - time.monotonic()
            if delay > 0:
                stop.wait(delay)
    finally:
        publisher.close(linger_ms=2000)
    log.info("published %d event(s) in %d session(s), %d dropped at the sender", publisher.sent,
             sum(worker.sessions for worker, _rng in workers), publisher.dropped)
    return 0
