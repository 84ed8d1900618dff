"""Prometheus exporter: exposition semantics (unit) and a real scrape over loopback (e2e)."""

from __future__ import annotations

import math
import urllib.request

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bus import protocol
from bus.publisher import EventPublisher
from consumers.prometheus_exporter import BusCollector, ExporterState
from emitter.telemetry import TelemetryEmitter
from tests.conftest import ppo_fields, ppo_payload, trainbus_cmd, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(text: str) -> Samples:
    """{(sample name, sorted labels): value} from exposition text."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _grad(samples: Samples, stage: str, run: str = "r", worker: str = "0") -> float | None:
    return _get(samples, "trainbus_ppo_grad_norm", run=run, worker=worker, stage=stage)


class _Harness:
    """The exporter's state and collector without HTTP or sockets: exact semantics."""

    def __init__(self) -> None:
        self.state = ExporterState()
        self.registry = CollectorRegistry()
        self.registry.register(BusCollector(self.state))
        self.seq = 0

    def update(self, grad_norm: float, **overrides: object) -> None:
        payload = ppo_payload(seq=self.seq, grad_norm=grad_norm,
                              pre_clip_grad_norm=grad_norm * 2, **overrides)
        self.seq += 1
        self.state.observe(protocol.decode(protocol.encode(payload)))

    def scrape(self) -> Samples:
        return _parse(generate_latest(self.registry).decode())


def test_grad_norm_reports_max_since_last_scrape_then_latest():
    h = _Harness()
    assert _grad(h.scrape(), "post") is None  # nothing seen: no series at all
    for value in (1.0, 9.0, 2.0):
        h.update(value)
    first = h.scrape()
    assert _grad(first, "post") == 9.0 and _grad(first, "pre") == 18.0  # the spike survives
    assert _grad(h.scrape(), "post") == 2.0  # no new update: the latest value
    h.update(0.5)
    assert _grad(h.scrape(), "post") == 0.5  # reset: the old spike is not carried over


def test_non_finite_wins_and_is_exported_as_nan_and_inf():
    h = _Harness()
    h.update(1.0)
    h.update(math.nan, nonfinite_grad_count=7)
    h.update(3.0)
    s = h.scrape()
    assert math.isnan(_grad(s, "post"))  # NaN since the last scrape, though 3.0 came after
    assert _grad(h.scrape(), "post") == 3.0
    h.update(math.inf, max_grad_norm=math.inf)
    h.update(4.0, max_grad_norm=math.inf)  # a gauge shows the latest: +Inf = no clipping
    s = h.scrape()
    assert _grad(s, "post") == math.inf
    assert _get(s, "trainbus_ppo_max_grad_norm", run="r", worker="0") == math.inf
    assert _get(s, "trainbus_nonfinite_grads_total", run="r", worker="0") == 2
    assert _get(s, "trainbus_nonfinite_grad_elements_total", run="r", worker="0") == 7
    assert _get(s, "trainbus_ppo_updates_total", run="r", worker="0") == 5


def test_gauges_counters_and_alert_notifications():
    h = _Harness()
    h.update(1.0, approx_kl=0.02, update_time_ms=250.0, explained_variance=None)
    alert = {"v": 1, "type": "alert", "run": "r", "worker": 0, "session": "a", "ts": 1.0,
             "state": "firing", "severity": "critical", "rule": "grad_norm_nonfinite",
             "metric": "grad_norm", "since": 1.0}
    for seq, state in enumerate(("firing", "firing", "resolved")):
        h.state.observe(protocol.decode(protocol.encode({**alert, "seq": seq, "state": state})))
    s = h.scrape()
    stream = {"run": "r", "worker": "0"}
    assert _get(s, "trainbus_ppo_approx_kl", **stream) == 0.02
    assert _get(s, "trainbus_ppo_update_duration_seconds", **stream) == 0.25
    assert _get(s, "trainbus_ppo_learning_rate", **stream) == 2.5e-4
    assert _get(s, "trainbus_ppo_explained_variance", **stream) is None  # never measured
    labels = {"run": "r", "rule": "grad_norm_nonfinite", "severity": "critical"}
    assert _get(s, "trainbus_alert_notifications_total", state="firing", **labels) == 2
    assert _get(s, "trainbus_alert_notifications_total", state="resolved", **labels) == 1
    assert _get(s, "trainbus_exporter_events_total") == 4


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return _parse(response.read().decode())


def test_scrape_over_loopback_gives_expected_series(daemon, procs):
    exporter = procs.start(trainbus_cmd("prometheus", "--port", "0"), env=daemon.env)
    port = int(exporter.stdout.wait_for_line(r"port=(\d+)", 10).group(1))
    wait_for(lambda: _get(_scrape(port), "trainbus_exporter_connected") == 1, 10,
             message="exporter connected")
    stream = {"run": "prom", "worker": "2"}
    with TelemetryEmitter("prom", 2, daemon.publish, heartbeat_interval=None) as emitter, \
            EventPublisher(daemon.publish) as alerts:
        assert emitter.wait_for_bus(10) and alerts.wait_for_bus(10)
        for update, grad in enumerate((1.0, 9.0, 2.0)):  # a spike between two scrapes
            emitter.emit_ppo_update(**ppo_fields(update, grad, approx_kl=0.01 * (update + 1)))
        alerts.publish("alert", "prom", 2, {"state": "firing", "severity": "warning",
                                            "rule": "grad_norm_high", "metric": "grad_norm",
                                            "since": 1.0, "value": 9.0, "threshold": 5.0})
        peaks: list[float] = []

        def all_seen() -> Samples | None:
            s = _scrape(port)
            peak = _grad(s, "post", **stream)
            if peak is not None:
                peaks.append(peak)
            done = (_get(s, "trainbus_ppo_updates_total", **stream) == 3 and
                    _get(s, "trainbus_alert_notifications_total", run="prom",
                         rule="grad_norm_high", severity="warning", state="firing") == 1)
            return s if done else None

        wait_for(all_seen, 10, message="3 updates and an alert in /metrics")
    # However the scrapes fell between the events, one of them reported the spike.
    assert max(peaks) == 9.0
    s = _scrape(port)
    assert _grad(s, "post", **stream) == 2.0 and _grad(s, "pre", **stream) == 3.0
    assert _get(s, "trainbus_ppo_approx_kl", **stream) == 0.03
    assert _get(s, "trainbus_ppo_update", **stream) == 2
    assert _get(s, "trainbus_dropped_events_total", **stream) == 0
    assert 0 <= _get(s, "trainbus_last_event_age_seconds", **stream) < 10
    assert _get(s, "trainbus_nonfinite_grads_total", **stream) == 0


def test_non_loopback_bind_needs_an_explicit_flag(procs):
    exporter = procs.start(trainbus_cmd("prometheus", "--port", "0", "--bind", "0.0.0.0"))
    assert exporter.wait(10) == 2
    assert "--insecure" in exporter.stderr.text()
