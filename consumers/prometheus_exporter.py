"""``trainbus prometheus``: a /metrics endpoint for Prometheus scrapes.

A consumer like any other (validated, de-duplicated events, snapshot history on connect)
that keeps the latest value of each PPO metric per (run, worker) and serves it in the
Prometheus text exposition format through prometheus-client, with its own
:class:`CollectorRegistry` (nothing from the global default registry leaks in, and nothing
of ours leaks out into a host process that imports this module).

Series (labels ``run`` and ``worker`` unless noted):

* ``trainbus_ppo_grad_norm{stage="post"|"pre"}``: the **maximum since the last scrape**
  of ``grad_norm`` (post-clip) and ``pre_clip_grad_norm``. A plain gauge reports only the
  value current at scrape time, so a spike between two 15 s scrapes would never reach a
  dashboard. A non-finite value wins over any finite one (NaN stays NaN until scraped,
  +Inf beats every number). Each scrape resets the maximum; a scrape with no new update
  since the previous one reports the latest value, so the series never vanishes or drops
  to 0 while a worker is quiet. Every scrape resets it, so two Prometheus servers scraping
  the same exporter each see the maximum since *either* scraped (run one exporter per
  scraper for exact HA pairs).
* the other ppo_update metrics as gauges of their latest value: ``trainbus_ppo_approx_kl``,
  ``_clip_fraction``, ``_entropy``, ``_policy_loss``, ``_value_loss``, ``_learning_rate``,
  ``_max_grad_norm``, ``_update``, ``_env_steps`` and, once measured, ``_explained_variance``,
  ``_episode_return_mean``, ``_episode_length_mean``, ``_env_steps_per_second``,
  ``_update_duration_seconds``, ``_ratio_min``, ``_ratio_max``, ``_advantage_mean``,
  ``_advantage_std``. An optional field that is absent or nil (not measured) leaves the
  last measured value in place, or no series if it was never measured.
* counters: ``trainbus_ppo_updates_total``; ``trainbus_nonfinite_grads_total`` (updates
  whose pre- or post-clip gradient norm was NaN/inf); ``trainbus_nonfinite_grad_elements_total``
  (sum of ``nonfinite_grad_count``, when reported); ``trainbus_dropped_events_total``
  (sequence gaps: events lost on the way); ``trainbus_worker_restarts_total``;
  ``trainbus_alert_notifications_total{run,rule,severity,state}`` (one per alert/ event,
  reminders included).
* ``trainbus_last_event_age_seconds`` (seconds since this exporter last heard from the
  worker, on its own clock: use it for "worker silent" alerts; not exported for a worker
  that finished — its emitter closed — because its quiet is the end of its work) and
  ``trainbus_last_event_timestamp_seconds`` (the producer's own ``ts``).
* A worker silent for ``--forget-after`` seconds (default 600) is forgotten and all its
  series leave /metrics (Prometheus marks them stale), so restarted, replayed or finished
  runs do not pile up series for ever; a run's alert counts go with its last worker.
* the exporter itself: ``trainbus_exporter_connected`` (1 while connected to the daemon),
  ``trainbus_exporter_events_total``, ``trainbus_exporter_rejected_messages_total{reason}``.

NaN and ±Inf are exported as such (the exposition format has ``NaN``, ``+Inf``, ``-Inf``).
Counters count what this exporter received, including the snapshot history it gets when it
connects, and start from zero when it restarts (Prometheus' ``rate()`` handles that).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from bus import cli, endpoints, protocol
from consumers.fleet import Fleet, WorkerKey, add_fleet_arguments
from consumers.runtime import StreamBook, Subscriber, install_stop_handlers

log = logging.getLogger(__name__)

DEFAULT_PORT = 9108
POLL_MS = 100
STREAM_LABELS = ("run", "worker")

#: ppo_update field -> (metric name, help, scale). Names follow Prometheus conventions:
#: base units (seconds), no unit-less "_total" on gauges.
GAUGE_FIELDS: dict[str, tuple[str, str, float]] = {
    "approx_kl": ("trainbus_ppo_approx_kl", "Approximate KL divergence of the last update.", 1.0),
    "clip_fraction": ("trainbus_ppo_clip_fraction", "Fraction of samples whose ratio was clipped.", 1.0),
    "entropy": ("trainbus_ppo_entropy", "Policy entropy of the last update.", 1.0),
    "policy_loss": ("trainbus_ppo_policy_loss", "Policy (surrogate) loss of the last update.", 1.0),
    "value_loss": ("trainbus_ppo_value_loss", "Value loss of the last update.", 1.0),
    "lr": ("trainbus_ppo_learning_rate", "Learning rate of the last update.", 1.0),
    "max_grad_norm": ("trainbus_ppo_max_grad_norm", "Gradient clipping threshold (+Inf: no clipping).", 1.0),
    "update": ("trainbus_ppo_update", "Index of the last PPO update.", 1.0),
    "env_steps": ("trainbus_ppo_env_steps", "Environment steps so far, as reported by the worker.", 1.0),
    "explained_variance": ("trainbus_ppo_explained_variance", "Explained variance of the value function.", 1.0),
    "episode_return_mean": ("trainbus_ppo_episode_return_mean", "Mean episode return.", 1.0),
    "episode_length_mean": ("trainbus_ppo_episode_length_mean", "Mean episode length in steps.", 1.0),
    "sps": ("trainbus_ppo_env_steps_per_second", "Environment steps per second.", 1.0),
    "update_time_ms": ("trainbus_ppo_update_duration_seconds", "Wall time of the last update.", 1e-3),
    "ratio_min": ("trainbus_ppo_ratio_min", "Smallest probability ratio in the last update.", 1.0),
    "ratio_max": ("trainbus_ppo_ratio_max", "Largest probability ratio in the last update.", 1.0),
    "advantage_mean": ("trainbus_ppo_advantage_mean", "Mean advantage (before normalisation).", 1.0),
    "advantage_std": ("trainbus_ppo_advantage_std", "Advantage standard deviation.", 1.0),
}
GRAD_STAGES = (("post", "grad_norm"), ("pre", "pre_clip_grad_norm"))


#: Metrics the exporter keeps per worker (the fleet model's histories; the latest value is
#: the gauge, so an optional field that is not measured leaves the last measured one).
EXPORTED_METRICS: tuple[str, ...] = tuple(
    dict.fromkeys((*(name for _stage, name in GRAD_STAGES),
                   *(name for name in GAUGE_FIELDS if name not in ("update", "env_steps")))))
#: A worker silent this long (exporter's clock) is forgotten and its series leave /metrics:
#: a restarted or finished run's series must not stay forever. Longer than any "silent"
#: alert a rule file would set (the generated worker_silent rule fires at 30 s).
DEFAULT_FORGET_AFTER_S = 600.0


#: Prefix of the gauge family of a producer's own numeric field ("your own metrics").
CUSTOM_PREFIX = "trainbus_custom_"


def custom_series_name(field: str) -> str:
    """The gauge family of a producer's own field: ``trainbus_custom_`` + the name with
    every character Prometheus does not allow in a metric name (``.``, ``-``) as ``_``."""
    return CUSTOM_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", field)


def _worse(value: float, current: float) -> bool:
    """Whether ``value`` should replace ``current`` as the peak: NaN sticks, then max."""
    if math.isnan(current):
        return False
    return math.isnan(value) or value > current


class ExporterState:
    """The exporter's view of the bus: a :class:`consumers.fleet.Fleet` plus what only a
    scrape target needs (grad-norm peaks since the last scrape, alert notification counts,
    the exporter's own figures). Fed by the poll loop, read by scrapes.

    Why a lock rather than lock-free reads: a scrape runs on the HTTP server's thread and
    both reads everything and resets the grad-norm peaks; it must see each update whole.
    """

    def __init__(self, *, forget_after: float = DEFAULT_FORGET_AFTER_S,
                 book: StreamBook | None = None) -> None:
        self.lock = threading.Lock()
        self.fleet = Fleet(spikes=(), metrics=EXPORTED_METRICS, forget_after=forget_after,
                           custom=True, book=book)
        self.peaks: dict[WorkerKey, dict[str, float]] = {}  # since the last scrape
        self.alerts: Counter[tuple[str, str, str, str]] = Counter()
        self.events = 0
        self.rejected: Counter[str] = Counter()
        self.connected = False

    def observe(self, event: protocol.Event, now: float | None = None) -> None:
        """Fold one validated event in (caller holds no lock; taken here)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            self.events += 1
            if event.type == protocol.ALERT:
                f = event.fields
                self.alerts[(event.run, str(f["rule"]), str(f["severity"]), str(f["state"]))] += 1
                return
            worker = self.fleet.ingest(event, now)
            if worker is not None and event.type == protocol.PPO_UPDATE:
                peaks = self.peaks.setdefault(worker.key, {})
                for stage, name in GRAD_STAGES:
                    value = float(event.fields[name])
                    peak = peaks.get(stage)
                    if peak is None or _worse(value, peak):
                        peaks[stage] = value

    def sync(self, now: float, connected: bool, rejected: Counter[str]) -> None:
        """Once per poll: connection state and rejects from the runtime; forget workers
        silent for ``forget_after`` (their series go, and their runs' alert counts once
        no worker of the run is left)."""
        with self.lock:
            self.connected = connected
            self.rejected = Counter(rejected)
            for key in self.fleet.forget(now):
                self.peaks.pop(key, None)
            if self.alerts:
                runs = set(self.fleet.runs())
                for key in [k for k in self.alerts if k[0] not in runs]:
                    del self.alerts[key]


class BusCollector:
    """prometheus-client custom collector over :class:`ExporterState`."""

    def __init__(self, state: ExporterState) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = self.state
        now = time.monotonic()
        grad = GaugeMetricFamily(
            "trainbus_ppo_grad_norm",
            "L2 norm of the policy gradient, maximum since the last scrape "
            "(stage=post: after clipping, what the optimizer applied; pre: before).",
            labels=[*STREAM_LABELS, "stage"])
        gauges = {name: GaugeMetricFamily(metric, help_text, labels=list(STREAM_LABELS))
                  for name, (metric, help_text, _scale) in GAUGE_FIELDS.items()}
        updates = CounterMetricFamily("trainbus_ppo_updates_total",
                                      "PPO updates received.", labels=list(STREAM_LABELS))
        nonfinite = CounterMetricFamily(
            "trainbus_nonfinite_grads_total",
            "PPO updates whose pre- or post-clip gradient norm was NaN or infinite.",
            labels=list(STREAM_LABELS))
        elements = CounterMetricFamily(
            "trainbus_nonfinite_grad_elements_total",
            "NaN/inf gradient elements, summed from nonfinite_grad_count where reported.",
            labels=list(STREAM_LABELS))
        dropped = CounterMetricFamily("trainbus_dropped_events_total",
                                      "Events lost on the way (sequence gaps).",
                                      labels=list(STREAM_LABELS))
        restarts = CounterMetricFamily("trainbus_worker_restarts_total",
                                       "Worker restarts seen (new emitter sessions).",
                                       labels=list(STREAM_LABELS))
        age = GaugeMetricFamily("trainbus_last_event_age_seconds",
                                "Seconds since this exporter last received an event from the "
                                "worker (exporter's clock).", labels=list(STREAM_LABELS))
        last_ts = GaugeMetricFamily("trainbus_last_event_timestamp_seconds",
                                    "Producer timestamp of the worker's newest event.",
                                    labels=list(STREAM_LABELS))
        alerts = CounterMetricFamily("trainbus_alert_notifications_total",
                                     "Alert notifications seen on the bus (reminders included).",
                                     labels=["run", "rule", "severity", "state"])
        connected = GaugeMetricFamily("trainbus_exporter_connected",
                                      "1 while the exporter is connected to the daemon.")
        events = CounterMetricFamily("trainbus_exporter_events_total",
                                     "Valid events this exporter received.")
        rejected = CounterMetricFamily("trainbus_exporter_rejected_messages_total",
                                       "Invalid messages this exporter rejected, by reason.",
                                       labels=["reason"])
        with state.lock:
            custom: dict[str, GaugeMetricFamily] = {}
            for name in state.fleet.custom_metrics:
                family = custom_series_name(name)
                if all(f.name != family for f in custom.values()):  # a.b and a_b: first wins
                    custom[name] = GaugeMetricFamily(
                        family, f"Producer-defined ppo_update field {name!r} (latest value).",
                        labels=list(STREAM_LABELS))
            for w in state.fleet.sorted_workers():
                labels = [w.run, str(w.worker)]
                latest = w.history.latest
                peaks = state.peaks.get(w.key, {})
                for stage, name in GRAD_STAGES:
                    value = latest(name)
                    if value is not None:
                        grad.add_metric([*labels, stage], peaks.pop(stage, value))
                for name, (_metric, _help, scale) in GAUGE_FIELDS.items():
                    value = w.update if name == "update" else \
                        w.env_steps if name == "env_steps" else latest(name)
                    if value is not None:
                        gauges[name].add_metric(labels, float(value) * scale)
                for name, family in custom.items():
                    value = latest(name)
                    if value is not None:
                        family.add_metric(labels, value)
                if w.updates:
                    updates.add_metric(labels, w.updates)
                    nonfinite.add_metric(labels, w.nonfinite_updates)
                    elements.add_metric(labels, w.nonfinite_elements)
                dropped.add_metric(labels, w.dropped)
                restarts.add_metric(labels, w.restarts)
                if not w.finished:  # a finished worker's quiet is no silence to alert on
                    age.add_metric(labels, max(0.0, now - w.last_seen))
                if w.last_ts is not None:
                    last_ts.add_metric(labels, w.last_ts)
            for (run, rule, severity, alert_state), count in sorted(state.alerts.items()):
                alerts.add_metric([run, rule, severity, alert_state], count)
            connected.add_metric([], 1.0 if state.connected else 0.0)
            events.add_metric([], state.events)
            for reason, count in sorted(state.rejected.items()):
                rejected.add_metric([reason], count)
        yield grad
        # Optional metrics nobody reports would only add empty HELP/TYPE noise.
        yield from (family for family in gauges.values() if family.samples)
        yield from (family for family in custom.values() if family.samples)
        yield from (updates, nonfinite, elements, dropped, restarts, age, last_ts, alerts,
                    connected, events, rejected)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=cli.nonneg_int, default=DEFAULT_PORT,
                        help=f"HTTP port for /metrics (default {DEFAULT_PORT}; 0 picks a free one "
                             "and prints it)")
    parser.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                        help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --bind (plain HTTP, no authentication)")
    parser.add_argument("--run", type=cli.run_name, metavar="R", help="export only this run")
    add_fleet_arguments(parser, stale=False, forget_after=DEFAULT_FORGET_AFTER_S)
    cli.add_subscriber_arguments(parser)


