"""Wire protocol v1: topics, msgpack codec, validation and strict-JSON rendering.

This module is the contract every process (and every outside client) relies on. A message
is two frames, ``[topic, payload]``: the topic is UTF-8 ``"<type>/<run>/<worker>"`` so that
ZeroMQ prefix subscriptions select a type, a run or one worker; the payload is a msgpack map
with string keys carrying an envelope (``v type run worker session seq ts``) plus the
type's own fields.

Decoding never raises anything but :class:`ProtocolError`, whose ``reason`` is a short
machine-readable string (``not_msgpack``, ``missing_field:grad_norm``, ...) so that every
consumer can count rejected messages by reason and carry on. Non-finite floats are data
(a NaN gradient norm is the news) and are preserved end to end.
"""

from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

#: Largest frame any process accepts by default; the daemon drops bigger ones.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20

# Bounds handed to the msgpack unpacker so that a hostile frame cannot make a consumer
# allocate far beyond the frame's own size (msgpack's C unpacker also caps nesting depth).
_UNPACK_LIMITS = {
    "max_str_len": 64 * 1024,
    "max_bin_len": 256 * 1024,
    "max_array_len": 4096,
    "max_map_len": 4096,
    "max_ext_len": 0,
}

#: Deepest nesting of maps/lists an accepted payload may have (the payload map is level 1),
#: rejected as ``too_deep``. msgpack decodes up to ~1000 levels, but consumers render fields
#: recursively (JSON lines, exporters): a valid event with an extra field 500 levels deep
#: raised RecursionError in ``trainbus tail --json``. trainbus's own events nest 3 levels at
#: most (ppo_summary metrics), so 32 leaves forward-compatible extras ample room. Part of
#: :func:`decode` so that every reader of the protocol (consumers, tools reading a
#: recording, outside clients following the README) applies the same limit.
MAX_NESTING = 32
_CONTAINER_TYPES = frozenset((dict, list))

PPO_UPDATE = "ppo_update"
HEARTBEAT = "heartbeat"
ALERT = "alert"
PPO_SUMMARY = "ppo_summary"
BUS_STATS = "bus_stats"
EVENT_TYPES = (PPO_UPDATE, HEARTBEAT, ALERT, PPO_SUMMARY, BUS_STATS)

RUN_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TYPE_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")
ALL_WORKERS = "all"

ENVELOPE_FIELDS = ("v", "type", "run", "worker", "session", "seq", "ts")

# Field kinds: "int" (not bool), "float" (int accepted, stored as float), "str", "map",
# "bool", "list". Optional fields may also be nil (= not measured).
PPO_UPDATE_REQUIRED: dict[str, str] = {
    "update": "int",
    "env_steps": "int",
    # grad_norm: the MEAN over the update's optimizer steps (one per minibatch) of each
    # step's L2 norm of the whole gradient (every parameter handed to clipping, as one
    # vector) AFTER clipping, i.e. of what the optimizer applied; a non-finite step counts
    # (NaN mean) even when its step was skipped. pre_clip_grad_norm: the same mean of the
    # norms BEFORE clipping. That is what emitter.gradients.UpdateStats and the SB3
    # callback compute; a producer with one step per update sends that step's norms.
    "grad_norm": "float",
    "pre_clip_grad_norm": "float",
    "max_grad_norm": "float",
    "policy_loss": "float",
    "value_loss": "float",
    "entropy": "float",
    "approx_kl": "float",
    "clip_fraction": "float",
    "lr": "float",
}
PPO_UPDATE_OPTIONAL: dict[str, str] = {
    "explained_variance": "float",
    "episode_return_mean": "float",
    "episode_length_mean": "float",
    "sps": "float",
    "update_time_ms": "float",
    "nonfinite_grad_count": "int",
    "ratio_min": "float",
    "ratio_max": "float",
    "advantage_mean": "float",
    "advantage_std": "float",
    # The largest pre-clip norm among the update's optimizer steps: pre_clip_grad_norm is
    # their mean, which hides one exploding minibatch among many calm ones. Optional and
    # additive, so v1 consumers that predate it keep it as an unknown extra field.
    "pre_clip_grad_norm_max": "float",
}
#: Optional ppo_update fields that describe the update rather than measure its health: no
#: history, no fleet rollup, no alert rule reads them (consumers.history and
#: consumers.alerting.rules take their metrics from PPO_UPDATE_OPTIONAL only).
PPO_UPDATE_INFO: dict[str, str] = {
    # From the SB3 callback: the optimizer steps the update's gradient-norm means are taken
    # over (fewer than planned when target_kl stopped the epochs early), and the epochs begun.
    "optimizer_steps": "int",
    "epochs": "int",
    # From `trainbus publish`: the story a synthetic stream tells (healthy, rising, explode,
    # nan), so a recording or a tail never passes synthetic numbers off as training.
    "synthetic": "str",
}

