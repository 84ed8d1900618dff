"""The console monitor under load: sustained event rate, redraw rate, memory growth.

* **Sustained events/s with bounded lag** (64 workers). The real monitor loop
  (:func:`consumers.monitor._live`: the monitor's SheddingSubscriber with its receive bound
  → MonitorState.ingest → rich Live redraws of MonitorView, to a terminal-like sink that
  discards the bytes) runs in its own process behind a real daemon, once at the CLI's
  default refresh (4 Hz) and once at its highest (10 Hz, the hardest setting to keep up
  at). Four publisher processes each drive 16 TelemetryEmitters (64 worker streams) at a
  stepped total rate. A step is *sustained* when the monitor ingested at least 95% of what
  was offered during it, the age of the newest event it had ingested stayed under 1 s at
  every frame (bounded lag, on the producers' wall clock), and no event was lost by seq.
  Ingested counts every ppo_update the monitor read and accounted for: shown on the rows,
  or skipped under load (superseded by a newer update of its stream before the next frame,
  never a NaN/critical one: consumers.monitor.SheddingSubscriber); the note gives both.
  The row reports the highest sustained step's ingest rate; the baseline column is the
  rate the publishers actually offered. PASS when a step that really offered 20k ev/s
  (at least 95% of it: TARGET_RATE, OFFERED_SHARE), or more, was sustained.
* **Redraws per second** at the first step that really offered 20k ev/s, counted at
  ``Live.update(refresh=True)``, against the requested refresh: PASS when at least 0.9x
  of it (and never above 10/s, whatever the event rate); no step at that load (saturated
  publishers) is a MISS, never a verdict taken at a lighter load. The note gives that
  step's ingest, lag and loss beside it: redraws bought by not reading would show there
  (and in the sustained row).
* **Memory growth over 1M events**: MonitorState fed 1M fresh ppo_update events from 64
  workers in a fresh process (a frame rendered every 50k events, so the draw path is
  included): resident set size at the end minus after a 100k-event warm-up. (RSS, not
  tracemalloc: tracing would triple the run time, and RSS is what the operator sees.)
"""

from __future__ import annotations

import math
import random
import threading
import time
import traceback
from multiprocessing.connection import Connection
from types import SimpleNamespace
from typing import Any

from bench.agents import PPO_FIELDS
from bench.common import Agent, Row, agents, median, running_daemon, start_agent, unavailable

WORKERS = 64
LOAD_PROCS = 4
MAX_LAG_S = 1.0
RUN = "monbench"
#: Memory test: render one frame per this many events (the draw path is part of "flat").
RENDER_EVERY = 50_000


# ---------------------------------------------------------------------------- children


def start_loads(endpoint: str, procs: int, per_proc: int, started: list[Agent],
                timeout: float) -> list[Agent]:
    """``procs`` :func:`load_main` processes driving ``per_proc`` workers each (worker ids
    0.. in order), each one registered in ``started`` for reaping, returned once every
    one's emitters see the daemon."""
    loads: list[Agent] = []
    for p in range(procs):
        agent = start_agent(load_main, {"endpoint": endpoint,
                                        "workers": list(range(p * per_proc, (p + 1) * per_proc))})
        started.append(agent)
        loads.append(agent)
    for agent in loads:
        if not agent.expect("ready", timeout):
            raise TimeoutError("a load publisher never saw the daemon")
    return loads


def load_main(conn: Connection, spec: dict[str, Any]) -> None:
    """One publisher process driving several workers' emitters at a commanded rate."""
    try:
        from emitter.telemetry import TelemetryEmitter

        emitters = [TelemetryEmitter(RUN, w, spec["endpoint"], heartbeat_interval=None)
                    for w in spec["workers"]]
        try:
            conn.send(("ready", all(e.wait_for_bus(10.0) for e in emitters)))
            fields = dict(PPO_FIELDS)
            update = 0
            while True:
                command = conn.recv()
                if command[0] != "load":
                    break
                _, rate, duration = command
                n = int(rate * duration)
                interval = 1.0 / rate
                start = time.perf_counter()
                for i in range(n):
                    delay = start + i * interval - time.perf_counter()
                    if delay > 0.0002:
                        time.sleep(delay)
                    if i % len(emitters) == 0:
                        update += 1
                        fields["update"] = update
                        fields["grad_norm"] = 0.3 + (update % 7) * 0.1
                    emitters[i % len(emitters)].emit_ppo_update(**fields)
                elapsed = time.perf_counter() - start
                conn.send(("done", {"sent": n, "elapsed_s": elapsed}))
        finally:
            for e in emitters:
                e.close()
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception:
        conn.send(("error", traceback.format_exc()))


