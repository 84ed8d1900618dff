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
  worker, on its own clock: use it for "worker silent" alerts) and
  ``trainbus_last_event_timestamp_seconds`` (the producer's own ``ts``).
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
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bus import cli, endpoints, protocol
from consumers.runtime import StreamState, Subscriber, install_stop_handlers

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


def _worse(value: float, current: float) -> bool:
    """Whether ``value`` should replace ``current`` as the peak: NaN sticks, then max."""
    if math.isnan(current):
        return False
    return math.isnan(value) or value > current


@dataclass
class StreamMetrics:
    """Everything exported for one (run, worker); touched under the exporter's lock."""

    gauges: dict[str, float] = field(default_factory=dict)
    grad_latest: dict[str, float] = field(default_factory=dict)
    grad_peak: dict[str, float] = field(default_factory=dict)  # since the last scrape
    updates: int = 0
    nonfinite_updates: int = 0
    nonfinite_elements: int = 0
    dropped: int = 0
    restarts: int = 0
    last_received: float | None = None  # monotonic, this process
    last_ts: float | None = None


class ExporterState:
    """The exporter's view of the bus; fed by the poll loop, read by scrapes.

    Why a lock rather than lock-free reads: a scrape runs on the HTTP server's thread and
    both reads everything and resets the grad-norm peaks; it must see each update whole.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.streams: dict[tuple[str, str], StreamMetrics] = {}
        self.alerts: Counter[tuple[str, str, str, str]] = Counter()
        self.events = 0
        self.rejected: Counter[str] = Counter()
        self.connected = False

    def _stream(self, run: str, worker: int | str) -> StreamMetrics:
        key = (run, str(worker))
        metrics = self.streams.get(key)
        if metrics is None:
            metrics = self.streams[key] = StreamMetrics()
        return metrics

    def observe(self, event: protocol.Event) -> None:
        """Fold one validated event in (caller holds no lock; taken here)."""
        with self.lock:
            self.events += 1
            if event.type == protocol.PPO_UPDATE:
                self._observe_update(event)
            elif event.type == protocol.ALERT:
                f = event.fields
                self.alerts[(event.run, str(f["rule"]), str(f["severity"]), str(f["state"]))] += 1

    def _observe_update(self, event: protocol.Event) -> None:
        m = self._stream(event.run, event.worker)
        fields = event.fields
        m.updates += 1
        nonfinite = False
        for stage, name in GRAD_STAGES:
            value = float(fields[name])
            nonfinite = nonfinite or not math.isfinite(value)
            m.grad_latest[stage] = value
            peak = m.grad_peak.get(stage)
            if peak is None or _worse(value, peak):
                m.grad_peak[stage] = value
        if nonfinite:
            m.nonfinite_updates += 1
        count = fields.get("nonfinite_grad_count")
        if isinstance(count, int) and count > 0:
            m.nonfinite_elements += count
        for name, (_metric, _help, scale) in GAUGE_FIELDS.items():
            value = fields.get(name)
            if value is not None and not isinstance(value, bool) and isinstance(value, (int, float)):
                m.gauges[name] = float(value) * scale

    def sync_streams(self, streams: dict[tuple[str, int | str], StreamState],
                     connected: bool, rejected: Counter[str]) -> None:
        """Copy the runtime's per-stream accounting (gaps, restarts, clocks) in, so that
        scrapes never iterate the runtime's dicts while the poll loop changes them."""
        with self.lock:
            self.connected = connected
            self.rejected = Counter(rejected)
            for (run, worker), state in list(streams.items()):
                if state.session is None:
                    continue  # only alert/summary events so far: not a producer stream
                m = self._stream(run, worker)
                m.dropped = state.dropped
                m.restarts = state.restarts
                m.last_received = state.last_received
                m.last_ts = state.last_ts


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
            for (run, worker), m in sorted(state.streams.items()):
                labels = [run, worker]
                for stage, _name in GRAD_STAGES:
                    if stage in m.grad_latest:
                        value = m.grad_peak.pop(stage, m.grad_latest[stage])
                        grad.add_metric([*labels, stage], value)
                for name, value in m.gauges.items():
                    gauges[name].add_metric(labels, value)
                if m.updates:
                    updates.add_metric(labels, m.updates)
                    nonfinite.add_metric(labels, m.nonfinite_updates)
                    elements.add_metric(labels, m.nonfinite_elements)
                if m.last_received is not None:
                    dropped.add_metric(labels, m.dropped)
                    restarts.add_metric(labels, m.restarts)
                    age.add_metric(labels, max(0.0, now - m.last_received))
                if m.last_ts is not None:
                    last_ts.add_metric(labels, m.last_ts)
            for (run, rule, severity, alert_state), count in sorted(state.alerts.items()):
                alerts.add_metric([run, rule, severity, alert_state], count)
            connected.add_metric([], 1.0 if state.connected else 0.0)
            events.add_metric([], state.events)
            for reason, count in sorted(state.rejected.items()):
                rejected.add_metric([reason], count)
        yield grad
        # Optional metrics nobody reports would only add empty HELP/TYPE noise.
        yield from (family for family in gauges.values() if family.samples)
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
    state = ExporterState()
    registry = CollectorRegistry()
    registry.register(BusCollector(state))
    sub = Subscriber.from_args(args, types=[protocol.PPO_UPDATE, protocol.HEARTBEAT,
                                            protocol.ALERT], run=args.run)
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
                for event in events:
                    state.observe(event)
                state.sync_streams(sub.streams, sub.connected, sub.stats.rejected)
        finally:
            server.shutdown()
            server.server_close()
    finally:
        sub.close()
    return 0
