"""The daemon's last-value cache: the compiled one (bus/_cache.c) behaves exactly like the
Python one, message for message.

Why a differential test: the Python cache is the readable statement of what the cache
does (and what the daemon falls back to), the compiled one is what the daemon runs. Both
are fed the same frames over real inproc sockets, in batches of varying size, with topics
beyond ``max_streams`` and every kind of structurally bad message, and must agree on
everything a user can see: messages and frames read, rejects by reason, streams cached,
evictions, and every snapshot (any prefixes) in arrival order.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import msgpack
import pytest
import zmq

from bus import cache as cache_module
from bus.cache import CompiledCache, LastValueCache, make_cache
from tests.conftest import compiled_or_skip

MAX_SIZE = 600


@pytest.fixture
def pipes():
    """Two (sender, receiver) PAIR pipes over inproc, one per cache under test."""
    ctx = zmq.Context()
    made = []
    for i in range(2):
        receiver = ctx.socket(zmq.PAIR)
        receiver.linger = 0
        receiver.rcvhwm = 0  # the test sends everything before it reads
        receiver.bind(f"inproc://cache-test-{i}")
        sender = ctx.socket(zmq.PAIR)
        sender.linger = 0
        sender.sndhwm = 0
        sender.connect(f"inproc://cache-test-{i}")
        made.append((sender, receiver))
    yield made
    for sender, receiver in made:
        sender.close(0)
        receiver.close(0)
    ctx.term()


def random_message(rng: random.Random, topics: list[bytes]) -> list[bytes]:
    """Mostly valid events over ``topics``, with every structural fault the cache checks."""
    payload = msgpack.packb({"v": 1, "seq": rng.randrange(10**6), "x": "y" * rng.randrange(40)})
    kind = rng.random()
    if kind < 0.70:
        return [rng.choice(topics), payload]
    if kind < 0.74:
        return [rng.choice(topics)]  # one frame
    if kind < 0.78:
        return [rng.choice(topics), payload, b"extra"] + [b"more"] * rng.randrange(3)
    if kind < 0.82:
        return [rng.choice(topics), msgpack.packb({"big": "z" * (MAX_SIZE + rng.randrange(50))})]
    if kind < 0.86:
        return [rng.choice(topics), rng.choice([b"", msgpack.packb([1, 2]), b"\xc1", b"junk"])]
    if kind < 0.92:  # a new, invalid topic (only the first sight of a topic is checked)
        return [rng.choice([b"no-slashes", b"a/b", b"ppo_update/run/-1", b"\xff\xfe/x/0",
                            b"ppo_update/r/" + str(rng.randrange(10**10, 10**11)).encode()]),
                payload]
    # a new valid topic, map16 or empty map payloads included
    new = f"ppo_update/fresh{rng.randrange(400)}/{rng.randrange(9)}".encode()
    edge_maps = [msgpack.packb({}), msgpack.packb({str(k): k for k in range(15)}),  # 0x80, 0x8f
                 b"\xde\x00\x01\xa1a\x01", b"\xdf\x00\x00\x00\x00",  # map16, map32
                 b"\x90", b"\xdc\x00\x00"]  # arrays: not maps
    return [new, rng.choice([payload, *edge_maps])]


def test_compiled_and_python_caches_agree_on_everything(pipes) -> None:
    compiled_or_skip()
    rng = random.Random(14)
    topics = [f"ppo_update/run{r}/{w}".encode() for r in range(6) for w in range(8)]
    topics += [b"heartbeat/run0/3", b"alert/run1/all", b"bus_stats/daemon/all"]
    caches = [LastValueCache(4, 40, idle_evict_s=5.0), CompiledCache(4, 40, idle_evict_s=5.0)]
    rejected: list[Counter[str]] = [Counter(), Counter()]
    now = 100.0
    prefix_sets = [[], [b""], [b"ppo_update/"], [b"ppo_update/run1/", b"alert/"],
                   [b"heartbeat/run0/3"], [b"nothing/"], [b"ppo_update/fresh", b""]]
    for round_number in range(60):
        batch = [random_message(rng, topics) for _ in range(rng.randrange(1, 120))]
        for sender, _ in pipes:
            for frames in batch:
                sender.send_multipart(frames)
        limit = rng.choice([None, 1, 7, 50, 10_000])
        now += rng.choice([0.0, 0.5, 2.0, 6.0])
        while True:  # read it all, ``limit`` messages per call
            results = [cache.feed(receiver, limit, now, MAX_SIZE, counts)
                       for (_, receiver), cache, counts in zip(pipes, caches, rejected, strict=True)]
            assert results[0] == results[1], f"round {round_number}: (messages, frames) differ"
            if results[0][0] == 0 or limit is None:
                break
        assert rejected[0] == rejected[1], f"round {round_number}"
        assert len(caches[0]) == len(caches[1]) <= 40
        assert caches[0].evicted == caches[1].evicted
        prefixes = rng.choice(prefix_sets)
        assert caches[0].snapshot(prefixes) == caches[1].snapshot(prefixes), prefixes
        if round_number % 7 == 6:
            assert caches[0].evict_idle(now) == caches[1].evict_idle(now)
    # The run covered what it claims to: every reject reason, evictions both ways.
    assert set(rejected[0]) == {"bad_frame_count", "too_large", "not_a_map", "bad_topic"}
    assert caches[0].evicted > 0
    everything = caches[1].snapshot([])
    assert everything and all(len(pair) == 2 for pair in everything)
    for cache in caches:
        cache.close()


def test_cache_keeps_the_last_depth_payloads_per_topic_in_arrival_order(pipes) -> None:
    """The behaviour late joiners rely on, stated once for both caches."""
    compiled_or_skip()
    for (sender, receiver), cache in zip(pipes, [LastValueCache(3, 10, 60.0),
                                                 CompiledCache(3, 10, 60.0)], strict=True):
        for i in range(5):
            sender.send_multipart([b"ppo_update/a/0", msgpack.packb({"i": i})])
            sender.send_multipart([b"ppo_update/b/0", msgpack.packb({"j": i})])
        counts: Counter[str] = Counter()
        assert cache.feed(receiver, None, 1.0, MAX_SIZE, counts) == (10, 20)
        got = [(topic, msgpack.unpackb(payload)) for topic, payload in cache.snapshot([])]
        assert got == [(b"ppo_update/a/0", {"i": 2}), (b"ppo_update/b/0", {"j": 2}),
                       (b"ppo_update/a/0", {"i": 3}), (b"ppo_update/b/0", {"j": 3}),
                       (b"ppo_update/a/0", {"i": 4}), (b"ppo_update/b/0", {"j": 4})], cache.name
        assert [t for t, _ in cache.snapshot([b"ppo_update/b"])] == [b"ppo_update/b/0"] * 3
        assert not counts
        assert cache.evict_idle(30.0) == 0 and len(cache) == 2
        assert cache.evict_idle(61.0) == 0 and len(cache) == 2  # silent exactly 60 s: kept
        assert cache.evict_idle(61.5) == 2 and len(cache) == 0 and cache.snapshot([]) == []
        cache.close()


def test_compiled_cache_copies_payloads_out_of_received_messages(pipes) -> None:
    """A cached payload stays intact after the received message (and its buffer) is gone:
    the cache keeps copies, not libzmq's messages."""
    compiled_or_skip()
    sender, receiver = pipes[0]
    cache = CompiledCache(2, 10, 60.0)
    big = msgpack.packb({"blob": bytes(range(256)) * 4})
    sender.send_multipart([b"ppo_update/r/0", big])
    assert cache.feed(receiver, None, 1.0, 1 << 20, Counter()) == (1, 2)
    for i in range(1000):  # churn libzmq's allocations
        sender.send_multipart([b"ppo_update/other/0", msgpack.packb({"i": i})])
    cache.feed(receiver, None, 2.0, 1 << 20, Counter())
    assert cache.snapshot([b"ppo_update/r/"]) == [(b"ppo_update/r/0", big)]
    cache.close()


