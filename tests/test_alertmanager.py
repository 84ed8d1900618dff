"""The Alertmanager sink: payloads against a recording HTTP server, then end to end against
Debian's real ``prometheus-alertmanager`` fed by a real daemon and ``trainbus alert``."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from consumers.alerting import alertmanager as am
from consumers.alerting.alertmanager import AlertmanagerSink, alertmanager_url, rfc3339
from consumers.alerting.engine import AlertEngine, Notification
from consumers.alerting.rules import Rule, default_rules
from consumers.alerting.sinks import Dispatcher
from emitter.telemetry import TelemetryEmitter
from tests.conftest import ProcessGroup, ppo_fields, start_daemon, trainbus_cmd, wait_for

pytestmark = pytest.mark.timeout(60)

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def note(transition: str = "fired", severity: str = "warning", at: float = 1000.0,
         since: float | None = None, rule: str = "grad_norm_high", worker: int | str = 0,
         value: float | None = 7.0) -> Notification:
    state = {"fired": "firing", "escalated": "firing", "deescalated": "firing",
             "reminder": "firing", "resolved": "resolved", "pending": "pending",
             "cancelled": "resolved"}[transition]
    threshold = 10.0 if severity == "critical" else 5.0
    return Notification(run="r", worker=worker, rule=rule, metric="grad_norm", state=state,
                        severity=severity, since=at if since is None else since,
                        transition=transition, at=at, value=value, threshold=threshold,
                        reminder=transition == "reminder", summary=f"{rule} {transition}")


# ---------------------------------------------------------------------- recording server


@dataclass
class Request:
    at: float  # monotonic arrival time
    path: str
    body: Any


class FakeAlertmanager:
    """A local HTTP endpoint that records every POST body and answers scripted statuses
    (200 when the script is empty); ``gate`` cleared makes it hang."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.statuses: list[int] = []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.gate.wait(30)
                with server.lock:
                    server.requests.append(Request(time.monotonic(), self.path, json.loads(body)))
                    status = server.statuses.pop(0) if server.statuses else 200
                reply = b"{}" if status == 200 else b'{"error": "scripted failure"}'
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def snapshot(self) -> list[Request]:
        with self.lock:
            return list(self.requests)

    def posted(self) -> list[dict]:
        """Every alert of every POST, in order."""
        return [alert for r in self.snapshot() for alert in r.body]

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_am() -> Iterator[FakeAlertmanager]:
    server = FakeAlertmanager()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def sinks() -> Iterator[list[AlertmanagerSink]]:
    """Sinks made by a test, closed at teardown even when it fails."""
    made: list[AlertmanagerSink] = []
    try:
        yield made
    finally:
        for sink in made:
            sink.close(0.5)


# ---------------------------------------------------------------------- unit: URL


def test_url_validation():
    assert alertmanager_url("http://127.0.0.1:9093") == "http://127.0.0.1:9093/api/v2/alerts"
    assert alertmanager_url("https://am.example/") == "https://am.example/api/v2/alerts"
    assert alertmanager_url("http://h/prefix") == "http://h/prefix/api/v2/alerts"
    assert alertmanager_url("http://h:1/api/v2/alerts") == "http://h:1/api/v2/alerts"
    for bad in ("127.0.0.1:9093", "ftp://h", "http://", "http://h:port", "http://h/?q=1", ""):
        with pytest.raises(ValueError, match="Alertmanager URL"):
            alertmanager_url(bad)
    assert rfc3339(0.25) == "1970-01-01T00:00:00.250Z"


def test_bad_url_on_the_command_line_is_one_line_and_nonzero(procs):
    proc = procs.start(trainbus_cmd("alert", "--alertmanager", "localhost:9093"))
    assert proc.wait(15) == 2
    err = proc.stderr.snapshot()
    assert len(err) == 1, err
    assert err[0].startswith("trainbus alert: error: --alertmanager:") and "localhost:9093" in err[0]


# ---------------------------------------------------------------------- unit: payloads


