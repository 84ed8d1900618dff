"""Wire protocol v1: round trips, every rejection reason, strict JSON."""

from __future__ import annotations

import json
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import protocol
from bus.protocol import ProtocolError, decode, encode, parse_topic, to_json
from tests.conftest import ppo_payload


def frames_of(payload: dict, topic: bytes | None = None) -> list[bytes]:
    topic = topic or f"{payload.get('type')}/{payload.get('run')}/{payload.get('worker')}".encode()
    return [topic, msgpack.packb(payload, use_bin_type=True)]


def reason_of(frames: list[bytes], **kwargs) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frames, **kwargs)
    return info.value.reason


def test_round_trip_keeps_every_field_extras_and_non_finite_values():
    payload = ppo_payload(run="cartpole-3f2a", worker=3, seq=7, grad_norm=math.nan,
                          max_grad_norm=math.inf, policy_loss=-math.inf, my_extra={"a": [1, 2]})
    event = decode(encode(payload))
    assert event.topic == "ppo_update/cartpole-3f2a/3"
    assert (event.type, event.run, event.worker, event.seq) == ("ppo_update", "cartpole-3f2a", 3, 7)
    assert math.isnan(event.fields["grad_norm"])
    assert event.fields["max_grad_norm"] == math.inf
    assert event.fields["policy_loss"] == -math.inf
    assert event.fields["my_extra"] == {"a": [1, 2]}
    assert event.frames == tuple(encode(payload))


def test_ints_for_float_fields_are_accepted_as_floats():
    # Producers in other languages may encode 1.0 as an int; that is still a number.
    event = decode(frames_of(ppo_payload(grad_norm=2, ts=1700000000)))
    assert isinstance(event.fields["grad_norm"], float) and event.fields["grad_norm"] == 2.0
    assert isinstance(event.ts, float)


def test_optional_nil_means_not_measured_and_is_kept_as_none():
    event = decode(frames_of(ppo_payload(explained_variance=None)))
    assert event.fields["explained_variance"] is None


def test_run_level_topic_with_worker_all():
    payload = {"v": 1, "type": "ppo_summary", "run": "r", "worker": "all", "session": "s",
               "seq": 0, "ts": 1.0, "workers_live": 2, "metrics": {}}
    assert decode(frames_of(payload)).worker == "all"


@pytest.mark.parametrize("mutate, reason", [
    (lambda p: p.pop("grad_norm"), "missing_field:grad_norm"),
    (lambda p: p.pop("update"), "missing_field:update"),
    (lambda p: p.pop("session"), "missing_field:session"),
    (lambda p: p.pop("v"), "missing_field:v"),
    (lambda p: p.update(grad_norm="big"), "bad_type:grad_norm"),
    (lambda p: p.update(update=1.5), "bad_type:update"),
    (lambda p: p.update(update=True), "bad_type:update"),
    (lambda p: p.update(seq="3"), "bad_type:seq"),
    (lambda p: p.update(ts="now"), "bad_type:ts"),
    (lambda p: p.update(v=2), "bad_version"),
    (lambda p: p.update(v="1"), "bad_type:v"),
    (lambda p: p.update(explained_variance="high"), "bad_type:explained_variance"),
    (lambda p: p.update(grad_norm=None), "missing_field:grad_norm"),
    (lambda p: p.update(seq=-1), "bad_value:seq"),
])
def test_each_bad_field_is_rejected_with_its_reason(mutate, reason):
    payload = ppo_payload(run="r", worker=0)
    mutate(payload)
    assert reason_of([b"ppo_update/r/0", msgpack.packb(payload)]) == reason


def test_topic_payload_mismatch():
    payload = ppo_payload(run="r", worker=0)
    assert reason_of([b"ppo_update/other/0", msgpack.packb(payload)]) == "topic_mismatch"
    assert reason_of([b"ppo_update/r/1", msgpack.packb(payload)]) == "topic_mismatch"
    assert reason_of([b"heartbeat/r/0", msgpack.packb(payload)]) == "topic_mismatch"


@pytest.mark.parametrize("frames, reason", [
    ([b"ppo_update/r/0"], "bad_frame_count"),
    ([b"ppo_update/r/0", b"x", b"y"], "bad_frame_count"),
    ([b"ppo_update/r/0", b"\xc1"], "not_msgpack"),
    ([b"ppo_update/r/0", msgpack.packb(1) + b"trailing"], "not_msgpack"),
    ([b"ppo_update/r/0", msgpack.packb([1, 2])], "not_a_map"),
    ([b"ppo_update/r/0", msgpack.packb({1: 2})], "bad_key"),
    ([b"nonsense", msgpack.packb({})], "bad_topic"),
    ([b"ppo_update/r/-1", msgpack.packb({})], "bad_topic"),
    ([b"ppo_update/bad run/0", msgpack.packb({})], "bad_topic"),
    ([b"\xff\xfe/r/0", msgpack.packb({})], "bad_topic"),
])
def test_structural_rejections(frames, reason):
    assert reason_of(frames) == reason


def test_too_large_is_checked_before_parsing():
    assert reason_of([b"ppo_update/r/0", b"\x80" * 2000], max_bytes=1000) == "too_large"