def test_cache_implementation_is_chosen_by_the_environment(monkeypatch) -> None:
    compiled_or_skip()
    monkeypatch.delenv(cache_module.ENV_IMPLEMENTATION, raising=False)
    assert make_cache(10, 100, 60.0).name == "compiled"
    monkeypatch.setenv(cache_module.ENV_IMPLEMENTATION, "python")
    assert make_cache(10, 100, 60.0).name == "python"
    monkeypatch.setenv(cache_module.ENV_IMPLEMENTATION, "fast")
    with pytest.raises(ValueError, match="expected python or compiled"):
        make_cache(10, 100, 60.0)
    for cls in (LastValueCache, CompiledCache):
        with pytest.raises(ValueError):
            cls(10, 0, 60.0)


PROBE = b"heartbeat/probe/0"


class Forwarding:
    """A compiled cache forwarding XSUB → PUB on a thread, as the daemon runs it: a
    publisher into it, two subscribers out of it, all over inproc with unbounded queues
    (so nothing is dropped and every difference is the forwarder's)."""

    def __init__(self, cache: CompiledCache, name: str) -> None:
        self.cache = cache
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        xsub = self._socket(zmq.XSUB, bind=f"inproc://{name}-in")
        xsub.send(b"\x01")  # everything, as the daemon subscribes
        pub = self._socket(zmq.PUB, bind=f"inproc://{name}-out")
        control = self._socket(zmq.PAIR, bind=f"inproc://{name}-control")
        self.control = self._socket(zmq.PAIR, connect=f"inproc://{name}-control")
        self.sinks = [self._socket(zmq.SUB, connect=f"inproc://{name}-out") for _ in range(2)]
        for sink in self.sinks:
            sink.setsockopt(zmq.SUBSCRIBE, b"")
        self.publisher = self._socket(zmq.PUB, connect=f"inproc://{name}-in")
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._forward, args=(xsub, pub, control))
        self.thread.start()
        # Probe until both sinks hear it: from then on, all that is sent arrives.
        self.probes = 0
        heard = [False, False]
        deadline = time.monotonic() + 10.0
        while not all(heard):
            assert time.monotonic() < deadline, "the forwarder never delivered a probe"
            self.publisher.send_multipart([PROBE, msgpack.packb({"probe": self.probes})])
            self.probes += 1
            for i, sink in enumerate(self.sinks):
                heard[i] = heard[i] or bool(sink.poll(10))

    def _socket(self, kind: int, *, bind: str = "", connect: str = "") -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = 0
        sock.bind(bind) if bind else sock.connect(connect)
        self.sockets.append(sock)
        return sock

    def _forward(self, xsub: zmq.Socket, pub: zmq.Socket, control: zmq.Socket) -> None:
        try:
            self.cache.forward(xsub, pub, control, MAX_SIZE)
        except BaseException as exc:  # surfaced by stop()
            self.failure = exc

    def received(self, sink: zmq.Socket, messages: int) -> list[list[bytes]]:
        """The next ``messages`` messages from ``sink``, probes skipped."""
        got: list[list[bytes]] = []
        while len(got) < messages:
            assert sink.poll(10_000), f"only {len(got)} of {messages} messages forwarded"
            frames = sink.recv_multipart()
            if frames[0] != PROBE:
                got.append(frames)
        return got

    def stop(self) -> None:
        self.control.send(b"TERMINATE")
        self.thread.join(10.0)
        assert not self.thread.is_alive(), "TERMINATE did not stop the forwarder"
        for sock in self.sockets:
            sock.close(0)
        self.ctx.term()
        if self.failure is not None:
            raise self.failure