def test_fire_repost_resolve_payloads(fake_am, sinks):
    resend = 0.2
    sink = AlertmanagerSink(fake_am.url, resend=resend, timeout=5)
    sinks.append(sink)
    since = time.time() - 30
    sent_at = time.time()
    sink.send(note("fired", "warning", at=since, since=since))
    first = wait_for(lambda: fake_am.snapshot(), 10, message="first POST")[0]
    assert first.path == "/api/v2/alerts"
    [alert] = first.body
    assert alert["labels"] == {"alertname": "grad_norm_high", "run": "r", "worker": "0",
                               "severity": "warning"}
    assert alert["annotations"] == {"summary": "grad_norm_high fired", "metric": "grad_norm",
                                    "value": "7", "threshold": "5"}
    assert alert["startsAt"] == rfc3339(since)
    ends = parse_time(alert["endsAt"])
    # endsAt = post time + 4 re-send intervals: far enough that a late re-post is no gap.
    assert sent_at + 4 * resend - 0.05 <= ends <= time.time() + 4 * resend + 0.05

    # Re-posted while firing, same identity and startsAt, endsAt moving forward.
    reposts = wait_for(lambda: fake_am.snapshot()[1:3] if len(fake_am.snapshot()) >= 3 else None,
                       10, message="two periodic re-posts")
    for request in reposts:
        assert [a["labels"]["severity"] for a in request.body] == ["warning"]
        assert request.body[0]["startsAt"] == rfc3339(since)
    assert parse_time(reposts[1].body[0]["endsAt"]) > ends
    assert reposts[1].at - reposts[0].at >= resend * 0.8
    wait_for(lambda: sink.resent >= 2, 10, message="re-posts counted")

    # Resolved: one POST with endsAt = the resolve time, then no more re-posts of it.
    resolved_at = time.time()
    sink.send(note("resolved", "warning", at=resolved_at, value=3.0))

    def resolve_posted() -> dict | None:
        return next((a for a in fake_am.posted() if a["endsAt"] == rfc3339(resolved_at)), None)

    resolved = wait_for(resolve_posted, 10, message="resolve POST")
    assert resolved["labels"]["severity"] == "warning"
    assert resolved["startsAt"] == rfc3339(since)
    assert resolved["annotations"]["value"] == "3"
    assert sink.firing() == []
    # Another alert keeps the re-send loop busy: its re-posts never carry the resolved one.
    sink.send(note("fired", "critical", at=time.time(), rule="approx_kl_high"))
    count = len(fake_am.snapshot())
    later = wait_for(lambda: fake_am.snapshot()[count:] if len(fake_am.snapshot()) >= count + 3
                     else None, 10, message="re-posts of the other alert")
    assert all(a["labels"]["alertname"] == "approx_kl_high" for r in later for a in r.body)


def test_escalation_resolves_one_identity_and_fires_the_other(fake_am, sinks):
    sink = AlertmanagerSink(fake_am.url, resend=60, timeout=5)
    sinks.append(sink)
    t0 = time.time() - 60
    sink.send(note("fired", "warning", at=t0))
    sink.send(note("escalated", "critical", at=t0 + 10, value=12.0))
    sink.send(note("deescalated", "warning", at=t0 + 20, value=8.0))
    requests = wait_for(lambda: fake_am.snapshot() if len(fake_am.snapshot()) >= 3 else None,
                        10, message="three POSTs")
    fired, escalated, deescalated = (r.body for r in requests)
    assert [a["labels"]["severity"] for a in fired] == ["warning"]
    # Escalation: the warning identity ends at the escalation, the critical one starts there.
    assert [(a["labels"]["severity"], a["endsAt"] == rfc3339(t0 + 10)) for a in escalated] == [
        ("warning", True), ("critical", False)]
    assert escalated[0]["startsAt"] == rfc3339(t0)
    assert escalated[1]["startsAt"] == rfc3339(t0 + 10)
    assert parse_time(escalated[1]["endsAt"]) > time.time()
    assert escalated[1]["annotations"]["threshold"] == "10"
    # De-escalation: the other way round.
    assert [(a["labels"]["severity"], a["endsAt"] == rfc3339(t0 + 20)) for a in deescalated] == [
        ("critical", True), ("warning", False)]
    assert [a.severity for a in sink.firing()] == ["warning"]
    # A lost notification cannot leave a stale identity: a firing note for a key replaces
    # whatever severity the table had, and a resolve ends the key whatever its severity.
    sink.send(note("reminder", "critical", at=t0 + 30))
    sink.send(note("resolved", "warning", at=t0 + 40, value=1.0))
    requests = wait_for(lambda: fake_am.snapshot() if len(fake_am.snapshot()) >= 5 else None,
                        10, message="two more POSTs")
    assert [a["labels"]["severity"] for a in requests[3].body] == ["warning", "critical"]
    assert [(a["labels"]["severity"], a["endsAt"]) for a in requests[4].body] == [
        ("critical", rfc3339(t0 + 40))]
    assert sink.firing() == []


