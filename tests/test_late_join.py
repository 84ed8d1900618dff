"""Late joiners get the last 10 events of every stream at once, and the cache stays bounded.

Why real processes: the Clone pattern (subscribe first, then ask the snapshot port, then
drop live events the snapshot already covered) only proves itself with a real daemon
holding real history while real publishers keep sending; an in-process fake would share
one clock and one GIL and hide the races this merge exists to handle.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict

import zmq

from bus import protocol
from bus.publisher import EventPublisher
from consumers.runtime import Subscriber
from tests.conftest import ProcessGroup, start_daemon, trainbus_cmd, wait_for

WORKERS = 3
UPDATES = 20


def snapshot_request(endpoint: str, *prefixes: bytes, timeout_ms: int = 2000) -> list[bytes]:
    """One raw request on the snapshot port, exactly as an outside client would send it."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send_multipart([b"SNAPSHOT", *prefixes])
        assert sock.poll(timeout_ms), "no snapshot reply"
        return sock.recv_multipart()
    finally:
        sock.close(linger=0)


def snapshot_pairs(endpoint: str, *prefixes: bytes) -> list[tuple[bytes, bytes]]:
    """The (topic, payload) pairs of a snapshot reply, with its framing checked."""
    reply = snapshot_request(endpoint, *prefixes)
    assert reply[0] == b"SNAPSHOT"
    count = int(reply[1])
    assert len(reply) == 2 + 2 * count
    return [(reply[i], reply[i + 1]) for i in range(2, len(reply), 2)]


def cached_updates(endpoint: str, run: str) -> dict[int | str, list[int]]:
    """Per worker, the ``update`` numbers the daemon currently caches for ``run``."""
    per_worker: dict[int | str, list[int]] = defaultdict(list)
    for topic, payload in snapshot_pairs(endpoint, f"ppo_update/{run}/".encode()):
        event = protocol.decode([topic, payload])
        per_worker[event.worker].append(event.get("update"))
    return per_worker


def poll_until(sub: Subscriber, predicate, timeout: float, message: str) -> list[protocol.Event]:
    """Poll a Subscriber (never sleeping) until ``predicate(events so far)`` holds."""
    got: list[protocol.Event] = []
    wait_for(lambda: got.extend(sub.poll(50)) or predicate(got), timeout, interval=0, message=message)
    return got


def test_late_joiners_get_last_ten_per_worker_at_once(procs: ProcessGroup, daemon) -> None:
    """A tail and a Subscriber started after 20 updates per worker (publisher already
    gone) get exactly updates 10..19 of each worker, oldest first, within a second."""
    run = "latejoin"
    publisher = procs.start(trainbus_cmd("publish", "--publish", daemon.publish, "--run", run,
                                         "--workers", str(WORKERS), "--count", str(UPDATES),
                                         "--rate", "400"))
    assert publisher.wait(timeout=20) == 0, publisher.stderr.text()
    # The publisher lingers until its queue is flushed; wait until the daemon holds it all.
    wait_for(lambda: all(cached_updates(daemon.snapshot, run).get(w, [None])[-1] == UPDATES - 1
                         for w in range(WORKERS)), 10, message="daemon cache to hold update 19")
    assert dict(cached_updates(daemon.snapshot, run)) == {
        w: list(range(UPDATES - 10, UPDATES)) for w in range(WORKERS)}

    started = time.monotonic()
    tail = procs.start(trainbus_cmd("tail", "--subscribe", daemon.subscribe, "--snapshot",
                                    daemon.snapshot, "--history", "--json",
                                    "--count", str(10 * WORKERS), "--timeout", "15"))
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_update"], run=run) as sub:
        got = poll_until(sub, lambda g: len(g) >= 10 * WORKERS, 10, "snapshot history")
        sub_elapsed = time.monotonic() - started
        assert sub.stats.snapshot_events == 10 * WORKERS
        for worker in range(WORKERS):
            history = [e.get("update") for e in got if e.worker == worker]
            assert history == list(range(UPDATES - 10, UPDATES))
            assert sub.streams[(run, worker)].dropped == 0
    assert tail.wait(timeout=15) == 0, tail.stderr.text()
    tail_elapsed = time.monotonic() - started
    lines = [json.loads(line) for line in tail.stdout.snapshot()]
    assert len(lines) == 10 * WORKERS
    for worker in range(WORKERS):
        assert [x["update"] for x in lines if x["worker"] == worker] == list(range(UPDATES - 10, UPDATES))
    assert "Traceback" not in tail.stderr.text()
    # "At once": within one second of starting in-process (the tail includes interpreter
    # start-up, so it only gets a generous functional bound).
    assert sub_elapsed < 1.0, f"in-process history took {sub_elapsed:.2f}s"
    assert tail_elapsed < 10.0
    print(f"late join: Subscriber history in {sub_elapsed * 1000:.0f} ms, "
          f"tail process (incl. start-up) in {tail_elapsed:.2f} s")