#: Per type: (required fields, optional fields). Types not listed here carry only the
#: envelope check, so a newer producer's new type passes through older consumers.
#: These tables are exactly what trainbus's own producers send, no more and no less
#: (tests/test_contract.py runs every producer for real and compares), and the README's
#: event tables list the same fields (the same test compares those too).
SCHEMAS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    PPO_UPDATE: (PPO_UPDATE_REQUIRED, {**PPO_UPDATE_OPTIONAL, **PPO_UPDATE_INFO}),
    HEARTBEAT: (
        {"interval_s": "float"},
        # closing: true only on an emitter's last heartbeat (sent by close() after its last
        # ppo_update, on the same connection): the worker finished, it did not go silent.
        # Optional and additive, so v1 consumers that predate it simply ignore it.
        # node: the launcher's node index (torchrun GROUP_RANK, Ray NODE_RANK), when set.
        {"pid": "int", "host": "str", "events_sent": "int", "events_dropped": "int",
         "last_update": "int", "closing": "bool", "node": "int"},
    ),
    ALERT: (
        {"state": "str", "severity": "str", "rule": "str", "metric": "str", "since": "float"},
        # transition: which change of the alert this notification announces (one of
        # ALERT_TRANSITIONS); state alone cannot tell fired from escalated or a reminder.
        {"value": "float", "threshold": "float", "reminder": "bool", "summary": "str",
         "transition": "str"},
    ),
    PPO_SUMMARY: (
        # metrics: metric name -> a map with the fields of PPO_SUMMARY_METRIC_FIELDS.
        {"workers_live": "int", "metrics": "map"},
        {"workers_stale": "int", "updates": "int"},
    ),
    BUS_STATS: (
        {"uptime_s": "float", "forwarded": "int", "rejected": "map", "streams_cached": "int"},
        # snapshots_served: snapshot requests answered; streams_evicted: streams dropped
        # from the last-value cache (LRU bound or idle); auth_denied: CURVE clients refused
        # by the ZAP handler (always 0 without --curve); frames_forwarded: libzmq's own
        # count of forwarded frames; cache_dropped: frames the cache never saw (its queue
        # was full; forwarding carried on).
        # upstream*: only from a node daemon (--upstream), describing its link to the hub:
        # the hub's endpoint, whether a connection is up now, handshakes completed (more
        # than 1: it reconnected), handshakes refused (wrong key), and frames its upstream
        # proxy handed on. A daemon's bus_stats are never forwarded upstream.
        {"rate_eps": "float", "snapshots_served": "int", "streams_evicted": "int",
         "auth_denied": "int", "frames_forwarded": "int", "cache_dropped": "int",
         "upstream": "str", "upstream_connected": "bool", "upstream_connects": "int",
         "upstream_refused": "int", "upstream_frames": "int"},
    ),
}

#: The entry of one metric in a ppo_summary's ``metrics`` map (consumers.aggregate.rollup).
#: ``mean``/``min``/``max`` are over the finite latest values (NaN when none is finite);
#: ``worst_worker``/``worst_value`` are nil when no worker is judged worst; ``nonfinite``
#: counts workers whose latest value is NaN/inf; ``workers`` those that reported the metric.
#: Not checked by :func:`decode` (a summary is a consumer's view, not a measurement), but
#: tests/test_contract.py holds the aggregator to it.
PPO_SUMMARY_METRIC_FIELDS: dict[str, str] = {
    "mean": "float", "min": "float", "max": "float", "worst_worker": "int",
    "worst_value": "float", "nonfinite": "int", "workers": "int",
}

ALERT_STATES = ("pending", "firing", "resolved")
ALERT_SEVERITIES = ("warning", "critical")
#: Values of an alert's ``transition`` (consumers.alerting.engine names the same ones).
ALERT_TRANSITIONS = ("pending", "cancelled", "fired", "escalated", "deescalated", "resolved",
                     "reminder")