def test_pending_and_cancelled_never_reach_alertmanager(fake_am, sinks):
    sink = AlertmanagerSink(fake_am.url, resend=60, timeout=5)
    sinks.append(sink)
    dispatcher = Dispatcher([sink])
    engine = AlertEngine(default_rules())
    # 2 breaching updates (for = 3: pending), then healthy ones: pending, then cancelled.
    notes = []
    for i, value in enumerate([7.0, 7.0] + [1.0] * 5):
        notes += engine.observe_fields("r", 0, ppo_fields(i, grad_norm=value), now=float(i))
    assert {n.transition for n in notes} >= {"pending", "cancelled"}
    for n in notes:
        dispatcher.send(n)
        sink.send(n)  # even when called directly, not only through the Dispatcher's filter
    assert sink.firing() == []
    # Then a firing one: it is the first thing Alertmanager ever receives.
    sink.send(note("fired", "critical", at=time.time()))
    first = wait_for(lambda: fake_am.snapshot(), 10, message="a POST")[0]
    assert [a["labels"]["severity"] for a in first.body] == ["critical"]
    assert sink.flush(5) and len(fake_am.snapshot()) == 1


def test_nonfinite_value_and_no_threshold():
    alert = am.postable(Notification(
        run="r", worker="all", rule="nonfinite", metric="pre_clip_grad_norm", state="firing",
        severity="critical", since=5.0, transition="fired", at=5.0, value=-math.inf,
        summary="pre_clip_grad_norm = -inf"), starts_at=5.0, ends_at=None)
    assert alert.labels["worker"] == "all"
    assert alert.annotations == {"summary": "pre_clip_grad_norm = -inf",
                                 "metric": "pre_clip_grad_norm", "value": "-inf"}
    body = alert.body(now=100.0, ends_after=240.0)
    assert (body["startsAt"], body["endsAt"]) == (rfc3339(5.0), rfc3339(340.0))
    # A resolve stamped before its start (clock stepped back) is clamped, not rejected.
    assert am.PostableAlert({}, {}, 10.0, 9.0).body(0, 0)["endsAt"] == rfc3339(10.0)


# ---------------------------------------------------------------------- unit: failures


def test_retries_with_backoff_then_delivers(fake_am, sinks):
    fake_am.statuses = [500, 503, 200]
    sink = AlertmanagerSink(fake_am.url, resend=60, timeout=5, retries=4, backoff=0.1)
    sinks.append(sink)
    sink.send(note("fired", at=time.time()))
    wait_for(lambda: sink.delivered == 1, 10, message="delivery after two 5xx")
    requests = fake_am.snapshot()
    assert len(requests) == 3 and sink.attempts == 3 and sink.failed == 0
    # The same payload each time, with doubling waits between attempts (0.1 s, 0.2 s).
    assert requests[0].body == requests[1].body == requests[2].body
    gaps = [b.at - a.at for a, b in zip(requests, requests[1:], strict=False)]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19, gaps
    # A 400 (Alertmanager rejected the payload) is not retried.
    fake_am.statuses = [400]
    sink.send(note("resolved", at=time.time()))
    wait_for(lambda: sink.failed == 1, 10, message="400 given up at once")
    assert len(fake_am.snapshot()) == 4


def test_errors_are_logged_rate_limited(caplog):
    errors = am._ErrorLog(interval=3600)
    with caplog.at_level(logging.WARNING, logger=am.__name__):
        for i in range(50):
            errors.warn("alertmanager %s: down", i)
    assert [r.getMessage() for r in caplog.records] == ["alertmanager 0: down"]
    assert errors.held == 49
    errors.last -= 7200  # the interval has passed: the next one is logged with the count
    with caplog.at_level(logging.WARNING, logger=am.__name__):
        errors.warn("alertmanager %s: down", 50)
    assert caplog.records[-1].getMessage() == "alertmanager 50: down (49 similar errors not logged)"