def test_mid_run_join_merges_history_and_live_without_gaps_or_duplicates(procs: ProcessGroup,
                                                                        daemon) -> None:
    """Joining while publishers keep sending: the snapshot and the live stream overlap
    (the SUB socket subscribed first) and the overlap is dropped by seq, so each worker's
    sequence is contiguous — no event missing, none twice."""
    run = "midrun"
    procs.start(trainbus_cmd("publish", "--publish", daemon.publish, "--run", run,
                             "--workers", "2", "--rate", "100"))
    wait_for(lambda: all(cached_updates(daemon.snapshot, run).get(w, [0])[-1] >= UPDATES - 1
                         for w in range(2)), 15, message="20 updates per worker")
    tail = procs.start(trainbus_cmd("tail", "--subscribe", daemon.subscribe, "--snapshot",
                                    daemon.snapshot, "--history", "--json", "--run", run,
                                    "--count", "60", "--timeout", "20"))
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["ppo_update"], run=run) as sub:
        first = poll_until(sub, lambda g: len(g) > 0, 10, "first batch")
        # The whole history arrives in the first batch, before any live event.
        assert sub.stats.snapshot_events == 20
        assert len(first) >= 20
        assert all(sum(1 for e in first[:20] if e.worker == w) == 10 for w in range(2))
        rest = poll_until(sub, lambda g: all(sum(1 for e in first + g if e.worker == w) >= 25
                                             for w in range(2)), 10, "live events after history")
        for worker in range(2):
            seqs = [e.seq for e in first + rest if e.worker == worker]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
            assert sub.streams[(run, worker)].dropped == 0
        assert sub.stats.rejected_total == 0
    assert tail.wait(timeout=20) == 0, tail.stderr.text()
    lines = [json.loads(line) for line in tail.stdout.snapshot()]
    for worker in range(2):
        seqs = [x["seq"] for x in lines if x["worker"] == worker]
        assert len(seqs) >= 20
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert "lost upstream" not in tail.stderr.text()


def _bus_stats(sub: Subscriber, predicate, timeout: float) -> dict:
    """The first bus_stats payload (from a Subscriber to bus_stats) satisfying ``predicate``."""
    found: list[dict] = []

    def check() -> bool:
        for event in sub.poll(50):
            if event.type == protocol.BUS_STATS and predicate(event.fields):
                found.append(event.fields)
        return bool(found)

    wait_for(check, timeout, interval=0, message="matching bus_stats")
    return found[0]


