"""Alert sinks against real endpoints, and `trainbus alert` end to end on a real daemon."""

from __future__ import annotations

import json
import math
import signal
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bus.protocol import from_json_value
from consumers.alerting.engine import AlertEngine, Notification
from consumers.alerting.rules import default_rules
from consumers.alerting.sinks import Dispatcher, ExecSink, JsonlSink, WebhookSink
from consumers.runtime import Subscriber
from emitter.telemetry import TelemetryEmitter
from tests.conftest import ppo_fields, trainbus_cmd, wait_for


def note(i: int = 0, state: str = "firing", transition: str = "fired") -> Notification:
    return Notification(run="r", worker=0, rule="grad_norm_high", metric="grad_norm", state=state,
                        severity="critical", since=1000.0 + i, transition=transition,
                        at=1000.0 + i, value=12.0 + i, threshold=10.0,
                        summary=f"grad_norm = {12 + i} > 10")


# ---------------------------------------------------------------------- webhook


class Hook:
    """A local HTTP endpoint: answers with scripted statuses, optionally held at a gate."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.bodies: list[dict] = []
        self.requests = 0
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.gate.wait(20)
                with hook.lock:
                    hook.requests += 1
                    status = hook.statuses.pop(0) if hook.statuses else 200
                    if status == 200:
                        hook.bodies.append(json.loads(body))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    try:
        yield server
    finally:
        server.close()


def test_webhook_posts_json_with_slack_text(hook):
    sink = WebhookSink(hook.url, timeout=5)
    sink.send(note())
    wait_for(lambda: hook.bodies, 10, message="webhook delivery")
    sink.close(5)
    body = hook.bodies[0]
    assert body["text"].startswith("[CRITICAL] firing grad_norm_high r/0")
    assert (body["state"], body["severity"], body["rule"], body["value"]) == (
        "firing", "critical", "grad_norm_high", 12.0)
    assert sink.delivered == 1 and sink.failed == 0


def test_slow_webhook_never_delays_evaluation(hook):
    hook.gate.clear()  # the endpoint hangs until released
    sink = WebhookSink(hook.url, timeout=15, queue_size=4)
    dispatcher = Dispatcher([sink])
    # No paging floor here: this is about the sink's queue under a storm of pages.
    engine = AlertEngine({name: replace(rule, group_interval=0.0)
                          for name, rule in default_rules().items()})
    # 2000 updates alternating healthy / critical runs: many transitions, all evaluated
    # and dispatched while the endpoint has not answered a single request.
    sent = 0
    last_page = None
    for i in range(2000):
        value = 50.0 if (i // 10) % 2 else 1.0
        for n in engine.observe_fields("r", 0, ppo_fields(i, grad_norm=value), now=float(i)):
            dispatcher.send(n)
            sent += n.pages
            last_page = n if n.pages else last_page
    assert not hook.gate.is_set() and hook.requests == 0
    assert sent > 100
    assert sink.dropped >= sent - 5  # bounded queue: oldest dropped, counted
    hook.gate.set()
    wait_for(lambda: sink.delivered + sink.dropped == sent, 15, message="queue drained")
    sink.close(5)
    # The newest notification survived the drops (the latest state is what matters).
    assert last_page is not None and hook.bodies[-1]["text"] == last_page.text()


def test_failing_webhook_retries_with_backoff_and_survives(hook):
    hook.statuses = [500, 503, 200]
    sink = WebhookSink(hook.url, timeout=5, retries=3, backoff=0.01)
    sink.send(note(1))
    wait_for(lambda: sink.delivered == 1, 10, message="delivery after retries")
    assert hook.requests == 3 and sink.attempts == 3
    # Every attempt fails: given up after 1 + retries, counted, and the next alert works.
    hook.statuses = [500] * 4
    sink.send(note(2))
    sink.send(note(3))
    wait_for(lambda: sink.delivered == 2, 10, message="next delivery")
    assert sink.failed == 1 and hook.requests == 3 + 4 + 1
    assert [b["value"] for b in hook.bodies] == [13.0, 15.0]
    # A client error is not retried.
    hook.statuses = [400]
    sink.send(note(4))
    wait_for(lambda: sink.failed == 2, 10, message="400 given up at once")
    assert hook.requests == 9
    sink.close(5)


def test_unreachable_webhook_is_survived():
    sink = WebhookSink("http://127.0.0.1:9/nothing", timeout=1, retries=1, backoff=0.01)
    sink.send(note())
    wait_for(lambda: sink.failed == 1, 10, message="give up")
    sink.close(1)


# ---------------------------------------------------------------------- exec and log


def test_exec_gets_alert_json_on_stdin_and_failures_are_survived(tmp_path):
    out = tmp_path / "out.jsonl"
    sink = ExecSink(f'cat >> "{out}"; echo "$TRAINBUS_ALERT_SEVERITY" >> "{out}.env"', timeout=5)
    sink.send(note())
    wait_for(lambda: sink.delivered == 1, 10, message="exec ran")
    record = json.loads(out.read_text().splitlines()[0])
    assert (record["rule"], record["state"], record["run"], record["worker"]) == (
        "grad_norm_high", "firing", "r", 0)
    assert (tmp_path / "out.jsonl.env").read_text().strip() == "critical"
    sink.close(2)

    failing = ExecSink("cat >/dev/null; exit 3", timeout=5)
    failing.send(note())
    wait_for(lambda: failing.failed == 1, 10, message="failure counted")
    failing.close(2)

    hanging = ExecSink(f'sleep 30; echo late >> "{out}"', timeout=0.3)
    hanging.send(note(1))
    wait_for(lambda: hanging.failed == 1, 10, message="hung command killed")
    # The next alert gets through on the same sink. Its bound is a bound, not a timing
    # expectation: under load, 0.3 s once ran out while the shell was still starting.
    hanging.command = f'cat >> "{out}"'
    hanging.timeout = 5
    hanging.send(note(2))
    wait_for(lambda: hanging.delivered == 1, 10, message="next command ran")
    hanging.close(2)
    assert "late" not in out.read_text()


def test_jsonl_log_appends_strict_json(tmp_path):
    path = tmp_path / "alerts.jsonl"
    path.write_text('{"earlier": true}\n')
    sink = JsonlSink(path)
    nan_note = Notification(run="r", worker=2, rule="nonfinite", metric="grad_norm",
                            state="firing", severity="critical", since=5.0, transition="fired",
                            at=5.0, value=math.nan)
    sink.send(nan_note)
    # Flushed per alert: visible before close.
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"earlier": True}
    record = json.loads(lines[1])
    assert record["value"] == "nan" and math.isnan(from_json_value(record["value"]))
    sink.close(1)


# ---------------------------------------------------------------------- the command


def test_bad_rules_file_is_one_line_and_nonzero(tmp_path, procs):
    rules = tmp_path / "rules.toml"
    rules.write_text("[rules.grad_norm_high]\nfor = \"three\"\n")
    proc = procs.start(trainbus_cmd("alert", "--rules", str(rules)))
    assert proc.wait(15) == 2
    err = proc.stderr.snapshot()
    assert len(err) == 1, err
    assert err[0].startswith("trainbus alert: error:") and "rules.grad_norm_high.for" in err[0]


def _alerts_in(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_end_to_end_nan_grad_norm_and_silent_worker(daemon, procs, tmp_path):
    log_path = tmp_path / "alerts.jsonl"
    rules = tmp_path / "rules.toml"
    # No paging floor: "resolved as soon as it speaks again" is what is checked here (the
    # floor has tests of its own).
    rules.write_text("[defaults]\ngroup_interval = 0\n")
    alert = procs.start(trainbus_cmd("alert", "--log", str(log_path), "--silent-after", "1",
                                     "--rules", str(rules)), env=daemon.env)
    alert.stderr.wait_for_line(r"ready: \d+ rules", 15)
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["alert"]) as bus, \
            TelemetryEmitter("e2e", 1, daemon.publish, heartbeat_interval=None) as emitter:
        assert emitter.wait_for_bus(10)
        for update in range(5):
            emitter.emit_ppo_update(**ppo_fields(update))
        emitter.emit_ppo_update(**ppo_fields(5, grad_norm=math.nan))

        def nonfinite_logged() -> list[dict]:
            return [a for a in _alerts_in(log_path) if a["rule"] == "nonfinite"]

        logged = wait_for(nonfinite_logged, 15, message="nonfinite alert in the JSONL log")
        assert len(logged) == 1
        first = logged[0]
        assert (first["state"], first["severity"], first["metric"], first["run"], first["worker"]) \
            == ("firing", "critical", "grad_norm", "e2e", 1)
        assert first["value"] == "nan"
        alert.stdout.wait_for_line(r"CRITICAL\s+firing\s+fired\s+nonfinite e2e/1", 10)

        received = []

        def on_bus() -> list:
            received.extend(bus.poll(50))
            return [e for e in received if e.get("rule") == "nonfinite"]

        events = wait_for(on_bus, 15, message="alert event on the bus")
        event = events[0]
        assert event.topic == "alert/e2e/1"
        assert (event.get("state"), event.get("severity"), event.get("metric")) == (
            "firing", "critical", "grad_norm")
        assert math.isnan(event.get("value")) and event.get("since") > 0

        # The worker goes quiet: one silent alert (own clock, --silent-after 1) ...
        def silent(state: str) -> list[dict]:
            return [a for a in _alerts_in(log_path)
                    if a["rule"] == "worker_silent" and a["state"] == state]

        wait_for(lambda: silent("firing"), 15, message="worker_silent firing")
        # ... resolved as soon as it speaks again.
        emitter.emit_ppo_update(**ppo_fields(6))
        wait_for(lambda: silent("resolved"), 15, message="worker_silent resolved")
        assert len(silent("firing")) == 1

    alert.signal(signal.SIGTERM)
    assert alert.wait(10) == 0