def _check_bind(bind: str, insecure: bool) -> None:
    host = f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind
    if insecure or endpoints.is_loopback(f"tcp://{host}:0"):
        return
    raise cli.UsageError(f"refusing to serve /metrics on {bind}: not a loopback address; "
                         "use --insecure to expose it on the network (plain HTTP, no auth)")


def run(args: argparse.Namespace) -> int:
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        print("trainbus prometheus: error: prometheus-client is not installed "
              "(pip install 'trainbus[prometheus]')", file=sys.stderr)
        return 1
    _check_bind(args.bind, args.insecure)
    stop = install_stop_handlers()
    sub = Subscriber.from_args(args, types=[protocol.PPO_UPDATE, protocol.HEARTBEAT,
                                            protocol.ALERT], run=args.run,
                               forget_after=args.forget_after)
    state = ExporterState(forget_after=args.forget_after, book=sub.book)
    registry = CollectorRegistry()
    registry.register(BusCollector(state))
    try:
        try:
            server, _thread = start_http_server(args.port, addr=args.bind, registry=registry)
        except OSError as exc:
            print(f"trainbus prometheus: error: cannot listen on {args.bind}:{args.port}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 1
        host = f"[{args.bind}]" if ":" in args.bind else args.bind
        print(f"trainbus prometheus: serving http://{host}:{server.server_port}/metrics "
              f"port={server.server_port}", flush=True)
        try:
            while not stop.is_set():
                events = sub.poll(POLL_MS)
                now = time.monotonic()
                for event in events:
                    state.observe(event, now)
                state.sync(now, sub.connected, sub.stats.rejected)
        finally:
            server.shutdown()
            server.server_close()
    finally:
        sub.close()
    return 0