class _NullFile:
    """A terminal that discards what it is sent: rich still renders every frame."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def monitor_main(conn: Connection, spec: dict[str, Any]) -> None:
    """Run the monitor's real live loop; record one sample per redraw."""
    try:
        from rich.console import Console
        from rich.live import Live

        from consumers import monitor as mon
        from consumers.monitor_view import MonitorView
        from consumers.runtime import Subscriber

        # Wired as the CLI wires them (consumers.monitor.run): the monitor's own receive
        # bound, its shedding subscriber, the state reading the subscriber's books.
        hwm = getattr(mon, "MONITOR_RCVHWM", None)
        shedding = getattr(mon, "SheddingSubscriber", None)
        if shedding is not None:
            sub = shedding(spec["subscribe"], spec["snapshot"], rcvhwm=hwm)
            state = mon.MonitorState(book=sub.book)
            sub.must_show = state.must_show
        else:
            sub = Subscriber(spec["subscribe"], spec["snapshot"],
                             **({"rcvhwm": hwm} if hwm is not None else {}))
            state = mon.MonitorState()
        deadline = time.monotonic() + 20
        while not sub.ever_connected and time.monotonic() < deadline:
            state.ingest_many(sub.poll(50), time.monotonic())
        samples: list[tuple[float, float, int, float, int, int]] = []

        class CountingLive(Live):
            """rich's Live, noting time, ingest count and lag at every real redraw."""

            def update(self, renderable: Any, *, refresh: bool = False) -> None:
                if not refresh:
                    super().update(renderable, refresh=refresh)
                    return
                t0 = time.monotonic()
                newest = max((r.last_ts for r in state.rows.values() if r.last_ts), default=None)
                lag = time.time() - newest if newest is not None else math.nan
                super().update(renderable, refresh=True)
                samples.append((t0, time.monotonic() - t0, state.events_by_type["ppo_update"],
                                lag, sub.stats.dropped_by_type["ppo_update"],
                                getattr(sub, "skipped", 0)))

        stop = threading.Event()

        def wait_stop() -> None:
            try:
                conn.recv()
            except EOFError:
                pass
            stop.set()

        threading.Thread(target=wait_stop, daemon=True).start()
        console = Console(file=_NullFile(), force_terminal=True, width=160, height=60,
                          color_system="truecolor")
        conn.send(("ready", sub.connected))
        mon._live(SimpleNamespace(refresh=spec["refresh"]), state, sub, console, stop,
                  CountingLive, MonitorView)
        conn.send(("done", {"samples": samples, "rejected": sub.stats.rejected_total,
                            "dropped": sub.stats.dropped_total,
                            "ppo_events": state.events_by_type["ppo_update"]}))
        sub.close()
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception:
        conn.send(("error", traceback.format_exc()))


# ---------------------------------------------------------------------------- orchestration


def _ramp(quick: bool, refresh: float, rates: list[int]) -> dict[str, Any]:
    """Offer each total rate in turn for a few seconds, recording the monitor's frames."""
    duration = 1.5 if quick else 3.0
    steps: list[dict[str, Any]] = []
    per_proc = WORKERS // LOAD_PROCS
    with running_daemon() as daemon, agents() as started:
        monitor = start_agent(monitor_main, {"subscribe": daemon.subscribe,
                                             "snapshot": daemon.snapshot, "refresh": refresh})
        started.append(monitor)
        monitor.expect("ready", 60.0)
        loads = start_loads(daemon.publish, LOAD_PROCS, per_proc, started, 60.0)
        for rate in rates:
            t_start = time.monotonic()
            for agent in loads:
                agent.send(("load", rate / LOAD_PROCS, duration))
            done = [agent.expect("done", 60.0 + 3 * duration) for agent in loads]
            t_end = time.monotonic()
            offered = sum(d["sent"] for d in done) / max(d["elapsed_s"] for d in done)
            steps.append({"rate": rate, "offered": offered, "t_start": t_start, "t_end": t_end,
                          "sent": sum(d["sent"] for d in done)})
            time.sleep(1.0)  # let the monitor drain before the next step
            if rate >= 20_000 and steps[-1]["offered"] < 0.9 * rate:
                break  # the publishers themselves are saturated: higher steps mean nothing
        for agent in loads:
            agent.send(("close",))
        monitor.send("stop")
        result = monitor.expect("done", 30.0)
    result["steps"] = steps
    return result


