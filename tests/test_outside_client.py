"""Clients written only from the README's protocol section: plain pyzmq + msgpack, no
trainbus imports. If these break, outside tools (other languages) break too."""

from __future__ import annotations

import json
import time
import uuid

import msgpack
import zmq

from tests.conftest import trainbus_cmd, wait_for


def test_plain_subscriber_decodes_every_event(procs, daemon):
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"ppo_update/")
    sub.connect(daemon.subscribe)
    # The snapshot (late-joiner) port, as the README describes it, answers right away.
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(daemon.snapshot)
    dealer.send_multipart([b"SNAPSHOT", b"ppo_update/"])
    assert dealer.poll(5000)
    reply = dealer.recv_multipart()
    assert reply[0] == b"SNAPSHOT" and int(reply[1]) == (len(reply) - 2) // 2
    dealer.close()
    try:
        # Wait until the subscription is in place: publish probes until one arrives.
        publisher = procs.start(trainbus_cmd("publish", "--run", "outside", "--workers", "2",
                                             "--rate", "50", "--count", "400"), env=daemon.env)
        received = []

        def receive() -> bool:
            if sub.poll(50):
                topic, payload = sub.recv_multipart()
                received.append((topic, msgpack.unpackb(payload, raw=False)))
            return len(received) >= 20

        wait_for(receive, 20, interval=0, message="20 events")
        for topic, event in received:
            kind, run, worker = topic.decode().split("/")
            assert (kind, run, int(worker)) == (event["type"], event["run"], event["worker"])
            assert event["v"] == 1 and isinstance(event["seq"], int) and isinstance(event["ts"], float)
            for field in ("grad_norm", "pre_clip_grad_norm", "max_grad_norm", "policy_loss",
                          "value_loss", "entropy", "approx_kl", "clip_fraction", "lr"):
                assert isinstance(event[field], float)
        publisher.signal(15)
    finally:
        sub.close()


def test_plain_publisher_shows_up_in_tail(procs, daemon):
    tail = procs.start(trainbus_cmd("tail", "--json", "--count", "3", "--timeout", "20"),
                       env=daemon.env)
    tail.stderr.wait_for_line("connected to", 10)
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 2000
    pub.connect(daemon.publish)
    session = uuid.uuid4().hex
    try:
        seq = 0

        def send_one() -> bool:
            nonlocal seq
            event = {"v": 1, "type": "ppo_update", "run": "foreign", "worker": 0,
                     "session": session, "seq": seq, "ts": time.time(), "update": seq,
                     "env_steps": 128 * seq, "grad_norm": 0.4, "pre_clip_grad_norm": 0.9,
                     "max_grad_norm": 0.5, "policy_loss": -0.01, "value_loss": 0.2,
                     "entropy": 0.6, "approx_kl": 0.01, "clip_fraction": 0.1, "lr": 3e-4,
                     "my_tool_field": "kept"}
            pub.send_multipart([b"ppo_update/foreign/0", msgpack.packb(event)])
            seq += 1
            return tail.popen.poll() is not None

        # A plain PUB drops until the daemon's subscription arrives: keep sending until the
        # tail has its three events (exit), as a simple outside publisher would.
        wait_for(send_one, 20, interval=0.05, message="tail to receive 3 events")
    finally:
        pub.close()
    assert tail.wait(timeout=10) == 0
    lines = [json.loads(line) for line in tail.stdout.snapshot()]
    assert len(lines) == 3
    assert all(e["run"] == "foreign" and e["my_tool_field"] == "kept" for e in lines)