def without_probes(pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [pair for pair in pairs if pair[0] != PROBE]


def test_forwarder_passes_every_frame_on_and_caches_what_the_python_cache_would() -> None:
    """The daemon's forwarder: every message leaves exactly as it came (malformed ones
    too: consumers judge them), and its cache ends up as the Python cache fed the same
    stream, with the same rejects by reason."""
    compiled_or_skip()
    rng = random.Random(41)
    topics = [f"ppo_update/run{r}/{w}".encode() for r in range(6) for w in range(8)]
    forwarding = Forwarding(CompiledCache(4, 40, idle_evict_s=3600.0), "fwd-agree")
    try:
        sent = [random_message(rng, topics) for _ in range(3000)]
        for frames in sent:
            forwarding.publisher.send_multipart(frames)
        assert forwarding.received(forwarding.sinks[1], len(sent)) == sent
        reference = LastValueCache(4, 40, idle_evict_s=3600.0)
        reference_rejects: Counter[str] = Counter()
        reference.feed(forwarding.sinks[0], None, time.monotonic(), MAX_SIZE, reference_rejects)
    finally:
        forwarding.stop()
    cache = forwarding.cache
    rejects: Counter[str] = Counter()
    messages, frames, dropped = cache.counts(rejects)
    assert (messages, frames, dropped) == (len(sent) + forwarding.probes,
                                           sum(map(len, sent)) + 2 * forwarding.probes, 0)
    assert rejects == reference_rejects
    assert set(rejects) == {"bad_frame_count", "too_large", "not_a_map", "bad_topic"}
    assert len(cache) == len(reference) and cache.evicted == reference.evicted > 0
    for prefixes in ([], [b"ppo_update/run1/", b"alert/"], [b"ppo_update/fresh"]):
        assert without_probes(cache.snapshot(prefixes)) == without_probes(
            reference.snapshot(prefixes)), prefixes
    # Stamped with this process's monotonic clock, which the daemon's idle eviction reads.
    assert cache.evict_idle(time.monotonic()) == 0
    streams = len(cache)
    assert cache.evict_idle(time.monotonic() + 3601.0) == streams > 0
    cache.close()


def test_forwarder_never_waits_for_a_held_cache_and_caches_what_it_parked() -> None:
    """While the main thread holds the cache (a long snapshot), events keep flowing; the
    forwarder parks up to ``park_max`` of them and caches them once the cache is free, so
    the next snapshot holds everything forwarded before it. Beyond that bound an event is
    forwarded but not cached, and counted."""
    compiled_or_skip()
    cache = CompiledCache(10, 100, idle_evict_s=3600.0)
    forwarding = Forwarding(cache, "fwd-park")
    extra = 100
    try:
        cache.hold(True)
        try:
            for seq in range(cache.park_max + extra):
                forwarding.publisher.send_multipart(
                    [b"ppo_update/parked/0", msgpack.packb({"seq": seq})])
            # All delivered while the cache is held: forwarding did not wait for it.
            got = forwarding.received(forwarding.sinks[0], cache.park_max + extra)
            assert [msgpack.unpackb(p)["seq"] for _, p in got] == list(
                range(cache.park_max + extra))
        finally:
            cache.hold(False)
        cached = [msgpack.unpackb(p)["seq"]
                  for _, p in cache.snapshot([b"ppo_update/parked/"])]
        # The ring's last 10 of the parked ones; the overflow was forwarded, not cached.
        assert cached == list(range(cache.park_max - 10, cache.park_max))
        assert cache.counts(Counter())[2] == extra
    finally:
        forwarding.stop()
    cache.close()
