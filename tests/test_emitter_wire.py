"""What TelemetryEmitter puts on the wire, byte for byte decoded.

The emitter builds its payload on a fast path (see emitter/telemetry.py) rather than with
``protocol.encode`` on a complete dict. These tests pin the result to the reference: every
emitted event must decode (through ``protocol.decode``) to exactly what ``protocol.encode``
of the same envelope and fields decodes to — same keys, same values, same Python types,
NaN and ±inf included — with ``seq`` counting up from 0 per session.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from bus import protocol
from emitter.telemetry import TelemetryEmitter
from tests.conftest import ppo_fields, wait_for

NAN, INF = math.nan, math.inf


class Sink:
    """A bound XSUB standing in for the daemon (subscribed to everything)."""

    def __init__(self, tmp_path: Path) -> None:
        self.sock = zmq.Context.instance().socket(zmq.XSUB)
        self.sock.linger = 0
        self.endpoint = f"ipc://{tmp_path}/sink"
        self.sock.bind(self.endpoint)
        self.sock.send(b"\x01")

    def frames(self, count: int, timeout_ms: int = 10_000) -> list[list[bytes]]:
        got = []
        for _ in range(count):
            assert self.sock.poll(timeout_ms), f"only {len(got)} of {count} messages arrived"
            got.append(self.sock.recv_multipart())
        return got

    def quiet(self, timeout_ms: int = 200) -> bool:
        return not self.sock.poll(timeout_ms)

    def wait_subscribed(self, emitter: TelemetryEmitter) -> None:
        """Until the emitter's socket has our subscription. The poll matters: ZeroMQ
        attaches an accepted connection (and sends it the subscription) only when the
        owning thread next calls into this socket."""
        wait_for(lambda: self.sock.poll(0) or emitter.wait_for_bus(0.02), 10,
                 message="the emitter to see the subscription")


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[tuple[TelemetryEmitter, Sink]]:
    sink = Sink(tmp_path)
    emitter = TelemetryEmitter("wire", 3, sink.endpoint, heartbeat_interval=None)
    try:
        sink.wait_subscribed(emitter)
        yield emitter, sink
    finally:
        emitter.close()
        sink.sock.close(linger=0)


def same(a: Any, b: Any) -> bool:
    """Equal in value and Python type, with NaN equal to NaN, recursively."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def reference(emitter: TelemetryEmitter, fields: dict[str, Any], seq: int,
              ts: float) -> list[bytes]:
    """The frames of the same event built the plain way: one dict, ``protocol.encode``."""
    return protocol.encode({**fields, "v": protocol.PROTOCOL_VERSION, "type": protocol.PPO_UPDATE,
                            "run": emitter.run, "worker": emitter.worker,
                            "session": emitter.session, "seq": seq, "ts": ts})


#: (what the caller passes, what must arrive): the emitter converts numbers of other
#: types for schema fields (ints and numpy scalars for floats, numpy ints for ints) and
#: passes every other field on as it is.
CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (ppo_fields(0), ppo_fields(0)),
    (ppo_fields(1, grad_norm=NAN, pre_clip_grad_norm=INF, max_grad_norm=INF, policy_loss=-INF,
                grad_norm_actor=NAN, tag="x", flag=True, nested={"a": [1, -INF, None]},
                **{"critic.grad_norm": 1.25}),
     ppo_fields(1, grad_norm=NAN, pre_clip_grad_norm=INF, max_grad_norm=INF, policy_loss=-INF,
                grad_norm_actor=NAN, tag="x", flag=True, nested={"a": [1, -INF, None]},
                **{"critic.grad_norm": 1.25})),
    (ppo_fields(np.int64(2), lr=1, grad_norm=np.float32(0.5), explained_variance=None,
                sps=1234, nonfinite_grad_count=np.int32(3), ratio_max=INF),
     ppo_fields(2, lr=1.0, grad_norm=0.5, explained_variance=None, sps=1234.0,
                nonfinite_grad_count=3, ratio_max=INF)),
    # More fields than a fixmap holds (16+), and ints that need 5 and 9 bytes.
    (ppo_fields(3, env_steps=2**40, **{f"custom_{i}": float(i) for i in range(20)}, big=2**63),
     ppo_fields(3, env_steps=2**40, **{f"custom_{i}": float(i) for i in range(20)}, big=2**63)),
]