def test_dead_alertmanager_never_blocks_evaluation(fake_am, sinks):
    # One endpoint that accepts and never answers, one where nothing listens.
    fake_am.gate.clear()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{probe.getsockname()[1]}"
    hanging = AlertmanagerSink(fake_am.url, resend=0.05, timeout=30, queue_size=4)
    dead = AlertmanagerSink(refused, resend=0.05, timeout=1, retries=2, backoff=0.01)
    sinks.extend([hanging, dead])
    dispatcher = Dispatcher([hanging, dead])
    engine = AlertEngine([Rule("nonfinite", kind="nonfinite", metric="*", critical=0.0, for_=1,
                               clear_for=1, metrics=("grad_norm",),
                               **_no_paging_floor())])
    started = time.monotonic()
    paged = 0
    for i in range(2000):  # NaN and healthy alternating: a page per update
        value = math.nan if i % 2 else 1.0
        for n in engine.observe_fields("r", 0, ppo_fields(i, grad_norm=value), now=float(i)):
            dispatcher.send(n)
            paged += n.pages
    elapsed = time.monotonic() - started
    assert paged >= 1000
    # Blocking on either sink would cost 30 s (one hung POST) or ~30 ms per page (refused
    # connections, retried): far beyond this bound, which only a loaded machine approaches.
    assert elapsed < 10.0, f"evaluation took {elapsed:.2f} s behind a dead Alertmanager"
    assert fake_am.snapshot() == []  # the hung endpoint has answered nothing meanwhile
    assert hanging.dropped >= paged - 5  # bounded queue: oldest dropped, counted
    wait_for(lambda: dead.failed >= 1, 10, message="the refused endpoint given up")
    assert dispatcher.errors == 0


def _no_paging_floor() -> dict[str, float]:
    """Rules carry a paging floor (``group_interval``) in newer engines; tests that count
    every transition turn it off where it exists."""
    return {"group_interval": 0.0} if "group_interval" in {f.name for f in fields(Rule)} else {}


# ---------------------------------------------------------------------- real Alertmanager