class ProtocolError(ValueError):
    """A message that is not valid protocol v1; ``reason`` is short and machine-readable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic; ``worker`` is an int, or ``"all"`` for run-level events."""

    type: str
    run: str
    worker: int | str

    def __str__(self) -> str:
        return f"{self.type}/{self.run}/{self.worker}"


@dataclass(slots=True)
class Event:
    """A validated event. ``fields`` is the whole payload map (envelope included, unknown
    extra fields kept); ``frames`` are the original bytes so relays and recorders pass the
    message on exactly as it came."""

    type: str
    run: str
    worker: int | str
    session: str
    seq: int
    ts: float
    fields: dict[str, Any]
    frames: tuple[bytes, bytes]

    @property
    def topic(self) -> str:
        return f"{self.type}/{self.run}/{self.worker}"

    @property
    def stream(self) -> tuple[str, int | str]:
        """The (run, worker) a consumer keeps histories for."""
        return (self.run, self.worker)

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


# --------------------------------------------------------------------------- topics


def _check_worker(worker: object) -> int | str:
    if worker == ALL_WORKERS:
        return ALL_WORKERS
    if isinstance(worker, bool) or not isinstance(worker, int) or worker < 0:
        raise ProtocolError("bad_worker", f"worker must be a non-negative int or 'all', got {worker!r}")
    return worker


def make_topic(event_type: str, run: str, worker: int | str) -> bytes:
    """Build the topic frame, checking each part so producers fail early and clearly."""
    if not _TYPE_PATTERN.fullmatch(event_type):
        raise ProtocolError("bad_topic", f"bad event type {event_type!r}")
    if not isinstance(run, str) or not RUN_PATTERN.fullmatch(run):
        raise ProtocolError("bad_run", f"run must match [A-Za-z0-9._-]{{1,64}}, got {run!r}")
    worker = _check_worker(worker)
    return f"{event_type}/{run}/{worker}".encode()


def parse_topic(topic: bytes | str) -> Topic:
    """Parse ``"<type>/<run>/<worker>"``; raise ProtocolError("bad_topic") otherwise."""
    if isinstance(topic, bytes):
        try:
            topic = topic.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad_topic", "topic is not UTF-8") from None
    parts = topic.split("/")
    if len(parts) != 3:
        raise ProtocolError("bad_topic", f"expected <type>/<run>/<worker>, got {topic[:80]!r}")
    event_type, run, worker_text = parts
    if not _TYPE_PATTERN.fullmatch(event_type) or not RUN_PATTERN.fullmatch(run):
        raise ProtocolError("bad_topic", f"bad type or run in {topic[:80]!r}")
    if worker_text == ALL_WORKERS:
        return Topic(event_type, run, ALL_WORKERS)
    if not worker_text.isascii() or not worker_text.isdigit() or len(worker_text) > 9:
        raise ProtocolError("bad_topic", f"bad worker in {topic[:80]!r}")
    return Topic(event_type, run, int(worker_text))


def topic_prefix(event_type: str | None = None, run: str | None = None,
                 worker: int | str | None = None) -> bytes:
    """The subscription prefix selecting a type, a run of a type, or one worker.

    A run filter without a type cannot be a single prefix (the type comes first); callers
    then subscribe per type, see :func:`subscription_prefixes`.
    """
    if event_type is None:
        return b""
    prefix = f"{event_type}/"
    if run is None:
        return prefix.encode()
    prefix += f"{run}/"
    if worker is None:
        return prefix.encode()
    # No trailing separator exists after the worker: the exact topic is the prefix, and
    # "3" must not also select "30", so callers re-check the parsed worker.
    return (prefix + str(worker)).encode()


def subscription_prefixes(types: list[str] | None, run: str | None,
                          worker: int | str | None) -> list[bytes]:
    """All prefixes needed for a (types, run, worker) filter; unknown combos fall back to
    a wider prefix, and consumers re-check with :func:`matches`."""
    if not types:
        if run is None:
            return [b""]
        types = list(EVENT_TYPES)
    return [topic_prefix(t, run, worker) for t in types]


def matches(event: Event, types: list[str] | None, run: str | None,
            worker: int | str | None) -> bool:
    """Exact filter check after prefix subscription (prefixes are only a coarse cut)."""
    if types and event.type not in types:
        return False
    if run is not None and event.run != run:
        return False
    return worker is None or str(event.worker) == str(worker)


# --------------------------------------------------------------------------- codec


def pack(payload: dict[str, Any]) -> bytes:
    """msgpack-encode a payload map (floats stay float64, so NaN/inf survive)."""
    return msgpack.packb(payload, use_bin_type=True)


