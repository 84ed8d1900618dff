"""Emit cost: what one ``emit_ppo_update`` costs the training thread, in every bus state.

Subjects and baselines all run in this one process and thread, interleaved batch by batch:
each round runs one short batch of every subject in a freshly shuffled (seeded) order, so
a noisy neighbour slows them alike and no subject always follows the same other one:

* ``bare``: a dict literal with the envelope and the 11 fields, ``msgpack.packb`` and two
  NOBLOCK ``Socket.send`` calls on a plain PUB socket: what a user of pyzmq's public API
  writes, the DESIGN.md baseline. Not the absolute floor: ``Socket.send`` is itself a
  Python wrapper around pyzmq's compiled send;
* ``floor``: two compiled (backend) sends of ready-made frames on a PUB socket: what any
  Python client pays however it builds its payload (an INFO row, for the profile);
* ``emit``: TelemetryEmitter connected to a live daemon with a draining subscriber;
* ``tensorboard``: ``SummaryWriter.add_scalar`` once per field (11 calls), the incumbent;
  flushed after each batch outside the timed region (its writer thread would otherwise
  write that backlog while the other subjects are timed);
* ``no daemon``: an emitter whose endpoint has nothing listening;
* ``stalled subscriber``: a subscriber that subscribed and then reads nothing (its daemon
  queue and small receive queue fill, then the daemon drops for it alone);
* ``stalled daemon``: the daemon is SIGSTOPped (the emitter's own queue fills to SNDHWM,
  then ZeroMQ drops at the sender).

Per-call times are the median over rounds of the batch mean. Each batch reads the clock
once per call (the same overhead for every subject), so every call is also timed alone and
the worst single call proves "never blocks". The emit row (and the floor row) is judged on
the median of the per-round emit/bare ratios, paired within a round (see ``bench.common.paired_ratio_row``
for why); its note gives their interquartile range, the median per half of the run and
the plain ratio of the two medians, so drift shows. Loss in the stalled cases is counted
afterwards by a subscriber from ``seq`` gaps, as any consumer would see it.
"""

from __future__ import annotations

import random
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from bench.agents import PPO_FIELDS, subscriber_main
from bench.common import (
    Row,
    agents,
    free_tcp_endpoint,
    median,
    paired_ratio_row,
    ratio_row,
    running_daemon,
    start_agent,
    sync_subscribers,
    unavailable,
)

#: A blocking send would take seconds (linger, reconnect); preemption on a busy 2-core
#: box takes tens of ms. Anything under this bound is "did not block".
MAX_CALL_MS = 100.0


def _time_batch(fn: Callable[[], Any], n: int) -> tuple[int, int]:
    """(total ns, worst single call ns) over ``n`` calls: one clock read per call, so the
    batch total has no gaps and each call's own duration is known."""
    clock = time.perf_counter_ns
    worst = 0
    start = last = clock()
    for _ in range(n):
        fn()
        now = clock()
        if now - last > worst:
            worst = now - last
        last = now
    return last - start, worst


def _emit_fn(emitter: Any) -> Callable[[], Any]:
    fields = dict(PPO_FIELDS)
    emit = emitter.emit_ppo_update
    return lambda: emit(**fields)


def _pub_socket(endpoint: str) -> zmq.Socket:
    """A plain PUB with the emitter's queue bound, connected: what the baselines send on."""
    from bus import transport

    sock = transport.context().socket(zmq.PUB)
    sock.sndhwm = transport.PUBLISHER_SNDHWM
    sock.linger = 0
    sock.connect(endpoint)
    return sock


def _bare_fn(endpoint: str) -> tuple[Callable[[], None], zmq.Socket]:
    """dict + msgpack + send on a PUB socket: the floor any telemetry client pays."""
    sock = _pub_socket(endpoint)
    topic = b"ppo_update/bare/0"
    session = uuid.uuid4().hex[:16]
    fields = dict(PPO_FIELDS)
    packb = msgpack.packb
    send = sock.send
    flags_more = zmq.SNDMORE | zmq.NOBLOCK
    seq = 0

    def bare() -> None:
        nonlocal seq
        payload = {"v": 1, "type": "ppo_update", "run": "bare", "worker": 0,
                   "session": session, "seq": seq, "ts": time.time(), **fields}
        seq += 1
        try:
            send(topic, flags_more)
            send(packb(payload), zmq.NOBLOCK)
        except zmq.Again:
            pass

    return bare, sock