def test_hostile_sizes_are_bounded_by_unpacker_limits():
    huge_string = msgpack.packb({"v": 1, "x": "a" * 200_000})
    assert reason_of([b"ppo_update/r/0", huge_string]) == "not_msgpack"
    deep = b"\x91" * 100_000 + b"\x01"  # 100k nested one-element arrays
    assert reason_of([b"ppo_update/r/0", deep]) == "not_msgpack"


def nested(depth: int) -> list | int:
    """``depth`` levels of one-element lists around 1 (the payload map adds one more)."""
    value: list | int = 1
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_deeper_than_the_limit_is_rejected_by_decode():
    # The payload map is level 1, so an extra field may hold MAX_NESTING - 1 levels.
    ok = ppo_payload(deep=nested(protocol.MAX_NESTING - 1))
    assert decode(frames_of(ok)).fields["deep"] == ok["deep"]
    too_deep = ppo_payload(deep=nested(protocol.MAX_NESTING))
    assert reason_of(frames_of(too_deep)) == "too_deep"
    deep_map: dict = {"x": 1}
    for _ in range(protocol.MAX_NESTING):
        deep_map = {"m": deep_map}
    assert reason_of(frames_of(ppo_payload(deep=deep_map))) == "too_deep"
    # The schema is judged first: a broken field names itself even in a deep payload.
    assert reason_of(frames_of(ppo_payload(deep=nested(100), grad_norm="x"))) == "bad_type:grad_norm"
    assert protocol.nesting_exceeds({"a": nested(protocol.MAX_NESTING)})
    assert not protocol.nesting_exceeds({"a": nested(protocol.MAX_NESTING - 1), "b": 1})


def test_optional_str_fields_are_type_checked_on_the_fast_path_too():
    assert decode(frames_of(ppo_payload(synthetic="healthy"))).fields["synthetic"] == "healthy"
    assert decode(frames_of(ppo_payload(synthetic=None))).fields["synthetic"] is None
    assert reason_of(frames_of(ppo_payload(synthetic=3))) == "bad_type:synthetic"
    assert reason_of(frames_of(ppo_payload(optimizer_steps=1.5))) == "bad_type:optimizer_steps"


def test_alert_schema_checks_state_and_severity():
    alert = {"v": 1, "type": "alert", "run": "r", "worker": 0, "session": "s", "seq": 0,
             "ts": 1.0, "state": "firing", "severity": "critical", "rule": "grad_norm_high",
             "metric": "grad_norm", "since": 1.0, "value": 12.0, "threshold": 10.0}
    assert decode(frames_of(alert)).fields["state"] == "firing"
    assert reason_of(frames_of(dict(alert, state="exploded"))) == "bad_value:state"
    assert reason_of(frames_of(dict(alert, severity="meh"))) == "bad_value:severity"


def test_heartbeat_closing_is_an_optional_bool():
    beat = {"v": 1, "type": "heartbeat", "run": "r", "worker": 0, "session": "s", "seq": 3,
            "ts": 1.0, "interval_s": 2.0, "events_sent": 5, "last_update": 4}
    assert "closing" not in decode(frames_of(beat)).fields  # absent: an ordinary heartbeat
    assert decode(frames_of(dict(beat, closing=True))).fields["closing"] is True
    assert decode(frames_of(dict(beat, closing=None))).fields["closing"] is None
    assert reason_of(frames_of(dict(beat, closing=1))) == "bad_type:closing"
    assert reason_of(frames_of(dict(beat, closing="yes"))) == "bad_type:closing"
    assert protocol.SCHEMAS["heartbeat"][1]["closing"] == "bool"


def test_unknown_types_pass_with_envelope_checks_only():
    event = decode(frames_of({"v": 1, "type": "eval_result", "run": "r", "worker": 0,
                              "session": "s", "seq": 0, "ts": 1.0, "score": 3}))
    assert event.fields["score"] == 3


def test_parse_and_make_topic():
    assert parse_topic(b"ppo_update/run.x-1/12") == protocol.Topic("ppo_update", "run.x-1", 12)
    assert protocol.make_topic("heartbeat", "r", "all") == b"heartbeat/r/all"
    with pytest.raises(ProtocolError):
        protocol.make_topic("ppo_update", "bad/run", 0)
    with pytest.raises(ProtocolError):
        protocol.make_topic("ppo_update", "r", -1)


def test_strict_json_renders_non_finite_as_strings():
    line = to_json({"a": math.nan, "b": math.inf, "c": -math.inf, "d": [1.5, math.nan], "e": b"\x01"})
    assert json.loads(line) == {"a": "nan", "b": "inf", "c": "-inf", "d": [1.5, "nan"], "e": "01"}
    assert "NaN" not in line and "Infinity" not in line


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.binary(max_size=64))
def test_decode_never_raises_anything_but_protocol_error(payload, topic):
    try:
        decode([topic, payload])
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True), st.text(max_size=20)),
    max_size=30))
def test_random_maps_are_either_valid_or_rejected_with_a_reason(extra):
    payload = ppo_payload(run="r", worker=0)
    payload.update(extra)
    try:
        event = decode([b"ppo_update/r/0", msgpack.packb(payload)])
    except ProtocolError as exc:
        assert exc.reason
    else:
        assert event.type == "ppo_update"