#: The load DESIGN.md's monitor target is judged at (ev/s), and how much of it the
#: publishers must really have offered for a step to count as that load: a step commanded
#: at 20k that the saturated publishers delivered at 15k says nothing about 20k.
TARGET_RATE = 20_000
OFFERED_SHARE = 0.95


def _at_target(step: dict[str, Any]) -> bool:
    return step["offered"] >= OFFERED_SHARE * TARGET_RATE


def _judge(step: dict[str, Any],
           samples: list[tuple[float, float, int, float, int, int]]) -> dict[str, Any]:
    """Ingest rate (shown + skipped), worst lag, redraw rate and loss inside one step's
    window."""
    t0, t1 = step["t_start"] + 0.5, step["t_end"]
    inside = [s for s in samples if t0 <= s[0] <= t1]
    after = [s for s in samples if s[0] <= t1 + 1.0]
    before = [s for s in samples if s[0] < step["t_start"]]
    if len(inside) < 2:  # the loop was too busy to redraw twice: certainly not keeping up
        return {**step, "ingest": math.nan, "shown": math.nan, "skipped": math.nan,
                "lag": max((s[3] for s in inside), default=math.inf),
                "redraw_hz": len(inside) / (t1 - t0), "lost": 0, "ok": False}
    span = inside[-1][0] - inside[0][0]
    shown = (inside[-1][2] - inside[0][2]) / span
    skipped = (inside[-1][5] - inside[0][5]) / span
    ingest = shown + skipped
    lag = max(s[3] for s in inside)
    redraw = (len(inside) - 1) / (inside[-1][0] - inside[0][0])
    lost = (after[-1][4] if after else 0) - (before[-1][4] if before else 0)
    ok = ingest >= 0.95 * step["offered"] and lag < MAX_LAG_S and lost == 0
    return {**step, "ingest": ingest, "shown": shown, "skipped": skipped, "lag": lag,
            "redraw_hz": redraw, "lost": lost, "ok": ok,
            "render_ms": median([s[1] for s in inside]) * 1e3}


def _memory(n_events: int, warmup: int) -> dict[str, float]:
    """RSS growth of MonitorState fed ``n_events`` (+ a rendered frame now and then)."""
    from bus import protocol
    from consumers.monitor_state import MonitorState
    from consumers.monitor_view import render_text

    state = MonitorState()
    rng = random.Random(0)
    sessions = [f"sess{w:012d}" for w in range(WORKERS)]
    extra = ("explained_variance", "episode_return_mean", "sps", "update_time_ms",
             "ratio_min", "ratio_max", "advantage_mean", "advantage_std")

    # Varied field values, drawn once: generating random numbers per event would make
    # the 1M-event run take minutes; each event still gets its own fresh payload dict.
    templates = []
    for _ in range(1024):
        fields = dict(PPO_FIELDS)
        fields.update({k: rng.random() for k in extra})
        fields.update(grad_norm=rng.random() * 3, nonfinite_grad_count=0, v=1,
                      type="ppo_update", run=RUN)
        templates.append(fields)

    def feed(start: int, stop: int) -> None:
        ingest = state.ingest
        clock = time.monotonic
        for i in range(start, stop):
            w = i % WORKERS
            seq = i // WORKERS
            ts = time.time()
            fields = dict(templates[i % 1024])
            fields.update(worker=w, session=sessions[w], seq=seq, ts=ts, update=seq + 1,
                          env_steps=(seq + 1) * 1024)
            ingest(protocol.Event("ppo_update", RUN, w, sessions[w], seq, ts, fields,
                                  (b"", b"")), clock())
            if i % RENDER_EVERY == RENDER_EVERY - 1:
                now = clock()
                state.sync(now, connected=True, ever_connected=True)
                render_text(state, now, width=160)

    feed(0, warmup)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    feed(warmup, n_events)
    return {"growth_mb": _rss_mb() - rss0, "rss_mb": _rss_mb(),
            "seconds": time.perf_counter() - t0, "rows": len(state.rows)}


