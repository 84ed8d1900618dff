"""Daemon forwarding throughput, and fan-out loss, with real processes.

* **Direct vs bare proxy vs daemon.** The same publisher processes (TelemetryEmitter, as
  fast as they can) and the same subscriber process (SUB + ``protocol.decode``, as every
  consumer does) run wired directly (the subscriber binds, publishers connect), through
  a bare ``zmq.proxy`` process (:mod:`bench.bare_proxy`) and through a running daemon.
  Throughput is what the subscriber received per second between its first and last
  event. The order of the three rotates each round, and the rows are judged on the
  median of the per-round ratios (:func:`bench.common.paired_ratio_row`): one run takes
  about a second, and this machine's speed drifts over seconds (single runs of one mode
  spread 1.7x). Each
  publisher sends fewer events than the queues on its path hold, so nothing is dropped
  and the rate is the sustained forwarding rate, not a drop rate.

  Placement (:class:`bench.common.CoreSplit`): forwarders run pinned to a core of their
  own, the publishers and the subscriber to the other(s), in every mode, direct
  included. That is a daemon on a training machine with a core to spare, and it holds
  the load's share of the machine the same in all three modes. Left to the scheduler on
  2 cores, the rows measured where the scheduler put a third busy process (the bare
  proxy read 0.72-1.27x direct across runs), which the CPU row prices directly. So this
  row asks whether the hop slows what the subscriber gets; the CPU row, what it costs.

  Why the bare proxy: it is libzmq's own forwarding, the most any forwarding process can
  reach, and the daemon is judged against it as well as against the direct link.
* **16 publishers → daemon → 4 subscribers**, all started in sync (every subscriber has
  seen a probe through the daemon, every publisher has seen the daemon subscribe), below
  the high-water marks (each subscriber's total fits the daemon's per-subscriber send
  queue): loss counted by seq at every subscriber, expected 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.agents import publisher_main, subscriber_main
from bench.common import (
    Agent,
    DaemonProc,
    Row,
    agents,
    core_split,
    median,
    paired_ratio_row,
    running_bare_proxy,
    running_daemon,
    start_agent,
    sync_subscribers,
)


def run_once(daemon: DaemonProc | None, pubs: int, subs: int, per_pub: int, tag: str, *,
             rate: float = 0.0, load_cores: frozenset[int] | None = None,
             on_go: Callable[[], object] | None = None,
             on_done: Callable[[], object] | None = None) -> dict[str, Any]:
    """Start ``subs`` subscribers and ``pubs`` publishers, release the publishers at once,
    and collect what each subscriber received. ``daemon`` None = direct PUB→SUB (or any
    forwarder with ``publish``/``subscribe`` endpoints); ``load_cores`` pins the publishers
    and subscribers. ``on_go`` runs right before the
    publishers are released, ``on_done`` once every subscriber has reported (the CPU row
    reads the forwarder's CPU time there)."""
    expected = pubs * per_pub
    with agents() as started:
        sub_agents: list[Agent] = []
        for _ in range(subs):
            # Only this run's updates: the daemon's own bus_stats are not the subject.
            spec: dict[str, Any] = {"expected": expected, "idle_s": 3.0, "cores": load_cores,
                                    "prefixes": [f"ppo_update/{tag}/".encode()]}
            if daemon is None:
                spec["bind"] = True
            else:
                spec["endpoint"] = daemon.subscribe
            agent = start_agent(subscriber_main, spec)
            started.append(agent)
            sub_agents.append(agent)
        endpoints = [a.expect("ready") for a in sub_agents]
        if daemon is not None:
            sync_subscribers(daemon.publish, sub_agents)
        target = endpoints[0] if daemon is None else daemon.publish
        pub_agents = []
        for i in range(pubs):
            agent = start_agent(publisher_main, {"endpoint": target, "run": tag, "worker": i,
                                                 "n": per_pub, "rate": rate,
                                                 "cores": load_cores})
            started.append(agent)
            pub_agents.append(agent)
        for agent in pub_agents:
            if not agent.expect("ready", 60.0):
                raise TimeoutError("a publisher never saw its subscriber")
        if on_go is not None:
            on_go()
        t0 = time.perf_counter()
        for agent in pub_agents:
            agent.send("go")
        pub_done = [a.expect("done", 120.0) for a in pub_agents]
        sub_done = [a.expect("done", 120.0) for a in sub_agents]
        wall = time.perf_counter() - t0
        if on_done is not None:
            on_done()
        for agent in pub_agents:
            agent.send("close")
    lost = []
    for seen in sub_done:
        tail = sum(per_pub - 1 - last for last in seen["last_seq"].values())
        missing_sessions = pubs - seen["sessions"]
        lost.append(seen["gaps"] + tail + missing_sessions * per_pub)
    return {
        "rates": [s["received"] / s["span_s"] if s["span_s"] > 0 else 0.0 for s in sub_done],
        "received": [s["received"] for s in sub_done],
        "lost": lost, "expected": expected, "wall_s": wall,
        "pub_rate": sum(p["sent"] for p in pub_done) / max(p["elapsed_s"] for p in pub_done),
        "delivered_rate": sum(s["received"] for s in sub_done) / max(
            max(s["last_t"] for s in sub_done) - min(s["first_t"] for s in sub_done), 1e-9),
    }


def run(quick: bool = False) -> list[Row]:
    reps = 1 if quick else 7
    pubs = 2
    per_pub = 5_000 if quick else 20_000
    # Below the high-water marks: what one subscriber gets in total fits the daemon's
    # per-subscriber send queue, so any loss is a defect, not a full queue.
    from bus.daemon import XPUB_SNDHWM

    fan_per_pub = min(500 if quick else 5_000, int(XPUB_SNDHWM * 0.95) // 16)
    rates: dict[str, list[float]] = {"direct": [], "bare": [], "daemon": []}
    losses: dict[str, list[int]] = {"direct": [], "bare": [], "daemon": []}
    split = core_split()
    with running_bare_proxy(cores=split.forwarder) as proxy, \
            running_daemon(cores=split.forwarder) as daemon:
        targets: dict[str, DaemonProc | None] = {"direct": None, "bare": proxy, "daemon": daemon}
        modes = list(targets)
        for rep in range(reps):
            # Rotate the order, so drift in machine load hits every mode alike.
            for mode in modes[rep % 3:] + modes[:rep % 3]:
                result = run_once(targets[mode], pubs, 1, per_pub, f"tp-{mode}-{rep}",
                                  load_cores=split.load)
                rates[mode].append(result["rates"][0])
                losses[mode].append(result["lost"][0])
        fan = run_once(daemon, 16, 4, fan_per_pub, "fanout")

    per_run = (f"{pubs} publisher processes (TelemetryEmitter, flat out) -> 1 subscriber "
               f"process (decode); {per_pub} ev each; {reps} rounds, the order rotating "
               f"(daemon {', '.join(f'{r:.0f}' for r in rates['daemon'])}; bare proxy "
               f"{', '.join(f'{r:.0f}' for r in rates['bare'])}; direct "
               f"{', '.join(f'{r:.0f}' for r in rates['direct'])}); lost: daemon "
               f"{losses['daemon']}, bare {losses['bare']}, direct {losses['direct']}")
    rows = [
        paired_ratio_row(
            "daemon throughput", rates["daemon"], "ev/s", "direct PUB->SUB", rates["direct"],
            min_ratio=0.95,
            note=f"{per_run}; a bare zmq.proxy process reached "
                 f"{median([b / d for b, d in zip(rates['bare'], rates['direct'], strict=True)]):.2f}x "
                 "direct in the same rounds (paired)"),
        paired_ratio_row(
            "daemon throughput vs a bare zmq.proxy process", rates["daemon"], "ev/s",
            "bare zmq.proxy process", rates["bare"], min_ratio=0.95,
            note="the same rounds: what the daemon adds to libzmq's own forwarding (its "
                 "cache), with the forwarding hop itself in both"),
    ]
    total_lost = sum(fan["lost"])
    rows.append(Row(
        "16 pub -> daemon -> 4 sub: loss", float(total_lost), "events", "sent x subscribers",
        float(fan["expected"] * 4), None, "0 (below HWMs, started in sync)", total_lost == 0,
        note=f"{fan_per_pub} ev per publisher, flat out (x16 = {fan['expected']} per subscriber, "
             f"under the daemon's per-subscriber SNDHWM {XPUB_SNDHWM}); per subscriber received {fan['received']} of "
             f"{fan['expected']}, lost by seq {fan['lost']}"))
    rows.append(Row(
        "16 pub -> daemon -> 4 sub: delivered", fan["delivered_rate"], "ev/s", "", None, None,
        "report", None,
        note=f"sum over the 4 subscribers; publishers offered {fan['pub_rate']:.0f} ev/s"))
    return rows
