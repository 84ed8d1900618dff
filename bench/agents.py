"""Child processes of the bench: a publisher (a real TelemetryEmitter) and a subscriber
(a SUB socket decoding with :func:`bus.protocol.decode`, as every consumer does).

Why separate processes: throughput, fan-out and latency are about processes sharing a
machine, so they are measured with the same process layout a deployment has. Each child
talks to the orchestrator over a Pipe with ``(tag, payload)`` tuples and never outlives
it (the orchestrator reaps it; a child also exits when the pipe closes).

Latency is measured with ``time.monotonic_ns()`` carried in an extra payload field
(``bench_t0_ns``; the protocol passes unknown fields on): CLOCK_MONOTONIC is one clock for
all processes of a Linux machine, so the difference is a true one-way latency.
"""

from __future__ import annotations

import os
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

#: The 11 required ppo_update fields with typical values (what every row emits).
PPO_FIELDS: dict[str, Any] = {
    "update": 1, "env_steps": 1024, "grad_norm": 0.5, "pre_clip_grad_norm": 1.7,
    "max_grad_norm": 0.5, "policy_loss": -0.012, "value_loss": 0.43, "entropy": 0.68,
    "approx_kl": 0.0041, "clip_fraction": 0.11, "lr": 2.5e-4,
}

PROBE_RUN = "benchprobe"


def pin_self(spec: dict[str, Any]) -> None:
    """Pin this process to ``spec['cores']`` (see :class:`bench.common.CoreSplit`), first
    thing, so libzmq's threads, started later, inherit it."""
    cores = spec.get("cores")
    if cores:
        os.sched_setaffinity(0, cores)


def publisher_main(conn: Connection, spec: dict[str, Any]) -> None:
    """Emit ``spec['n']`` ppo_updates through a TelemetryEmitter.

    Protocol: -> ("ready", bus_seen) once connected; <- "go"; -> ("done", stats).
    ``rate`` 0 means as fast as possible; otherwise paced at ``rate`` events/s.
    """
    try:
        pin_self(spec)
        from emitter.telemetry import TelemetryEmitter

        emitter = TelemetryEmitter(spec["run"], spec["worker"], spec["endpoint"],
                                   heartbeat_interval=None)
        try:
            conn.send(("ready", emitter.wait_for_bus(10.0)))
            if conn.recv() != "go":
                return
            n, rate, stamp = spec["n"], spec.get("rate", 0), spec.get("stamp", False)
            fields = dict(PPO_FIELDS)
            emit = emitter.emit_ppo_update
            start = time.perf_counter()
            if rate:
                interval = 1.0 / rate
                for i in range(n):
                    due = start + i * interval
                    delay = due - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    fields["update"] = i + 1
                    if stamp:
                        fields["bench_t0_ns"] = time.monotonic_ns()
                    emit(**fields)
            else:
                for i in range(n):
                    fields["update"] = i + 1
                    emit(**fields)
            elapsed = time.perf_counter() - start
            conn.send(("done", {"sent": emitter.sent, "dropped": emitter.dropped,
                                "elapsed_s": elapsed, "session": emitter.session}))
            # Let the queue leave before close (close waits at most linger_ms anyway).
            conn.recv()
        finally:
            emitter.close()
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception:
        conn.send(("error", traceback.format_exc()))


def subscriber_main(conn: Connection, spec: dict[str, Any]) -> None:
    """Receive and decode until ``expected`` events arrived, the stream went quiet for
    ``idle_s`` after the first event, or the orchestrator says "stop".

    ``bind`` makes it the bound end of a direct PUB→SUB link; otherwise it connects to
    the daemon. ``stall`` subscribes and then reads nothing until told "drain" (a wedged
    consumer). Counts per-session seq gaps; records receive times and, with ``latency``,
    one-way latencies from ``bench_t0_ns``.
    """
    try:
        pin_self(spec)
        import zmq

        from bus import protocol, transport

        ctx = transport.context()
        sock = ctx.socket(zmq.SUB)
        sock.linger = 0
        sock.rcvhwm = spec.get("rcvhwm", transport.SUBSCRIBER_RCVHWM)
        for prefix in spec.get("prefixes", [b""]):
            sock.setsockopt(zmq.SUBSCRIBE, prefix)
        if spec.get("bind"):
            sock.bind("tcp://127.0.0.1:*")
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            sock.setsockopt(zmq.SUBSCRIBE, f"heartbeat/{PROBE_RUN}/".encode())
            sock.connect(spec["endpoint"])
            endpoint = spec["endpoint"]
        conn.send(("ready", endpoint))

        expected = spec.get("expected", 0)
        idle_s = spec.get("idle_s", 2.0)
        want_latency = spec.get("latency", False)
        last_seq: dict[str, int] = {}
        received = gaps = rejected = 0
        latencies: list[int] = []
        first_t = last_t = 0.0
        synced = bool(spec.get("bind"))
        draining = not spec.get("stall", False)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        probe_prefix = f"heartbeat/{PROBE_RUN}/".encode()
        while True:
            if conn.poll(0):
                command = conn.recv()
                if command == "stop":
                    break
                if command == "drain":
                    draining = True
                    idle_s = min(idle_s, 0.5)
            if not draining and synced:
                conn.poll(0.05)  # a wedged consumer: subscribed, reading nothing
                continue
            if not poller.poll(50):
                if received and time.perf_counter() - last_t > idle_s:
                    break
                continue
            for _ in range(1000):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if frames[0].startswith(probe_prefix):
                    if not synced:
                        synced = True
                        conn.send(("synced", None))
                    continue
                try:
                    event = protocol.decode(frames)
                except protocol.ProtocolError:
                    rejected += 1
                    continue
                now = time.perf_counter()
                if want_latency:
                    t0 = event.fields.get("bench_t0_ns")
                    if t0 is not None:
                        latencies.append(time.monotonic_ns() - t0)
                if not received:
                    first_t = now
                last_t = now
                received += 1
                prev = last_seq.get(event.session)
                if prev is not None and event.seq > prev + 1:
                    gaps += event.seq - prev - 1
                last_seq[event.session] = event.seq
                if not draining:
                    break
            if expected and received >= expected:
                break
        conn.send(("done", {"received": received, "gaps": gaps, "rejected": rejected,
                            "first_t": first_t, "last_t": last_t,
                            "span_s": last_t - first_t, "sessions": len(last_seq),
                            "last_seq": dict(last_seq), "latencies_ns": latencies}))
        sock.close(linger=0)
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception:
        conn.send(("error", traceback.format_exc()))