def test_emitted_events_decode_to_the_reference_encoding(wired):
    emitter, sink = wired
    before = time.time()
    for given, _ in CASES:
        assert emitter.emit_ppo_update(**given) is True
    after = time.time()
    frames = sink.frames(len(CASES))
    for seq, ((_, expected), got) in enumerate(zip(CASES, frames, strict=True)):
        event = protocol.decode(got)
        assert event.seq == seq and event.session == emitter.session
        assert before <= event.ts <= after
        want = reference(emitter, expected, seq, event.ts)
        assert got[0] == want[0] == b"ppo_update/wire/3"
        assert same(event.fields, protocol.decode(want).fields), (event.fields, expected)
        # Also undecoded by the protocol layer: nothing it might normalise hides a difference.
        assert same(msgpack.unpackb(got[1]), msgpack.unpackb(want[1]))
    assert (emitter.sent, emitter.dropped, emitter.last_update) == (len(CASES), 0, 3)


def test_a_map_too_large_for_a_map16_header_is_still_one_valid_map(wired):
    # Consumers reject maps over 4096 entries, but what the emitter writes must still be
    # the map it was given (a 32-bit map header), not a corrupt one.
    emitter, sink = wired
    extra = {f"k{i}": i for i in range(70_000)}
    assert emitter.emit_ppo_update(**ppo_fields(0), **extra)
    (topic, payload), = sink.frames(1)
    decoded = msgpack.unpackb(payload)
    assert len(decoded) == 70_000 + 11 + 7
    assert decoded["k69999"] == 69_999 and decoded["seq"] == 0 and decoded["run"] == "wire"


def test_a_field_that_cannot_be_packed_raises_and_costs_no_seq(wired):
    """An extra value msgpack cannot encode is the caller's bug: TypeError, nothing sent,
    and the next event goes out whole with the next seq (no false gap, no stray frame)."""
    emitter, sink = wired
    assert emitter.emit_ppo_update(**ppo_fields(0))
    with pytest.raises(TypeError):
        emitter.emit_ppo_update(**ppo_fields(1), weights=object())
    assert emitter.emit_ppo_update(**ppo_fields(2))
    first, second = sink.frames(2)
    assert [protocol.decode(first).seq, protocol.decode(second).seq] == [0, 1]
    assert protocol.decode(second).get("update") == 2
    assert sink.quiet()
    assert (emitter.sent, emitter.dropped, emitter.last_update) == (2, 0, 2)


def test_a_reopened_session_packs_its_new_session_id(wired):
    """The pre-packed envelope belongs to a session: a fork's child starts a new one."""
    emitter, sink = wired
    assert emitter.emit_ppo_update(**ppo_fields(0))
    first = protocol.decode(sink.frames(1)[0])
    old, old_sock = emitter.session, emitter._sock
    emitter._reopen_after_fork()  # what the child does on its first emit after fork
    old_sock.close(linger=0)  # (a real child abandons it; here it is ours to close)
    sink.wait_subscribed(emitter)
    assert emitter.emit_ppo_update(**ppo_fields(1))
    second = protocol.decode(sink.frames(1)[0])
    assert (first.session, first.seq) == (old, 0)
    assert (second.session, second.seq) == (emitter.session, 0) and emitter.session != old


def test_numeric_text_in_an_optional_field_is_refused(wired):
    """Optional schema fields take a number or None; text is the caller's bug even where
    float() or int() would parse it, and a consumer would reject the event for it."""
    emitter, sink = wired
    for name, text in (("explained_variance", "0.5"), ("nonfinite_grad_count", b"3")):
        with pytest.raises(TypeError, match=f"field '{name}' must be .* or None, got"):
            emitter.emit_ppo_update(**{**ppo_fields(1), name: text})
    assert sink.quiet() and (emitter.sent, emitter._seq) == (0, 0)


@pytest.mark.parametrize("name", list(protocol.PPO_UPDATE_REQUIRED))
def test_every_required_field_is_checked_on_the_fast_path(wired, name):
    """The emitter spells its required-field checks out per field: each one must be
    there, missing, mistyped or (ints) negative, with the field named, and nothing sent."""
    emitter, sink = wired
    fields = ppo_fields(1)
    del fields[name]
    with pytest.raises(TypeError, match=f"missing required field '{name}'"):
        emitter.emit_ppo_update(**fields)
    with pytest.raises(TypeError, match=f"field '{name}' must be"):
        emitter.emit_ppo_update(**{**ppo_fields(1), name: "1.0x"})
    with pytest.raises(TypeError, match=f"field '{name}' must be"):
        emitter.emit_ppo_update(**{**ppo_fields(1), name: None})
    for text in ("2", b"2", bytearray(b"2")):  # text float() or int() would parse: refused
        with pytest.raises(TypeError, match=f"field '{name}' must be .*, got {type(text).__name__}"):
            emitter.emit_ppo_update(**{**ppo_fields(1), name: text})
    if protocol.PPO_UPDATE_REQUIRED[name] == "int":
        with pytest.raises(ValueError, match=f"field '{name}' must be >= 0"):
            emitter.emit_ppo_update(**{**ppo_fields(1), name: -1})
    assert sink.quiet() and (emitter.sent, emitter._seq) == (0, 0)
