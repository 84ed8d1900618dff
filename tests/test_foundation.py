"""End to end foundation: emitter, daemon, publish and tail as real processes."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import statistics
import time
from collections.abc import Callable

import msgpack
import pytest
import zmq

from bus import protocol, transport
from consumers.runtime import Subscriber
from emitter.identity import RunNameWarning
from emitter.telemetry import TelemetryEmitter
from tests.conftest import ppo_fields, snapshot_reply, start_daemon, trainbus_cmd, wait_for

# ------------------------------------------------------------------ emitter


def test_emitter_without_daemon_never_blocks_or_raises(tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody-listens"
    with TelemetryEmitter("lonely", 0, endpoint, sndhwm=100) as emitter:
        durations = []
        for update in range(3000):
            start = time.perf_counter()
            assert emitter.emit_ppo_update(**ppo_fields(update)) in (True, False)
            durations.append(time.perf_counter() - start)
    # Not a benchmark (see `make bench`): a blocked send would take the socket's whole
    # timeout (forever); microseconds-scale calls show it never waited on anyone.
    assert statistics.median(durations) < 1e-3
    assert emitter.sent + emitter.dropped == 3000


@pytest.mark.parametrize("fields, error, name", [
    ({"grad_norm": None}, TypeError, "grad_norm"),
    ({"grad_norm": "1.0x"}, TypeError, "grad_norm"),
    ({"update": 1.5}, TypeError, "update"),
    ({"update": True}, TypeError, "update"),
    ({"env_steps": -1}, ValueError, "env_steps"),
    ({"seq": 3}, ValueError, "seq"),
    ({"explained_variance": "high"}, TypeError, "explained_variance"),
    ({"pre_clip_grad_norm_max": "big"}, TypeError, "pre_clip_grad_norm_max"),
])
def test_emitter_rejects_bad_fields_on_the_callers_side(tmp_path, fields, error, name):
    with TelemetryEmitter("r", 0, f"ipc://{tmp_path}/x", heartbeat_interval=None) as emitter, \
            pytest.raises(error, match=name):
        emitter.emit_ppo_update(**{**ppo_fields(), **fields})


def test_emitter_names_a_missing_required_field(tmp_path):
    fields = ppo_fields()
    del fields["approx_kl"]
    with TelemetryEmitter("r", 0, f"ipc://{tmp_path}/x", heartbeat_interval=None) as emitter, \
            pytest.raises(TypeError, match="approx_kl"):
        emitter.emit_ppo_update(**fields)


def test_emitter_rejects_a_bad_worker_and_sanitises_a_bad_run(tmp_path):
    # A run name is sanitised with one warning (never an exception that stops training);
    # a bad worker id is a set-up error. Details: tests/test_identity.py.
    with pytest.warns(RunNameWarning):
        emitter = TelemetryEmitter("bad run!", 0, f"ipc://{tmp_path}/x", heartbeat_interval=None)
    emitter.close()
    assert emitter.run == "bad-run-"
    with pytest.raises(protocol.ProtocolError):
        TelemetryEmitter("r", -2, f"ipc://{tmp_path}/x")


def _collect(sub: Subscriber, want: int, timeout: float = 10.0) -> list[protocol.Event]:
    got: list[protocol.Event] = []
    wait_for(lambda: got.extend(sub.poll(50)) or len(got) >= want, timeout,
             message=f"{want} events")
    return got


def _collect_until(sub: Subscriber, done: Callable[[list[protocol.Event]], bool],
                   what: str, timeout: float = 10.0) -> list[protocol.Event]:
    """Collect until ``done(events so far)``: for streams where an earlier event may or may
    not be dropped, so no fixed count says when the one that matters has arrived."""
    got: list[protocol.Event] = []
    wait_for(lambda: got.extend(sub.poll(50)) or done(got), timeout, message=what)
    return got


def _emit_in_child(publish: str, worker: int) -> None:
    with TelemetryEmitter("children", worker, publish, heartbeat_interval=None) as emitter:
        emitter.wait_for_bus(10)
        for update in range(5):
            emitter.emit_ppo_update(**ppo_fields(update))


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_emitter_created_in_a_child_process(daemon, method):
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_update"], run="children") as sub:
        wait_for(lambda: sub.poll(20) is not None and sub.connected, 10, message="connection")
        child = multiprocessing.get_context(method).Process(target=_emit_in_child,
                                                            args=(daemon.publish, 7))
        child.start()
        try:
            got = _collect(sub, 5)
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
        assert child.exitcode == 0
        assert [e.get("update") for e in got] == list(range(5))
        assert {e.worker for e in got} == {7}


def test_emitter_inherited_through_fork_reopens_as_a_new_session(daemon):
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_update"]) as sub, \
            TelemetryEmitter("forked", 0, daemon.publish, heartbeat_interval=None) as emitter:
        assert emitter.wait_for_bus(10)
        wait_for(lambda: sub.poll(20) is not None and sub.connected, 10, message="connection")
        emitter.emit_ppo_update(**ppo_fields(0))
        parent_session = emitter.session
        pid = os.fork()
        if pid == 0:  # child: the inherited emitter must reopen on its own Context
            code = 1
            try:
                emitter.emit_ppo_update(**ppo_fields(1))  # reopens; may be dropped (not connected yet)
                code = 0 if emitter.wait_for_bus(10) and emitter.emit_ppo_update(**ppo_fields(2)) else 1
                emitter.close()
                # os._exit skips every exit hook, the Context teardown that delivers what a
                # closed socket still queues among them (a loaded machine showed update 2
                # lost that way): end the child's Context first, as a normal exit would.
                transport.context().term()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # Update 1 may or may not get through (sent while the reopened socket connects):
        # wait for the child's update 2, whatever came before it.
        got = _collect_until(
            sub, lambda events: any(e.get("update") == 2 and e.session != parent_session
                                    for e in events),
            "the forked child's update 2")
        sessions = {e.session for e in got}
        assert parent_session in sessions and len(sessions) == 2
        assert any(e.get("update") == 2 and e.session != parent_session for e in got)


def test_heartbeats_while_alive(daemon):
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["heartbeat"]) as sub, \
            TelemetryEmitter("beating", 2, daemon.publish, heartbeat_interval=0.1) as emitter:
        got = _collect(sub, 3)
        assert {e.worker for e in got} == {2}
        assert all(e.get("interval_s") == pytest.approx(0.1) for e in got)
        assert got[0].session == emitter.session


# ------------------------------------------------------------------ publish + tail


def test_publishers_to_tail_every_event_accounted_for(procs, daemon):
    count, workers = 40, 2
    tail = procs.start(trainbus_cmd("tail", "--json", "--count", str(3 * count * workers),
                                    "--timeout", "30"), env=daemon.env)
    tail.stderr.wait_for_line("connected to", 10)
    for index in range(3):
        procs.start(trainbus_cmd("publish", "--run", f"run{index}", "--workers", str(workers),
                                 "--rate", "200", "--count", str(count)), env=daemon.env)
    assert tail.wait(timeout=40) == 0, tail.stderr.text()
    events = [json.loads(line) for line in tail.stdout.snapshot()]
    assert len(events) == 3 * count * workers
    seqs: dict[tuple[str, int], list[int]] = {}
    for event in events:
        assert event["type"] == "ppo_update" and isinstance(event["grad_norm"], float)
        seqs.setdefault((event["run"], event["worker"]), []).append(event["seq"])
    assert len(seqs) == 3 * workers
    assert all(s == list(range(count)) for s in seqs.values())


def test_tail_json_renders_nan_for_jq(procs, daemon):
    tail = procs.start(trainbus_cmd("tail", "--json", "--count", "25", "--timeout", "30"),
                       env=daemon.env)
    tail.stderr.wait_for_line("connected to", 10)
    procs.start(trainbus_cmd("publish", "--pattern", "nan", "--rate", "500", "--count", "25"),
                env=daemon.env)
    assert tail.wait(timeout=30) == 0
    grads = [json.loads(line)["grad_norm"] for line in tail.stdout.snapshot()]
    assert grads[20:] == ["nan"] * 5
    assert all(isinstance(g, float) and math.isfinite(g) for g in grads[:20])


def _cached_updates(snapshot: str, prefix: bytes) -> list[int]:
    """The ``update`` of every event the daemon caches under ``prefix``, oldest first."""
    reply = snapshot_reply(snapshot, prefix)
    return [protocol.decode(reply[i:i + 2]).get("update") for i in range(2, len(reply), 2)]


def test_tail_history_prints_cached_events_first(procs, daemon):
    publisher = procs.start(trainbus_cmd("publish", "--run", "hist", "--rate", "400", "--count", "30"),
                            env=daemon.env)
    assert publisher.wait(timeout=30) == 0
    # The publisher's exit does not order its last events (on the publish port) before the
    # tail's snapshot request (on the snapshot port): wait until the daemon holds them.
    wait_for(lambda: _cached_updates(daemon.snapshot, b"ppo_update/hist/")[-1:] == [29], 10,
             message="the daemon to cache update 29")
    tail = procs.start(trainbus_cmd("tail", "--history", "--json", "--count", "10",
                                    "--timeout", "20"), env=daemon.env)
    assert tail.wait(timeout=30) == 0, tail.stderr.text()
    assert [json.loads(line)["update"] for line in tail.stdout.snapshot()] == list(range(20, 30))


def test_tail_times_out_with_a_message_and_nonzero_exit(procs, tmp_path):
    tail = procs.start(trainbus_cmd("tail", "--subscribe", f"ipc://{tmp_path}/none",
                                    "--count", "1", "--timeout", "0.5"))
    assert tail.wait(timeout=10) == 1
    assert "timed out" in tail.stderr.text()


def test_tail_counts_and_reports_malformed_messages(procs, daemon):
    tail = procs.start(trainbus_cmd("tail", "--json", "--count", "3", "--timeout", "20"),
                       env=daemon.env)
    tail.stderr.wait_for_line("connected to", 10)
    sock = zmq.Context.instance().socket(zmq.XPUB)
    sock.linger = 1000
    try:
        sock.connect(daemon.publish)
        assert sock.poll(10_000)  # the daemon's subscription has arrived
        sock.recv()
        good = protocol.encode({**ppo_fields(0), "v": 1, "type": "ppo_update", "run": "g",
                                "worker": 0, "session": "s", "seq": 0, "ts": time.time()})
        sock.send_multipart([b"ppo_update/g/0", msgpack.packb({"v": 1, "type": "ppo_update"})])
        sock.send_multipart([b"ppo_update/g/0", msgpack.packb({"v": 9})])
        for seq in range(3):
            payload = msgpack.unpackb(good[1])
            payload["seq"] = seq
            sock.send_multipart([good[0], msgpack.packb(payload)])
    finally:
        sock.close()
    assert tail.wait(timeout=20) == 0
    assert len(tail.stdout.snapshot()) == 3
    assert "skipped 2 malformed" in tail.stderr.text()


# ------------------------------------------------------------------ CLI and daemon


@pytest.mark.parametrize("args", [
    ["tail", "--count", "zero"],
    ["tail", "--count", "0"],
    ["tail", "--type", "nosuch"],
    ["publish", "--pattern", "weird"],
    ["publish", "--rate", "-1"],
    ["publish", "--run", "has space"],
    ["daemon", "--max-msg-size", "0"],
    ["nosuchcommand"],
    [],
])
def test_cli_misuse_is_one_line_and_nonzero(procs, args):
    proc = procs.start(trainbus_cmd(*args))
    assert proc.wait(timeout=20) == 2
    if args:
        lines = [line for line in proc.stderr.snapshot() if line.strip()]
        assert len(lines) == 1 and "error:" in lines[0], lines


def test_daemon_refuses_non_loopback_without_curve(procs):
    proc = procs.start(trainbus_cmd("daemon", "--publish", "tcp://0.0.0.0:*",
                                    "--subscribe", "tcp://127.0.0.1:*", "--snapshot", "tcp://127.0.0.1:*"))
    assert proc.wait(timeout=20) == 1
    assert "refusing to bind tcp://0.0.0.0:*" in proc.stderr.text()
    assert "Traceback" not in proc.stderr.text()


def test_daemon_sigint_exits_within_a_second(procs):
    handle = start_daemon(procs)
    start = time.monotonic()
    handle.proc.signal(signal.SIGINT)
    assert handle.proc.wait(timeout=5) == 0
    assert time.monotonic() - start < 1.5


def test_daemon_publishes_bus_stats(daemon):
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["bus_stats"]) as sub:
        event = _collect(sub, 1)[0]
        assert event.run == "daemon" and event.worker == "all"
        assert {"uptime_s", "forwarded", "rejected", "streams_cached"} <= event.fields.keys()


def test_tail_file_that_is_not_a_recording_is_one_line_exit_1(procs, tmp_path):
    bogus = tmp_path / "bogus.rec"
    bogus.write_bytes(b"not a recording at all")
    proc = procs.start(trainbus_cmd("tail", "--file", str(bogus)))
    assert proc.wait(timeout=20) == 1
    lines = [line for line in proc.stderr.snapshot() if line.strip()]
    assert len(lines) == 1 and "not a trainbus recording" in lines[0]


# ------------------------------------------------------------------ finished is not silent


class Capture:
    """A bound XSUB standing in for the daemon: it sees exactly the frames an emitter's
    sockets send, in each connection's order, and knows when every connection has closed
    (then everything sent has arrived: a deterministic end, no waiting on silence)."""

    def __init__(self) -> None:
        ctx = zmq.Context.instance()
        self.sock = ctx.socket(zmq.XSUB)
        self.sock.linger = 0
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sock.send(b"\x01")  # subscribe to everything, as the daemon does
        self.accepted = 0
        self.disconnected = 0
        self.frames: list[list[bytes]] = []

    def _pump(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            self.accepted += event == zmq.EVENT_ACCEPTED
            self.disconnected += event == zmq.EVENT_DISCONNECTED
        while self.sock.poll(0):
            self.frames.append(self.sock.recv_multipart())

    def wait_subscribed(self, emitter: TelemetryEmitter) -> None:
        """Until the emitter's main socket has our subscription. Pumping matters: ZeroMQ
        attaches an accepted connection (and sends it the subscription) only when the
        owning thread next calls into this socket."""
        wait_for(lambda: self._pump() or emitter.wait_for_bus(0.02), 10,
                 message="the emitter to see the subscription")

    def wait_heartbeats(self, topic: bytes, count: int) -> None:
        wait_for(lambda: self._pump() or sum(f[0] == topic for f in self.frames) >= count,
                 10, message=f"{count} heartbeat(s) on {topic!r}")

    def events_until_all_closed(self) -> list[protocol.Event]:
        """Every event sent, once every accepted connection has gone away."""
        wait_for(lambda: self._pump() or (self.accepted and self.disconnected >= self.accepted),
                 10, message="the emitter's connections to close")
        self._pump()
        return [protocol.decode(frames) for frames in self.frames]

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


@pytest.fixture
def capture():
    cap = Capture()
    try:
        yield cap
    finally:
        cap.close()


def test_close_sends_one_closing_heartbeat_after_the_last_update(capture):
    emitter = TelemetryEmitter("ending", 4, capture.endpoint, heartbeat_interval=0.02)
    try:
        capture.wait_subscribed(emitter)
        for update in range(3):
            emitter.emit_ppo_update(**ppo_fields(update))
        # Let periodic heartbeats go out, so the closing one must continue their seq.
        capture.wait_heartbeats(b"heartbeat/ending/4", 3)
        for update in range(3, 6):
            emitter.emit_ppo_update(**ppo_fields(update))
    finally:
        emitter.close()
    events = capture.events_until_all_closed()
    beats = [e for e in events if e.type == protocol.HEARTBEAT]
    closing = [e for e in beats if e.get("closing") is not None]
    assert len(closing) == 1 and closing[0].get("closing") is True
    final = closing[0]
    # Gap-free: the closing heartbeat takes the next seq, and is the last heartbeat.
    assert [e.seq for e in beats] == list(range(len(beats))) and len(beats) >= 4
    assert beats[-1] is final
    # It comes after the last update (same connection), with the final counters.
    assert events.index(final) > max(i for i, e in enumerate(events) if e.type == protocol.PPO_UPDATE)
    assert final.session == emitter.session
    assert (final.get("events_sent"), final.get("last_update"), final.get("events_dropped")) == (6, 5, 0)
    assert final.get("interval_s") == pytest.approx(0.02) and final.get("pid") == os.getpid()


def test_close_right_after_a_heartbeat_keeps_the_heartbeat_seq_gap_free(capture):
    # The riskiest moment: a periodic beat has just left on the heartbeat connection when
    # close() sends the closing one on the main connection. Repeated, new session each time.
    for attempt in range(5):
        emitter = TelemetryEmitter("ending", attempt, capture.endpoint, heartbeat_interval=0.05)
        try:
            capture.wait_subscribed(emitter)
            capture.wait_heartbeats(f"heartbeat/ending/{attempt}".encode(), 1)
        finally:
            emitter.close()
    events = capture.events_until_all_closed()
    for attempt in range(5):
        beats = [e for e in events if e.type == protocol.HEARTBEAT and e.worker == attempt]
        assert [e.seq for e in beats] == list(range(len(beats)))
        assert beats[-1].get("closing") is True and len(beats) >= 2
        assert not any(e.get("closing") for e in beats[:-1])


def test_no_closing_heartbeat_when_heartbeats_are_off(capture):
    emitter = TelemetryEmitter("quiet", 0, capture.endpoint, heartbeat_interval=None)
    try:
        capture.wait_subscribed(emitter)
        emitter.emit_ppo_update(**ppo_fields(0))
    finally:
        emitter.close()
    events = capture.events_until_all_closed()
    assert [e.type for e in events] == [protocol.PPO_UPDATE]


def test_pre_clip_grad_norm_max_is_an_optional_float(capture):
    """Sent as a float (an int or a 0-d tensor-like number converted), nil when not
    measured, absent when not given; every one a valid v1 event."""
    emitter = TelemetryEmitter("maxnorm", 0, capture.endpoint, heartbeat_interval=None)
    try:
        capture.wait_subscribed(emitter)
        emitter.emit_ppo_update(**ppo_fields(0, pre_clip_grad_norm_max=7.5))
        emitter.emit_ppo_update(**ppo_fields(1, pre_clip_grad_norm_max=3))
        emitter.emit_ppo_update(**ppo_fields(2, pre_clip_grad_norm_max=None))
        emitter.emit_ppo_update(**ppo_fields(3))
    finally:
        emitter.close()
    sent = [e.fields for e in capture.events_until_all_closed()]
    assert [f.get("pre_clip_grad_norm_max", "absent") for f in sent] == [7.5, 3.0, None, "absent"]
    assert type(sent[1]["pre_clip_grad_norm_max"]) is float


def _ready(daemon, **kwargs) -> Subscriber:
    """A subscriber whose subscription is in place (connected, first snapshot in)."""
    sub = Subscriber(daemon.subscribe, daemon.snapshot, **kwargs)
    wait_for(lambda: sub.poll(20) is not None and sub.stats.snapshots >= 1, 10,
             message="subscriber connected")
    return sub


def test_emitter_close_marks_the_stream_finished_and_a_restart_revives_it(daemon):
    with _ready(daemon, run="fin") as sub:
        first = TelemetryEmitter("fin", 0, daemon.publish, heartbeat_interval=0.05)
        try:
            assert first.wait_for_bus(10)
            for update in range(5):
                first.emit_ppo_update(**ppo_fields(update))
            _collect_until(sub, lambda got: any(e.type == protocol.HEARTBEAT for e in got),
                           "a periodic heartbeat")
            stream = sub.streams[("fin", 0)]
            assert stream.finished is False and stream.session == first.session
            first.emit_ppo_update(**ppo_fields(5))
        finally:
            first.close()
        got = _collect_until(sub, lambda got: any(e.get("closing") for e in got), "the closing heartbeat")
        assert got[-1].get("closing") is True  # nothing from the session after it
        assert stream.finished is True and stream.last_update == 5
        assert stream.dropped == 0 and sub.stats.dropped_total == 0
        # The worker restarts: a new session is live again from its first event.
        with TelemetryEmitter("fin", 0, daemon.publish, heartbeat_interval=None) as second:
            assert second.wait_for_bus(10)
            second.emit_ppo_update(**ppo_fields(0))
            _collect_until(sub, lambda got: any(e.session == second.session for e in got),
                           "the restarted worker's update")
            assert stream.finished is False and stream.restarts == 1


def _frames(event_type: str, session: str, seq: int, **fields) -> list[bytes]:
    payload = {"v": 1, "type": event_type, "run": "hand", "worker": 0, "session": session,
               "seq": seq, "ts": time.time(), **fields}
    if event_type == protocol.PPO_UPDATE:
        payload.update(ppo_fields(seq), **fields)
    return protocol.encode(payload)


def test_finished_follows_the_current_session_only(daemon):
    """Hand-made sequences (one connection, so order is kept): a session that speaks after
    closing is live again; a late event of an older session changes nothing."""
    from bus.publisher import EventPublisher

    def step(pub: EventPublisher, sub: Subscriber, frames: list[bytes]) -> bool:
        assert pub.send_frames(frames)
        want = protocol.decode(frames)
        _collect_until(sub, lambda got: any((e.session, e.type, e.seq) == (want.session, want.type, want.seq)
                                            for e in got), f"{want.type} {want.session}/{want.seq}")
        return sub.streams[("hand", 0)].finished

    heartbeat = {"interval_s": 2.0}
    with _ready(daemon, run="hand") as sub, EventPublisher(daemon.publish) as pub:
        assert pub.wait_for_bus(10)
        assert step(pub, sub, _frames("ppo_update", "A", 0)) is False
        assert step(pub, sub, _frames("heartbeat", "A", 0, **heartbeat, closing=False)) is False
        assert step(pub, sub, _frames("heartbeat", "A", 1, **heartbeat, closing=True)) is True
        assert step(pub, sub, _frames("ppo_update", "A", 1)) is False  # it kept going: live
        assert step(pub, sub, _frames("heartbeat", "A", 2, **heartbeat, closing=True)) is True
        assert step(pub, sub, _frames("heartbeat", "B", 0, **heartbeat)) is False  # restarted
        # A straggler from A (closing again) must not mark B finished.
        assert step(pub, sub, _frames("heartbeat", "A", 3, **heartbeat, closing=True)) is False
        assert sub.streams[("hand", 0)].session == "B"
        assert step(pub, sub, _frames("heartbeat", "B", 1, **heartbeat, closing=True)) is True


def test_tail_prints_the_closing_heartbeat_recognisably(procs, daemon):
    from consumers.tail import render_line

    tail = procs.start(trainbus_cmd("tail", "--type", "heartbeat", "--run", "bye", "--timeout", "20"),
                       env=daemon.env)
    tail.stderr.wait_for_line("connected to", 10)
    with TelemetryEmitter("bye", 1, daemon.publish, heartbeat_interval=0.05) as emitter:
        assert emitter.wait_for_bus(10)
        emitter.emit_ppo_update(**ppo_fields(7))
        tail.stdout.wait_for_line(r"heartbeat\s+bye/1 alive", 10)
    line = tail.stdout.wait_for_line(r"heartbeat\s+bye/1 closing pid=\d+ .*last_update=7 sent=1 dropped=0", 10)
    assert "alive" not in line.string
    tail.signal(signal.SIGTERM)
    assert tail.wait(10) == 0
    # The word is styled apart from the line (a plain heartbeat has no such span).
    closing = protocol.decode(_frames("heartbeat", "A", 0, interval_s=2.0, closing=True))
    rendered = render_line(closing)
    assert any(rendered.plain[span.start:span.end] == "closing" and "bold" in str(span.style)
               for span in rendered.spans)


def test_tail_line_shows_a_node_daemons_upstream():
    from consumers.tail import render_line

    base = {"v": 1, "type": "bus_stats", "run": "daemon", "worker": "all", "session": "s",
            "seq": 0, "ts": 1.0, "uptime_s": 1.0, "forwarded": 5, "rejected": {},
            "streams_cached": 1}
    plain = render_line(protocol.decode(protocol.encode(base))).plain
    assert "upstream" not in plain  # a hub or a lone daemon
    node = {**base, "upstream": "tcp://hub:7751", "upstream_connected": False,
            "upstream_connects": 2, "upstream_refused": 1}
    line = render_line(protocol.decode(protocol.encode(node)))
    assert "upstream=tcp://hub:7751 DOWN" in line.plain and "refused=1" in line.plain