def _floor_fn(endpoint: str) -> tuple[Callable[[], None], zmq.Socket]:
    """Two compiled sends of fixed frames: the send cost under every other subject."""
    sock = _pub_socket(endpoint)
    topic = b"ppo_update/floor/0"
    payload = msgpack.packb({"v": 1, "type": "ppo_update", "run": "floor", "worker": 0,
                             "session": uuid.uuid4().hex[:16], "seq": 0, "ts": time.time(),
                             **PPO_FIELDS})
    send = zmq.backend.Socket.send
    more, last = int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.NOBLOCK)

    def floor() -> None:
        try:
            send(sock, topic, more)
            send(sock, payload, last)
        except zmq.Again:
            pass

    return floor, sock


def _tensorboard_fn(logdir: str) -> tuple[Callable[[], None], Any]:
    """add_scalar for each of the same 11 fields: what a TensorBoard user writes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(logdir)
    items = [(f"ppo/{k}", float(v)) for k, v in PPO_FIELDS.items()]
    step = 0

    def tb() -> None:
        nonlocal step
        step += 1
        for tag, value in items:
            writer.add_scalar(tag, value, step)

    return tb, writer


#: Rounds x calls per batch. Many short batches rather than few long ones: finer
#: interleaving, so drift in the machine's load (other processes) hits every subject alike,
#: and enough rounds that the median ratio does not flip between runs.
ROUNDS, BATCH, TB_BATCH, WARMUP_ROUNDS = 600, 100, 2, 20
QUICK_ROUNDS, QUICK_BATCH, QUICK_TB_BATCH, QUICK_WARMUP_ROUNDS = 40, 50, 1, 4
SEED = 14


def run(quick: bool = False) -> list[Row]:
    from emitter.telemetry import TelemetryEmitter

    rounds = QUICK_ROUNDS if quick else ROUNDS
    batch = QUICK_BATCH if quick else BATCH
    tb_batch = QUICK_TB_BATCH if quick else TB_BATCH
    warmup = QUICK_WARMUP_ROUNDS if quick else WARMUP_ROUNDS
    total_per_emitter = (rounds + warmup) * batch

    closers: list[Callable[[], Any]] = []
    tb_missing = ""
    with running_daemon() as live, running_daemon() as frozen, agents() as started, \
            tempfile.TemporaryDirectory(prefix="trainbus-bench-tb-") as logdir:
        try:
            drain = start_agent(subscriber_main, {
                "endpoint": live.subscribe, "idle_s": 1e9,
                "prefixes": [b"ppo_update/bare/", b"ppo_update/floor/", b"ppo_update/conn/"]})
            stalled = start_agent(subscriber_main, {
                "endpoint": live.subscribe, "idle_s": 1e9, "stall": True, "rcvhwm": 1000,
                "prefixes": [b"ppo_update/stall/"]})
            behind_frozen = start_agent(subscriber_main, {
                "endpoint": frozen.subscribe, "idle_s": 1e9,
                "prefixes": [b"ppo_update/dstop/"]})
            started += [drain, stalled, behind_frozen]
            for agent in started:
                agent.expect("ready")
            sync_subscribers(live.publish, [drain, stalled])
            sync_subscribers(frozen.publish, [behind_frozen])

            conn = TelemetryEmitter("conn", 0, live.publish)
            no_daemon = TelemetryEmitter("nod", 0, free_tcp_endpoint())
            stall = TelemetryEmitter("stall", 0, live.publish)
            dstop = TelemetryEmitter("dstop", 0, frozen.publish)
            closers += [conn.close, no_daemon.close, stall.close, dstop.close]
            for em in (conn, stall, dstop):
                if not em.wait_for_bus(10.0):
                    raise TimeoutError(f"emitter {em.run} never saw the daemon subscribe")
            bare, bare_sock = _bare_fn(live.publish)
            closers.append(lambda: bare_sock.close(linger=0))
            floor, floor_sock = _floor_fn(live.publish)
            closers.append(lambda: floor_sock.close(linger=0))
            writer: Any = None
            try:
                tb, writer = _tensorboard_fn(logdir)
                closers.append(writer.close)
            except ImportError as exc:  # the `bench` extra is not installed
                tb, tb_missing = None, f"{exc} (install the bench extra: make bench)"
            frozen.pause()

            subjects: dict[str, tuple[Callable[[], Any], int]] = {
                "bare": (bare, batch), "floor": (floor, batch), "emit": (_emit_fn(conn), batch),
                "no_daemon": (_emit_fn(no_daemon), batch),
                "stalled_sub": (_emit_fn(stall), batch), "stalled_daemon": (_emit_fn(dstop), batch),
            }
            if tb is not None:
                subjects["tensorboard"] = (tb, tb_batch)
            per_call: dict[str, list[float]] = {k: [] for k in subjects}
            worst: dict[str, float] = dict.fromkeys(subjects, 0.0)
            order = list(subjects)
            rng = random.Random(SEED)
            for r in range(warmup + rounds):
                rng.shuffle(order)
                for name in order:
                    fn, n = subjects[name]
                    total, worst_ns = _time_batch(fn, n)
                    if name == "tensorboard":
                        writer.flush()  # outside the timed region, see the module docstring
                    if r < warmup:
                        continue  # caches, socket connects, TB's writer thread
                    per_call[name].append(total / n / 1e3)
                    worst[name] = max(worst[name], worst_ns / 1e6)
            frozen.resume()
            time.sleep(0.3)
            for agent in (drain, stalled, behind_frozen):
                agent.send("drain")
            seen = {name: agent.expect("done", 60.0)
                    for name, agent in (("drain", drain), ("stalled", stalled),
                                        ("frozen", behind_frozen))}
        finally:
            for close in reversed(closers):
                close()

    us = {k: median(v) for k, v in per_call.items()}
    common = (f"{rounds} rounds x {batch} calls, subjects in a seeded shuffled order each "
              f"round; 11 fields; daemon + draining subscriber running")
    rows = [
        paired_ratio_row("emit ppo_update (daemon up)", per_call["emit"], "us/call",
                         "bare dict+msgpack+PUB send", per_call["bare"], max_ratio=1.3,
                         note=f"{common}; worst single call {worst['emit']:.2f} ms"),
        paired_ratio_row("emit vs send floor (2 compiled sends)", per_call["emit"], "us/call",
                         "2 backend sends of ready frames", per_call["floor"],
                         note=f"what the emitter adds to the sends themselves; the bare "
                              f"baseline is {us['bare'] / us['floor']:.2f}x this floor"),
    ]
    if tb_missing:
        rows.append(unavailable("emit vs TensorBoard add_scalar", "us/call",
                                "<= 0.02x (>= 50x cheaper)", tb_missing))
    else:
        rows.append(ratio_row(
            "emit vs TensorBoard add_scalar", us["emit"], "us/call",
            "SummaryWriter.add_scalar x11", us["tensorboard"], max_ratio=1 / 50,
            target="<= 0.02x (>= 50x cheaper)",
            note=f"TensorBoard costs {us['tensorboard'] / us['emit']:.0f}x an emit "
                 f"(median of {rounds} batches x {tb_batch}; add_scalar only: the writer "
                 f"is flushed after each batch, outside the timed region)"))
    for key, label, extra in (
        ("no_daemon", "emit, no daemon", "nothing listens: the XPUB filters (drops) at the "
                                         "sender, nobody can count it"),
        ("stalled_sub", "emit, stalled subscriber",
         _loss_note(seen["stalled"], total_per_emitter, "the stalled subscriber")),
        ("stalled_daemon", "emit, stalled daemon (SIGSTOP)",
         _loss_note(seen["frozen"], total_per_emitter, "a subscriber behind the frozen daemon")),
    ):
        row = ratio_row(label, us[key], "us/call", "emit (daemon up)", us["emit"], max_ratio=1.5,
                        target=f"<= 1.5x, worst call < {MAX_CALL_MS:g} ms",
                        note=f"worst single call {worst[key]:.2f} ms; {extra}")
        row.passed = bool(row.passed) and worst[key] < MAX_CALL_MS
        rows.append(row)
    return rows


def _loss_note(seen: dict[str, Any], sent: int, who: str) -> str:
    """Loss as a consumer sees it: seq gaps plus events missing after the last one seen."""
    received = seen["received"]
    tail = sum(sent - 1 - last for last in seen["last_seq"].values())
    return (f"{who} later received {received} of {sent}: {seen['gaps'] + tail} counted lost "
            f"by seq ({seen['gaps']} gaps + {tail} after its last event), never blocking")