@dataclass
class RealAlertmanager:
    url: str

    def alerts(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as response:
            return json.load(response)

    def find(self, **labels: str) -> list[dict]:
        return [a for a in self.alerts()
                if all(a["labels"].get(k) == v for k, v in labels.items())]


def start_alertmanager(procs: ProcessGroup, workdir: Path, receiver: str) -> RealAlertmanager:
    """Run the real binary on an OS-chosen loopback port (it logs the address it got),
    clustering off, its own storage; its webhook receiver is ``receiver``."""
    config = workdir / "alertmanager.yml"
    config.write_text(
        "route:\n"
        "  receiver: test\n"
        "  group_by: [alertname, run, worker]\n"
        "  group_wait: 0s\n"
        "  group_interval: 1s\n"
        "  repeat_interval: 1h\n"
        "receivers:\n"
        "  - name: test\n"
        "    webhook_configs:\n"
        f"      - url: {receiver}/hook\n"
        "        send_resolved: true\n")
    proc = procs.start([ALERTMANAGER, f"--config.file={config}",
                        f"--storage.path={workdir / 'data'}",
                        "--web.listen-address=127.0.0.1:0", "--cluster.listen-address=",
                        "--log.level=info"])
    match = proc.stderr.wait_for_line(r'msg="Listening on" address=(127\.0\.0\.1:\d+)', 20)
    url = f"http://{match.group(1)}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(ready, 20, interval=0.05, message="Alertmanager /-/ready")
    return RealAlertmanager(url)


@pytest.mark.skipif(ALERTMANAGER is None, reason="prometheus-alertmanager not installed: "
                                                 "apt-get install prometheus-alertmanager")
def test_real_alertmanager_fire_repost_escalate_resolve(procs, tmp_path, fake_am):
    real = start_alertmanager(procs, tmp_path, fake_am.url)  # fake_am: its webhook receiver
    daemon = start_daemon(procs)
    rules = tmp_path / "rules.toml"
    # Patience 1 for grad_norm_high so escalation takes one update each way; no paging floor
    # (where the engine has one) so the resolve is sent at once.
    floor = "group_interval = 0\n" if _no_paging_floor() else ""
    rules.write_text(f"[defaults]\n{floor}\n[rules.grad_norm_high]\nfor = 1\n")
    alert = procs.start(trainbus_cmd("alert", "--alertmanager", real.url, "--alertmanager-resend",
                                     "3", "--rules", str(rules), "--no-publish"),
                        env=daemon.env)
    alert.stderr.wait_for_line(r"ready: \d+ rules.*sinks=.*alertmanager", 15)
    with TelemetryEmitter("amrun", 3, daemon.publish, heartbeat_interval=None) as emitter:
        assert emitter.wait_for_bus(10)
        update = 0

        def emit(grad_norm: float, count: int = 1) -> None:
            nonlocal update
            for _ in range(count):
                emitter.emit_ppo_update(**ppo_fields(update, grad_norm=grad_norm))
                update += 1

        emit(1.0, 3)
        emit(math.nan)  # nonfinite: critical at once
        who = {"run": "amrun", "worker": "3"}
        [active] = wait_for(lambda: real.find(alertname="nonfinite", **who), 15,
                            message="nonfinite active in Alertmanager")
        assert active["status"]["state"] == "active"
        assert active["labels"] == {"alertname": "nonfinite", "severity": "critical", **who}
        assert active["annotations"]["metric"] == "grad_norm"
        assert active["annotations"]["value"] == "nan"
        assert abs(parse_time(active["startsAt"]) - time.time()) < 15
        first_ends = parse_time(active["endsAt"])
        assert first_ends > time.time()
        # Re-posted while firing: Alertmanager's endsAt keeps moving forward.
        wait_for(lambda: [a for a in real.find(alertname="nonfinite", **who)
                          if parse_time(a["endsAt"]) > first_ends + 0.4], 15,
                 message="a re-post extending endsAt")

        def hook_statuses() -> set[tuple[str, str, str]]:
            """(alertname, severity, status) of what Alertmanager notified its receiver."""
            return {(a["labels"]["alertname"], a["labels"]["severity"], a["status"])
                    for r in fake_am.snapshot() if r.path == "/hook" for a in r.body["alerts"]}

        wait_for(lambda: ("nonfinite", "critical", "firing") in hook_statuses(), 15,
                 message="Alertmanager notifying its receiver")

        # Escalation against the real thing: warning, then critical replaces it.
        emit(7.0)
        wait_for(lambda: real.find(alertname="grad_norm_high", severity="warning", **who), 15,
                 message="grad_norm_high warning active")
        wait_for(lambda: ("grad_norm_high", "warning", "firing") in hook_statuses(), 15,
                 message="the warning notified")
        emit(12.0)
        wait_for(lambda: real.find(alertname="grad_norm_high", severity="critical", **who)
                 and not real.find(alertname="grad_norm_high", severity="warning", **who), 15,
                 message="critical active, warning resolved")

        # 10 clean updates resolve nonfinite (and, for = 1, grad_norm_high).
        ends_ahead = min(parse_time(a["endsAt"]) for a in real.find(**who))
        emit(1.0, 10)
        wait_for(lambda: not real.find(alertname="nonfinite", **who)
                 and not real.find(alertname="grad_norm_high", **who), 15,
                 message="alerts resolved (gone from the active list)")
        # Gone because they were resolved, not expired: the endsAt Alertmanager held (4
        # re-send intervals, >= 9 s ahead) was still in the future. Alertmanager then
        # tells its receiver "resolved", the warning's included (ended at the escalation).
        assert time.time() < ends_ahead
        wait_for(lambda: {("nonfinite", "critical", "resolved"),
                          ("grad_norm_high", "warning", "resolved")} <= hook_statuses(), 15,
                 message="Alertmanager's resolved notifications")
    alert.signal(signal.SIGTERM)
    assert alert.wait(10) == 0
    assert not re.search(r"Traceback", alert.stderr.text())