def encode(payload: dict[str, Any]) -> list[bytes]:
    """Both frames of a message from a complete payload (envelope included)."""
    return [make_topic(payload["type"], payload["run"], payload["worker"]), pack(payload)]


def _kind_ok(kind: str, value: Any) -> bool:
    if kind == "float":
        return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool))
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "map":
        return isinstance(value, dict)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "list":
        return isinstance(value, list)
    return True


class _FastSchema:
    """Precomputed C-level checks for one type's schema: a payload whose fields all have
    the exact expected Python types passes in a few set operations; anything else takes
    the field-by-field path that names the offending field."""

    def __init__(self, required: dict[str, str], optional: dict[str, str]) -> None:
        self.required_names = frozenset(required)
        floats = tuple(n for n, k in required.items() if k == "float")
        ints = tuple(n for n, k in required.items() if k == "int")
        self.required_floats = operator.itemgetter(*floats) if len(floats) > 1 else None
        self.required_ints = operator.itemgetter(*ints) if len(ints) > 1 else None
        self.optional_floats = frozenset(n for n, k in optional.items() if k == "float")
        self.optional_ints = frozenset(n for n, k in optional.items() if k == "int")
        self.optional_strs = frozenset(n for n, k in optional.items() if k == "str")
        self.optional_other = (frozenset(optional) - self.optional_floats - self.optional_ints
                               - self.optional_strs)
        self.simple = (len(floats) + len(ints) == len(required) and self.required_floats is not None
                       and self.required_ints is not None and not self.optional_other)

    def fast_ok(self, payload: dict[str, Any]) -> bool:
        if not self.simple or not self.required_names <= payload.keys():
            return False
        assert self.required_floats is not None and self.required_ints is not None
        if set(map(type, self.required_floats(payload))) != _JUST_FLOAT:
            return False
        if set(map(type, self.required_ints(payload))) != _JUST_INT:
            return False
        present = payload.keys() & self.optional_floats
        if present and not set(map(type, map(payload.__getitem__, present))) <= _FLOAT_OR_NONE:
            return False
        present = payload.keys() & self.optional_ints
        if present and not set(map(type, map(payload.__getitem__, present))) <= _INT_OR_NONE:
            return False
        if not self.optional_strs:
            return True
        present = payload.keys() & self.optional_strs
        return not present or set(map(type, map(payload.__getitem__, present))) <= _STR_OR_NONE


_JUST_FLOAT = {float}
_JUST_INT = {int}
_FLOAT_OR_NONE = {float, type(None)}
_INT_OR_NONE = {int, type(None)}
_STR_OR_NONE = {str, type(None)}
_FAST_SCHEMAS = {name: _FastSchema(*schema) for name, schema in SCHEMAS.items()}


def validate_fields(payload: dict[str, Any], event_type: str) -> None:
    """Check a type's own fields in place; ints given for float fields become floats."""
    schema = SCHEMAS.get(event_type)
    if schema is None:
        return
    if _FAST_SCHEMAS[event_type].fast_ok(payload):
        return
    required, optional = schema
    for name, kind in required.items():
        if name not in payload or payload[name] is None:
            raise ProtocolError(f"missing_field:{name}")
        value = payload[name]
        if not _kind_ok(kind, value):
            raise ProtocolError(f"bad_type:{name}", f"expected {kind}, got {type(value).__name__}")
        if kind == "float" and not isinstance(value, float):
            payload[name] = float(value)
    for name, kind in optional.items():
        value = payload.get(name)
        if value is None:
            continue
        if not _kind_ok(kind, value):
            raise ProtocolError(f"bad_type:{name}", f"expected {kind}, got {type(value).__name__}")
        if kind == "float" and not isinstance(value, float):
            payload[name] = float(value)
    if event_type == ALERT:
        if payload["state"] not in ALERT_STATES:
            raise ProtocolError("bad_value:state", repr(payload["state"]))
        if payload["severity"] not in ALERT_SEVERITIES:
            raise ProtocolError("bad_value:severity", repr(payload["severity"]))


_TOPIC_CACHE: dict[bytes, Topic] = {}
_TOPIC_CACHE_SIZE = 65536
_JUST_STR = {str}
_ENVELOPE_TYPES = (str, str, str, int, float)