def test_cache_stays_bounded_with_thousands_of_streams(procs: ProcessGroup) -> None:
    """5000 distinct topics into a daemon capped at 1000 streams: it keeps the 1000 most
    recently active (LRU), the snapshot never exceeds 10 events per kept stream, and its
    memory does not grow with a second wave of 5000 new topics."""
    cap, streams = 1000, 5000
    handle = start_daemon(procs, "--max-streams", str(cap), "--stats-interval", "0.2")
    rss_after: list[int] = []
    with EventPublisher(handle.publish, sndhwm=100_000) as pub, \
            Subscriber(handle.subscribe, handle.snapshot, types=["bus_stats"]) as stats_sub:
        assert pub.wait_for_bus(10)
        sent = 0
        for wave in range(2):
            for worker in range(streams):
                for _ in range(2):
                    pub.publish(protocol.HEARTBEAT, f"wave{wave}", worker, {"interval_s": 1.0})
                    sent += 1
            stats = _bus_stats(stats_sub, lambda f, n=sent: f["forwarded"] >= n, 15)
            assert stats["streams_cached"] <= cap
            rss_after.append(_rss_kib(handle.proc.popen.pid))
        assert stats["streams_cached"] == cap
        assert stats["streams_evicted"] >= 2 * streams - cap
    pairs = snapshot_pairs(handle.snapshot)
    topics = {topic for topic, _ in pairs}
    assert len(topics) <= cap and len(pairs) <= cap * 10
    # LRU: the newest topics survive, the first wave is gone entirely.
    assert f"heartbeat/wave1/{streams - 1}".encode() in topics
    assert not any(t.startswith(b"heartbeat/wave0/") for t in topics)
    growth_kib = rss_after[1] - rss_after[0]
    print(f"bounded cache: {2 * streams} topics -> {len(topics)} cached, {len(pairs)} snapshot "
          f"events; daemon RSS {rss_after[0] // 1024} MiB after wave 1, "
          f"{rss_after[1] // 1024} MiB after wave 2")
    assert growth_kib < 16 * 1024, f"daemon RSS grew by {growth_kib} KiB on the second wave"


def test_idle_streams_are_evicted(procs: ProcessGroup) -> None:
    """A stream silent for longer than ``--idle-evict`` leaves the cache, so a late joiner
    is not handed history of long-dead workers (and memory is returned)."""
    handle = start_daemon(procs, "--idle-evict", "0.5", "--stats-interval", "0.1")
    with EventPublisher(handle.publish) as pub:
        assert pub.wait_for_bus(10)
        pub.publish(protocol.HEARTBEAT, "idle", 0, {"interval_s": 1.0})
        wait_for(lambda: snapshot_pairs(handle.snapshot, b"heartbeat/idle/"), 5,
                 message="stream cached")
        wait_for(lambda: not snapshot_pairs(handle.snapshot, b"heartbeat/idle/"), 5,
                 message="idle stream evicted")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_subscriber_never_misses_its_first_handshake(daemon, monkeypatch) -> None:
    """Regression: the Subscriber waits for HANDSHAKE_SUCCEEDED before its first snapshot
    and first live read. Its monitor used to be attached after connect(), so a handshake
    that finished in between (a busy machine, a daemon already up) left the consumer
    silent for ever. Widen that window on purpose: it must still get the stream."""
    from consumers import runtime

    real_subscriber = runtime.transport.subscriber

    def slow_subscriber(*args, **kwargs):
        sock = real_subscriber(*args, **kwargs)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # let any handshake complete right here
            sock.poll(10)
        return sock

    monkeypatch.setattr(runtime.transport, "subscriber", slow_subscriber)
    with Subscriber(daemon.subscribe, daemon.snapshot, types=["bus_stats"]) as sub:
        poll_until(sub, lambda g: len(g) >= 2, 5, "bus_stats through a slow-starting Subscriber")
        assert sub.connected



def test_snapshot_client_asking_on_one_connection_gets_every_reply(daemon) -> None:
    """Regression: a client that reads every reply but asks again at once on the same
    connection (an outside tool polling the snapshot port) lost a reply now and then:
    ZeroMQ refused the daemon's NOBLOCK send as "queue full" while the client's
    acknowledgements of earlier replies were still unprocessed (a REQ client would then
    wait for ever)."""
    rng = random.Random(3)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(daemon.snapshot)
        for i in range(3000):
            sock.send_multipart([rng.randbytes(rng.randrange(0, 30))
                                 for _ in range(rng.randrange(1, 6))])
            assert sock.poll(5000), f"no reply to request {i}"
            sock.recv_multipart()
    finally:
        sock.close(linger=0)
