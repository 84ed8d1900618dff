"""``trainbus publish``'s fleet-shaping options, end to end through a real daemon.

``--worker-offset`` exists so several publisher processes can simulate one big run (issue
14's 1000-worker fleet); ``--restart-every`` so consumers meet session churn (issue 15's
memory row). Both are judged by what a real consumer runtime makes of the stream: the right
worker ids, one gap-free seq per session, restarts counted as restarts and never as loss.
"""

from __future__ import annotations

import random
import time

from bus import protocol
from bus.synthetic import SyntheticWorker, synthetic_update
from consumers.runtime import Subscriber
from tests.conftest import trainbus_cmd, wait_for


def _collect_updates(sub: Subscriber, n: int, timeout: float = 30.0) -> list[protocol.Event]:
    got: list[protocol.Event] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got.extend(e for e in sub.poll(100) if e.type == protocol.PPO_UPDATE)
    return got


def test_worker_offset_lets_two_publishers_share_one_run(procs, daemon):
    count = 20
    with Subscriber(daemon.subscribe, daemon.snapshot, types=[protocol.PPO_UPDATE],
                    run="fleet") as sub:
        wait_for(lambda: sub.poll(50) or sub.connected, 10, message="the subscriber to connect")
        pubs = [procs.start(trainbus_cmd("publish", "--run", "fleet", "--workers", "3",
                                         "--worker-offset", str(offset), "--rate", "200",
                                         "--count", str(count)), env=daemon.env)
                for offset in (0, 3)]
        events = _collect_updates(sub, 6 * count)
        for pub in pubs:
            assert pub.wait(timeout=30) == 0, pub.stderr.text()
    assert len(events) == 6 * count
    by_worker: dict[int, list[protocol.Event]] = {}
    for event in events:
        by_worker.setdefault(event.worker, []).append(event)
    assert sorted(by_worker) == [0, 1, 2, 3, 4, 5]
    for worker, seen in by_worker.items():
        assert [e.seq for e in seen] == list(range(count)), worker
        assert len({e.session for e in seen}) == 1
    # Six workers, six sessions: the two publishers never reuse each other's identity.
    assert len({seen[0].session for seen in by_worker.values()}) == 6
    assert sub.stats.dropped_total == 0
    assert all(s.restarts == 0 for s in sub.streams.values())


def test_worker_offset_keeps_each_workers_story(procs, daemon):
    """Worker 4's numbers are the same whether it is simulated at offset 0 or offset 4."""
    with Subscriber(daemon.subscribe, daemon.snapshot, types=[protocol.PPO_UPDATE],
                    run="story") as sub:
        wait_for(lambda: sub.poll(50) or sub.connected, 10, message="the subscriber to connect")
        pub = procs.start(trainbus_cmd("publish", "--run", "story", "--workers", "1",
                                       "--worker-offset", "4", "--rate", "200", "--count", "5",
                                       "--seed", "3"), env=daemon.env)
        events = _collect_updates(sub, 5)
        assert pub.wait(timeout=30) == 0, pub.stderr.text()
    rng = random.Random(3 * 1000 + 4)
    expected = [synthetic_update("healthy", u, rng)["grad_norm"] for u in range(5)]
    assert [e.worker for e in events] == [4] * 5
    assert [e.get("grad_norm") for e in events] == expected


def test_restart_every_starts_new_sessions_that_consumers_count_as_restarts(procs, daemon):
    count, every, workers = 10, 4, 2
    with Subscriber(daemon.subscribe, daemon.snapshot, types=[protocol.PPO_UPDATE],
                    run="churn") as sub:
        wait_for(lambda: sub.poll(50) or sub.connected, 10, message="the subscriber to connect")
        pub = procs.start(trainbus_cmd("publish", "--run", "churn", "--workers", str(workers),
                                       "--restart-every", str(every), "--rate", "200",
                                       "--count", str(count)), env=daemon.env)
        events = _collect_updates(sub, workers * count)
        assert pub.wait(timeout=30) == 0, pub.stderr.text()
    assert len(events) == workers * count
    for worker in range(workers):
        seen = [e for e in events if e.worker == worker]
        # update carries on across restarts (resumed from a checkpoint) ...
        assert [e.get("update") for e in seen] == list(range(count))
        # ... while each restart is a new session whose seq starts again at 0.
        sessions = list(dict.fromkeys(e.session for e in seen))
        assert len(sessions) == 3
        assert [e.seq for e in seen] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
        assert [sessions.index(e.session) for e in seen] == [0] * 4 + [1] * 4 + [2] * 2
        stream = sub.streams[("churn", worker)]
        assert stream.restarts == 2 and stream.sessions_seen == 3
    assert sub.stats.dropped_total == 0
    assert "in 6 session(s)" in pub.stderr.text()


def test_synthetic_worker_restart_resets_seq_per_type():
    worker = SyntheticWorker("unit", 7)
    first = worker.session
    topics = [worker.frames(protocol.HEARTBEAT, {"interval_s": 2.0})[0] for _ in range(2)]
    assert topics == [b"heartbeat/unit/7"] * 2
    assert protocol.decode(worker.frames(protocol.HEARTBEAT, {"interval_s": 2.0})).seq == 2
    worker.restart()
    event = protocol.decode(worker.frames(protocol.HEARTBEAT, {"interval_s": 2.0}))
    assert (event.seq, event.worker, event.run) == (0, 7, "unit")
    assert event.session != first and worker.sessions == 2