def _rss_mb() -> float:
    """Resident set size from /proc (Linux); what an operator's `top` shows."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def memory_main(conn: Connection, spec: dict[str, Any]) -> None:
    """Run :func:`_memory` in a fresh process, so its RSS holds nothing else."""
    try:
        conn.send(("done", _memory(spec["n"], spec["warmup"])))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _num(x: float) -> str:
    return "?" if math.isnan(x) else f"{x:.0f}"


def _ramp_rows(quick: bool, refresh: float, label: str, rates: list[int]) -> list[Row]:
    result = _ramp(quick, refresh, rates)
    judged = [_judge(step, result["samples"]) for step in result["steps"]]
    sustained = [j for j in judged if j["ok"]]
    best = max(sustained, key=lambda j: j["ingest"]) if sustained else None
    # The redraw verdict is taken at the first step that really offered the target load
    # (else the heaviest offered, which then cannot pass).
    at_target = [j for j in judged if _at_target(j)]
    heaviest = at_target[0] if at_target else max(judged, key=lambda j: j["offered"])
    steps_note = "; ".join(
        f"{j['rate'] // 1000}k: offered {j['offered']:.0f}, ingested {_num(j['ingest'])}/s "
        f"({_num(j['shown'])} shown, {_num(j['skipped'])} skipped), "
        f"max lag {j['lag'] * 1e3:.0f} ms, lost {j['lost']}, redraws {j['redraw_hz']:.2f}/s"
        f"{'' if j['ok'] else ' (not sustained)'}"
        for j in judged)
    value = best["ingest"] if best else 0.0
    redraw_ok = _at_target(heaviest) and 0.9 * refresh <= heaviest["redraw_hz"] <= 10.0 * 1.01
    return [
        Row(f"monitor sustained ingest, {label}", value, "ev/s", "offered by publishers",
            best["offered"] if best else None, value / best["offered"] if best else None,
            f">= {TARGET_RATE} ev/s offered, ingest >= 0.95x, lag < 1 s, 0 lost",
            best is not None and _at_target(best), note=f"64 workers; {steps_note}"),
        Row(f"monitor redraws under load, {label}", heaviest["redraw_hz"], "/s", "requested",
            refresh, heaviest["redraw_hz"] / refresh,
            f">= 0.9x requested at {TARGET_RATE} ev/s offered, <= 10 /s (1% timer slack)",
            redraw_ok,
            note=f"at the {heaviest['rate'] // 1000}k step: {heaviest['offered']:.0f} ev/s offered"
                 f"{'' if _at_target(heaviest) else ' (short of the target load: no verdict)'}, "
                 f"{_num(heaviest['ingest'])} ev/s ingested ({_num(heaviest['skipped'])}/s of them "
                 f"skipped), max lag {heaviest['lag'] * 1e3:.0f} ms, lost {heaviest['lost']}"
                 f"{'' if heaviest['ok'] else ' (not keeping up)'}; median frame render "
                 f"{heaviest.get('render_ms', math.nan):.1f} ms"),
    ]


def run(quick: bool = False) -> list[Row]:
    try:
        from consumers import monitor as mon
        mon.MonitorState  # noqa: B018 - the subject must exist
        mon._live  # noqa: B018
    except (ImportError, AttributeError) as exc:
        why = f"consumers.monitor lacks what this bench drives ({exc})"
        return [unavailable("monitor sustained ingest (64 workers)", "ev/s", ">= 20000", why),
                unavailable("monitor redraws under load", "/s", "<= 10", why),
                unavailable("monitor memory growth over 1M events", "MB", "< 10", why)]

    rows = _ramp_rows(quick, mon.DEFAULT_REFRESH_HZ, f"--refresh {mon.DEFAULT_REFRESH_HZ:g} (default)",
                      [5_000, 20_000] if quick else [5_000, 10_000, 20_000, 30_000, 40_000])
    if not quick:  # the hardest setting to keep up at; fewer steps to stay in budget
        rows += _ramp_rows(quick, mon.MAX_REFRESH_HZ, f"--refresh {mon.MAX_REFRESH_HZ:g} (max)",
                           [5_000, 10_000, 20_000])
    n_events = 200_000 if quick else 1_000_000
    with agents() as started:
        child = start_agent(memory_main, {"n": n_events, "warmup": 100_000 if not quick else 20_000})
        started.append(child)
        mem = child.expect("done", 300.0)
    rows.append(Row(f"monitor memory growth over {n_events // 1000}k events", mem["growth_mb"],
                    "MB", "", None, None, "< 10 MB", mem["growth_mb"] < 10.0,
                    note=f"RSS of a fresh process after a warm-up, {mem['rss_mb']:.0f} MB at the end; "
                         f"{mem['rows']} rows; {mem['seconds']:.1f}s incl. a frame per {RENDER_EVERY // 1000}k"))
    return rows