def decode(frames: list[bytes] | tuple[bytes, ...],
           max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, check_schema: bool = True) -> Event:
    """Decode and validate one received message, or raise :class:`ProtocolError`.

    Checks, in order: frame count, size, topic syntax, msgpack, map with string keys,
    version, envelope types, topic/payload agreement, the type's schema, then nesting
    depth (``too_deep``, see :data:`MAX_NESTING`). ``check_schema=False`` stops after the
    envelope: for a consumer that only accounts for an event (its seq, session, clock)
    without using its fields, e.g. the monitor shedding load.
    """
    if len(frames) != 2:
        raise ProtocolError("bad_frame_count", f"expected 2 frames, got {len(frames)}")
    topic_bytes, payload_bytes = bytes(frames[0]), bytes(frames[1])
    if len(topic_bytes) + len(payload_bytes) > max_bytes:
        raise ProtocolError("too_large", f"{len(topic_bytes) + len(payload_bytes)} > {max_bytes} bytes")
    topic = _TOPIC_CACHE.get(topic_bytes)
    if topic is None:
        topic = parse_topic(topic_bytes)
        if len(_TOPIC_CACHE) >= _TOPIC_CACHE_SIZE:
            _TOPIC_CACHE.clear()  # bounded: a flood of distinct topics cannot grow it
        _TOPIC_CACHE[topic_bytes] = topic
    try:
        payload = msgpack.unpackb(payload_bytes, raw=False, strict_map_key=False, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError("not_msgpack", type(exc).__name__) from None
    if not isinstance(payload, dict):
        raise ProtocolError("not_a_map", type(payload).__name__)
    if set(map(type, payload)) != _JUST_STR:
        for key in payload:
            if not isinstance(key, str):
                raise ProtocolError("bad_key", f"non-string key {key!r:.40}")

    version = payload.get("v")
    if version is None:
        raise ProtocolError("missing_field:v")
    if not _kind_ok("int", version):
        raise ProtocolError("bad_type:v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"v={version}")
    try:
        envelope_types = (type(payload["type"]), type(payload["run"]), type(payload["session"]),
                          type(payload["seq"]), type(payload["ts"]))
    except KeyError:
        envelope_types = None
    if envelope_types != _ENVELOPE_TYPES:
        for name, kind in (("type", "str"), ("run", "str"), ("session", "str"), ("seq", "int"),
                           ("ts", "float")):
            value = payload.get(name)
            if value is None:
                raise ProtocolError(f"missing_field:{name}")
            if not _kind_ok(kind, value):
                raise ProtocolError(f"bad_type:{name}")
    if "worker" not in payload:
        raise ProtocolError("missing_field:worker")
    worker = payload["worker"]
    if worker != ALL_WORKERS and not _kind_ok("int", worker):
        raise ProtocolError("bad_type:worker")
    if payload["seq"] < 0:
        raise ProtocolError("bad_value:seq", "seq must be >= 0")
    if (payload["type"] != topic.type or payload["run"] != topic.run
            or worker != topic.worker):
        raise ProtocolError("topic_mismatch",
                            f"topic {topic} vs payload {payload['type']}/{payload['run']}/{worker}")
    ts = payload["ts"]
    if not isinstance(ts, float):
        payload["ts"] = ts = float(ts)
    if not check_schema:
        return Event(topic.type, topic.run, topic.worker, payload["session"], payload["seq"],
                     ts, payload, (topic_bytes, payload_bytes))
    validate_fields(payload, topic.type)
    if nesting_exceeds(payload):
        raise ProtocolError("too_deep", f"maps/lists nested deeper than {MAX_NESTING} levels")
    return Event(topic.type, topic.run, topic.worker, payload["session"], payload["seq"], ts,
                 payload, (topic_bytes, payload_bytes))


def nesting_exceeds(fields: dict[str, Any], limit: int = MAX_NESTING) -> bool:
    """True when maps/lists in ``fields`` nest deeper than ``limit`` levels (iterative, so
    the check itself cannot hit the recursion limit; flat events cost one C-level scan)."""
    if _CONTAINER_TYPES.isdisjoint(map(type, fields.values())):
        return False
    stack: list[tuple[Any, int]] = [(fields, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


# --------------------------------------------------------------------------- JSON


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def to_json(payload: dict[str, Any]) -> str:
    """One strict-JSON line: non-finite floats become "nan", "inf", "-inf"; bytes hex."""
    return json.dumps(_json_safe(payload), allow_nan=False, separators=(",", ":"))


def from_json_value(value: Any) -> Any:
    """Inverse of the non-finite mapping, for tools that read JSON lines back."""
    if value == "nan":
        return math.nan
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    return value
