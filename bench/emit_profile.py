"""``python -m bench.emit_profile``: where one ``emit_ppo_update`` spends its time.

Not a `make bench` group (it judges nothing): the breakdown behind the README's emit
notes. A profiler's own per-call overhead is as large as the parts it would measure, so
this takes differences instead, all in the set-up of the emit row (a live daemon, a
draining subscriber) and interleaved like it (seeded shuffled order, every round):

* ``emit``: the real call;
* ``emit, no send``: the same emitter with its two sends replaced by a Python no-op;
* ``emit, no send/pack``: and its msgpack call replaced by one returning ready bytes;
* ``call only``: a method taking the same ``**fields`` and doing nothing;
* ``2 sends``: two compiled sends of ready frames (what the sends cost alone).

So sends = emit - no send, pack = no send - no send/pack, checks and stamping (type
checks, seq, ts, the envelope prefix, counters) = no send/pack - call only, and the call
itself (the kwargs dict Python builds for ``**fields``) = call only. The replaced pieces
are Python functions, so their call overhead (~0.05 µs each) stays in "no send" and
"no send/pack".
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.agents import PPO_FIELDS, subscriber_main
from bench.common import agents, median, running_daemon, start_agent, sync_subscribers
from bench.emit import SEED, _emit_fn, _floor_fn, _time_batch


def _no_send(sock: Any, data: Any, flags: int) -> None:
    """Stands in for the compiled send: takes its arguments, sends nothing."""


def profile(rounds: int = 600, batch: int = 100,
            warmup: int = 20) -> tuple[dict[str, float], dict[str, float]]:
    """Median per-call µs of each variant (see the module docstring): wall clock, and the
    calling thread's own CPU time (the difference: time this thread waited for a core)."""
    from emitter import telemetry
    from emitter.telemetry import TelemetryEmitter

    with running_daemon() as live, agents() as started:
        drain = start_agent(subscriber_main, {"endpoint": live.subscribe, "idle_s": 1e9,
                                              "prefixes": [b"ppo_update/"]})
        started.append(drain)
        drain.expect("ready")
        sync_subscribers(live.publish, [drain])
        full = TelemetryEmitter("prof", 0, live.publish)
        nosend = TelemetryEmitter("prof", 1, live.publish)
        nopack = TelemetryEmitter("prof", 2, live.publish)
        fields = dict(PPO_FIELDS)
        ready = nopack._pack({**fields, "seq": 0, "ts": 0.0})
        nopack._pack = lambda _fields: ready
        real_send = telemetry._zmq_send

        def without_send(emit: Callable[[], Any]) -> Callable[[], Any]:
            def call() -> Any:
                telemetry._zmq_send = _no_send
                try:
                    return emit()
                finally:
                    telemetry._zmq_send = real_send
            return call

        class CallOnly:
            def emit_ppo_update(self, **fields: Any) -> bool:
                return True

        floor, floor_sock = _floor_fn(live.publish)
        try:
            for em in (full, nosend, nopack):
                em.wait_for_bus(10.0)
            variants: dict[str, Callable[[], Any]] = {
                "emit": _emit_fn(full),
                "emit, no send": without_send(_emit_fn(nosend)),
                "emit, no send/pack": without_send(_emit_fn(nopack)),
                "call only": _emit_fn(CallOnly()),
                "2 sends": floor,
            }
            # The swap in and out of the module global costs the two no-send variants
            # alike; measure it so it can be taken off both.
            variants["swap only"] = without_send(lambda: None)
            per_call: dict[str, list[float]] = {k: [] for k in variants}
            cpu_per_call: dict[str, list[float]] = {k: [] for k in variants}
            order = list(variants)
            rng = random.Random(SEED)
            for r in range(warmup + rounds):
                rng.shuffle(order)
                for name in order:
                    cpu0 = time.thread_time_ns()
                    total, _ = _time_batch(variants[name], batch)
                    cpu = time.thread_time_ns() - cpu0
                    if r >= warmup:
                        per_call[name].append(total / batch / 1e3)
                        cpu_per_call[name].append(cpu / batch / 1e3)
        finally:
            floor_sock.close(linger=0)
            for em in (full, nosend, nopack):
                em.close()
    return ({k: median(v) for k, v in per_call.items()},
            {k: median(v) for k, v in cpu_per_call.items()})


def main() -> int:
    wall, cpu = profile()
    print(f"{'variant':22s} {'wall':>8s} {'thread CPU':>11s}")
    for name in wall:
        print(f"{name:22s} {wall[name]:6.2f} us {cpu[name]:8.2f} us")
    for label, us in (("wall", wall), ("thread CPU", cpu)):
        swap = us["swap only"]
        parts = {
            "call (kwargs dict)": us["call only"],
            "checks + stamping": us["emit, no send/pack"] - swap - us["call only"],
            "msgpack of the fields": us["emit, no send"] - us["emit, no send/pack"],
            "2 sends": us["emit"] - (us["emit, no send"] - swap),
        }
        print(f"-- emit {us['emit']:.2f} us ({label}) =")
        for name, value in parts.items():
            print(f"   {name:22s} {value:6.2f} us  {value / us['emit']:5.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
