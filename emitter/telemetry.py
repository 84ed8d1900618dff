"""TelemetryEmitter: what a training process calls once per PPO update.

Guarantee: **at most once, never blocking.** ``emit_ppo_update`` stamps the envelope,
encodes and hands the two frames to a PUB socket with NOBLOCK. When the daemon is absent,
restarting or slow, ZeroMQ queues up to ``sndhwm`` messages per connection and then drops;
the training thread pays the same few microseconds either way. Loss is visible downstream
as gaps in ``seq`` (per session and type); ``dropped`` here counts only what the emitter
itself could not hand over (a refused send or a closed emitter).

Caller-side checks raise TypeError/ValueError naming the field, because a typo in a
metric name is a bug in the training script and should fail there, not in a dashboard.

**Finished is not silent.** ``close()`` ends the session with one last heartbeat carrying
``closing: true``, so consumers can tell a worker that finished from one that died (and
alerting need not page about it). It goes out on the *main* socket, behind the last
``ppo_update`` on the same connection: ZeroMQ keeps order within a connection, never across
two, and a consumer that saw "closing" and then a later update would have to take the
session for live again. It takes the next heartbeat ``seq`` from the heartbeat thread's
counter (under a lock, after that thread has stopped), so the sequence stays gap-free.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import weakref
from typing import Any

import msgpack
import zmq

from bus import endpoints, protocol, transport
from emitter import identity

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL_S = 2.0
#: The closing heartbeat travels on another connection than the periodic ones. When one of
#: those left just before close(), wait this long before sending the closing one (so it
#: cannot overtake it at the daemon and show up as a false one-event gap); a close that
#: comes later than this after the last heartbeat (nearly always) does not wait at all.
HEARTBEAT_SETTLE_S = 0.05

_FLOAT_FIELDS = tuple(k for k, v in protocol.PPO_UPDATE_REQUIRED.items() if v == "float")
_INT_FIELDS = tuple(k for k, v in protocol.PPO_UPDATE_REQUIRED.items() if v == "int")
# emit_ppo_update spells its required-field checks out (a subscript and a `type(x) is`
# per field: about a third of a generic set-of-types scan). Should the schema change, fail
# at import rather than check the wrong fields.
_SPELLED_OUT_FLOATS = ("grad_norm", "pre_clip_grad_norm", "max_grad_norm", "policy_loss",
                       "value_loss", "entropy", "approx_kl", "clip_fraction", "lr")
if set(_FLOAT_FIELDS) != set(_SPELLED_OUT_FLOATS) or _INT_FIELDS != ("update", "env_steps"):
    raise RuntimeError("emit_ppo_update's spelled-out checks do not match "
                       f"protocol.PPO_UPDATE_REQUIRED: floats {_FLOAT_FIELDS}, ints {_INT_FIELDS}")
_N_REQUIRED = len(protocol.PPO_UPDATE_REQUIRED)
_OPTIONAL_INT = frozenset(k for k, v in protocol.PPO_UPDATE_OPTIONAL.items() if v == "int")
_OPTIONAL_FLOAT = frozenset(k for k, v in protocol.PPO_UPDATE_OPTIONAL.items() if v == "float")
_ENVELOPE = frozenset(protocol.ENVELOPE_FIELDS)
_OPTIONAL_OR_ENVELOPE = _ENVELOPE | _OPTIONAL_INT | _OPTIONAL_FLOAT
# Plain ints: pyzmq's enum flags cost microseconds of Python per send on this hot path.
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)
#: The compiled send of pyzmq's backend, called with our socket. ``zmq.Socket.send`` is a
#: Python wrapper around it (routing_id/group handling we never use) that cost ~0.7 µs of
#: the ~1 µs per frame on the project's VM; the backend send copies the bytes into a
#: zmq_msg and calls zmq_msg_send, raising zmq.Again exactly as the wrapper does.
_zmq_send = zmq.backend.Socket.send
_time = time.time
_FLOAT_OR_NONE = {float, type(None)}
_INT_OR_NONE = {int, type(None)}


def _map_header_size(entries: int) -> int:
    """Bytes of the msgpack map header for a map of ``entries`` (fixmap / map16 / map32)."""
    return 1 if entries <= 15 else 3 if entries <= 0xFFFF else 5


# Emitters alive in this process: a fork copies them, but their sockets belong to the
# parent's Context, so the child must reopen before sending (checked with no syscall).
_live_emitters: weakref.WeakSet[TelemetryEmitter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for emitter in list(_live_emitters):
        emitter._forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


class TelemetryEmitter:
    """Publishes ``ppo_update`` (and ``heartbeat``) events for one (run, worker).

    Create it inside the training process (after fork/spawn). Use as a context manager or
    call :meth:`close`; closing waits at most ``linger_ms`` for queued events.

    ``run`` and ``worker`` may be left out: the worker id then comes from ``RANK`` (torchrun,
    Ray Train), the run from ``TRAINBUS_RUN``, else torchrun's ``TORCHELASTIC_RUN_ID``, else
    a generated name logged once; heartbeats carry ``node`` from ``GROUP_RANK``/``NODE_RANK``
    (see :mod:`emitter.identity`). A run name outside ``[A-Za-z0-9._-]{1,64}`` (such as
    ``ALE/Breakout-v5``) is sanitised with one :class:`emitter.identity.RunNameWarning`;
    a worker id that is not a non-negative int is an error here, before training starts.
    """

    def __init__(self, run: str | None = None, worker: int | None = None,
                 publish: str | None = None, *,
                 curve_client: str | None = None,
                 heartbeat_interval: float | None = DEFAULT_HEARTBEAT_INTERVAL_S,
                 sndhwm: int = transport.PUBLISHER_SNDHWM,
                 linger_ms: int = transport.DEFAULT_LINGER_MS) -> None:
        who = identity.resolve_identity(run, worker, stacklevel=3)
        self.run = who.run
        self.worker = who.worker
        self.node = who.node
        self.identity = who
        self._topic = protocol.make_topic(protocol.PPO_UPDATE, self.run, self.worker)
        self.endpoint = endpoints.resolve("publish", publish)
        self.curve_client = endpoints.resolve_curve_client(curve_client)
        self.session = uuid.uuid4().hex[:16]
        self.sent = 0
        self.dropped = 0
        self.last_update: int | None = None
        self._seq = 0
        self._sndhwm = sndhwm
        self._linger_ms = linger_ms
        self._closed = False
        self._forked = False
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._heartbeat_lock = threading.Lock()
        self._heartbeat_seq = 0
        self._last_heartbeat_at: float | None = None
        self._open()
        _live_emitters.add(self)

    # ------------------------------------------------------------------ lifecycle

    def _open(self) -> None:
        self._sock = transport.publisher(self.endpoint, self.curve_client, sndhwm=self._sndhwm)
        self._sock.linger = self._linger_ms
        # A Packer of our own (packb builds one per call); used only by the training thread.
        packer = msgpack.Packer(use_bin_type=True)
        self._pack = packer.pack
        self._pack_map_header = packer.pack_map_header
        # The envelope fields that stay the same for the whole session, packed once (as
        # map entries without a header): each event packs only its fields, seq and ts.
        envelope = {"v": protocol.PROTOCOL_VERSION, "type": protocol.PPO_UPDATE,
                    "run": self.run, "worker": self.worker, "session": self.session}
        self._envelope = packer.pack(envelope)[_map_header_size(len(envelope)):]
        self._envelope_entries = len(envelope)
        self._set_prefix(_N_REQUIRED + 2)  # the 11 required fields, seq and ts
        self._forked = False
        # The heartbeat seq (per session: a reopened emitter starts again at 0) and the time
        # of the last periodic beat are shared by the heartbeat thread and close(); the lock
        # makes "take the next seq and send" atomic, so no periodic heartbeat can follow
        # (or share a seq with) the closing one. A new lock per session: one copied by
        # fork while the parent's heartbeat thread held it would stay locked for ever.
        self._heartbeat_lock = threading.Lock()
        self._heartbeat_seq = 0
        self._last_heartbeat_at = None
        if self._heartbeat_interval:
            self._heartbeat_stop = threading.Event()
            self._heartbeat_thread = threading.Thread(
                target=self._heartbeat_loop, name=f"trainbus-heartbeat-{self.worker}", daemon=True)
            self._heartbeat_thread.start()

    def _reopen_after_fork(self) -> None:
        # The inherited socket belongs to the parent's Context: abandon it (never close it
        # from the child) and start over as a new session, as a restarted worker would.
        self.session = uuid.uuid4().hex[:16]
        self._seq = 0
        self._open()

    def wait_for_bus(self, timeout_s: float = 5.0) -> bool:
        """Optionally block until the daemon has subscribed (a PUB-family socket drops
        events sent before that). Training never needs this; scripts and tests that must
        account for every event do. False on timeout."""
        return transport.wait_for_subscriber(self._sock, timeout_s)

    def close(self) -> None:
        """Stop heartbeats, send the closing heartbeat and close the socket, waiting at
        most ``linger_ms`` for queued events (the closing heartbeat never blocks: NOBLOCK).

        With heartbeats off (``heartbeat_interval=None``) no closing heartbeat is sent
        either: such an emitter announces nothing about its liveness, its end included.
        """
        if self._closed:
            return
        self._closed = True
        self._heartbeat_stop.set()
        if self._forked:
            return  # the socket belongs to the parent's Context: never touch it here
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=1.0)
        if self._heartbeat_interval:
            self._send_closing_heartbeat()
        self._sock.close(linger=self._linger_ms)

    def __enter__(self) -> TelemetryEmitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sending

    def emit_ppo_update(self, **fields: Any) -> bool:
        """Publish one ppo_update; returns True if handed to ZeroMQ, False if dropped.

        Required: update, env_steps (int) and grad_norm, pre_clip_grad_norm, max_grad_norm,
        policy_loss, value_loss, entropy, approx_kl, clip_fraction, lr (float; NaN/inf are
        allowed and carried). Optional fields may be None (= not measured). Extra fields
        are passed on as they are.

        This is the training thread's cost per update, so it is written for speed (see
        README, Performance): the usual call (exact types, no envelope keys) takes a
        subscript and an identity check per required field, one msgpack call for the
        fields that change per event (the session's envelope is packed once), and two
        compiled sends. Anything unusual falls to the checked slow paths, which convert
        or raise naming the field.
        """
        try:  # in schema order, so a call missing several fields names the first
            update = fields["update"]
            env_steps = fields["env_steps"]
            grad = fields["grad_norm"]
            pre = fields["pre_clip_grad_norm"]
            max_norm = fields["max_grad_norm"]
            p_loss = fields["policy_loss"]
            v_loss = fields["value_loss"]
            ent = fields["entropy"]
            kl = fields["approx_kl"]
            clip = fields["clip_fraction"]
            lr = fields["lr"]
        except KeyError as exc:
            raise TypeError(f"emit_ppo_update() missing required field {exc.args[0]!r}") from None
        if not (type(grad) is float and type(pre) is float and type(max_norm) is float
                and type(p_loss) is float and type(v_loss) is float and type(ent) is float
                and type(kl) is float and type(clip) is float and type(lr) is float):
            self._coerce(fields, _FLOAT_FIELDS, float, optional=False)
        if not (type(update) is int and type(env_steps) is int and update >= 0
                and env_steps >= 0):
            self._coerce(fields, _INT_FIELDS, int, optional=False)
            update = fields["update"]
        # All 11 required keys are present: 11 entries means nothing else to look at.
        if len(fields) != _N_REQUIRED and not _OPTIONAL_OR_ENVELOPE.isdisjoint(fields):
            self._check_optional(fields)
        if self._forked:
            self._reopen_after_fork()
        if self._closed:
            self.dropped += 1
            return False
        seq = self._seq
        fields["seq"] = seq
        fields["ts"] = _time()
        # Packed before anything is sent: a field msgpack cannot encode raises TypeError
        # here, with no topic frame left half-sent (it would prefix the next message) and
        # no seq used up (a consumer would count a false loss).
        body = self._pack(fields)
        # The wire map = a header for all its entries + the session's pre-packed envelope
        # + this event's entries (``body`` without its own header). Key order differs from
        # a packed dict's, which the protocol gives no meaning (README, Wire protocol).
        if len(fields) != self._prefix_entries:
            self._set_prefix(len(fields))
        payload = self._prefix + body[self._skip:]
        self._seq = seq + 1
        self.last_update = update
        sock = self._sock
        try:
            _zmq_send(sock, self._topic, _SNDMORE_NOBLOCK)
            _zmq_send(sock, payload, _NOBLOCK)
        except zmq.ZMQError:  # zmq.Again: the queue is at SNDHWM; or the socket is gone
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def _set_prefix(self, entries: int) -> None:
        """The wire prefix for events of ``entries`` fields (seq and ts included): a map
        header for those plus the envelope's, then the pre-packed envelope; and how many
        header bytes to skip of a packed map of ``entries``. Kept for the last size seen:
        a training loop sends the same fields every update."""
        self._prefix = self._pack_map_header(entries + self._envelope_entries) + self._envelope
        self._skip = _map_header_size(entries)
        self._prefix_entries = entries

    def _check_optional(self, fields: dict[str, Any]) -> None:
        """Slow path for calls with more than the required fields: no envelope keys (the
        emitter owns those), and optional schema fields of their type or None."""
        if not _ENVELOPE.isdisjoint(fields):
            raise ValueError("emit_ppo_update() fields may not set envelope keys "
                             f"{sorted(_ENVELOPE & fields.keys())}")
        present = fields.keys() & _OPTIONAL_FLOAT
        if present and not set(map(type, map(fields.__getitem__, present))) <= _FLOAT_OR_NONE:
            self._coerce(fields, present, float, optional=True)
        present = fields.keys() & _OPTIONAL_INT
        if present and not set(map(type, map(fields.__getitem__, present))) <= _INT_OR_NONE:
            self._coerce(fields, present, int, optional=True)

    @staticmethod
    def _coerce(fields: dict[str, Any], names: Any, kind: type, optional: bool) -> None:
        """Slow path: convert numbers of other types (numpy, 0-d tensors, ints for floats)
        and raise a clear error naming the field for anything else. Text is not a number
        even where float() would parse it ("1.5", b"2"): a consumer rejects a string field
        (schema), so the emitter must not quietly turn the caller's bug into a number."""
        for name in names:
            value = fields[name]
            if value is None and optional:
                continue
            what = kind.__name__ + (" or None" if optional else "")
            if isinstance(value, (bool, str, bytes, bytearray)):
                raise TypeError(f"emit_ppo_update() field {name!r} must be {what}, "
                                f"got {type(value).__name__} {value!r:.40}")
            try:
                if kind is float:
                    converted: Any = float(value)
                elif isinstance(value, float):
                    if not value.is_integer():
                        raise TypeError
                    converted = int(value)
                else:
                    converted = int(value.__index__())
            except (TypeError, ValueError, AttributeError):
                raise TypeError(f"emit_ppo_update() field {name!r} must be {what}, "
                                f"got {type(value).__name__} {value!r:.40}") from None
            if kind is int and converted < 0:
                raise ValueError(f"emit_ppo_update() field {name!r} must be >= 0, got {converted}")
            fields[name] = converted

    # ------------------------------------------------------------------ heartbeat

    def _heartbeat_payload(self, seq: int, interval: float, host: str) -> dict[str, Any]:
        payload = {
            "v": protocol.PROTOCOL_VERSION, "type": protocol.HEARTBEAT, "run": self.run,
            "worker": self.worker, "session": self.session, "seq": seq, "ts": time.time(),
            "interval_s": interval, "pid": os.getpid(), "host": host,
            "events_sent": self.sent, "events_dropped": self.dropped,
            "last_update": self.last_update,
        }
        if self.node is not None:  # the launcher's node index (GROUP_RANK / NODE_RANK)
            payload["node"] = self.node
        return payload

    def _send_closing_heartbeat(self) -> None:
        """The session's last heartbeat, ``closing: true``, on the main socket (see the
        module docstring for why that socket and this seq)."""
        with self._heartbeat_lock:  # the heartbeat thread has stopped or stops at its next beat
            seq = self._heartbeat_seq
            self._heartbeat_seq += 1
            last_beat = self._last_heartbeat_at
        if last_beat is not None:
            settle = HEARTBEAT_SETTLE_S - (time.monotonic() - last_beat)
            if settle > 0:
                time.sleep(settle)
        interval = float(self._heartbeat_interval or DEFAULT_HEARTBEAT_INTERVAL_S)
        payload = self._heartbeat_payload(seq, interval, socket.gethostname())
        payload["closing"] = True
        topic = protocol.make_topic(protocol.HEARTBEAT, self.run, self.worker)
        try:
            self._sock.send(topic, _SNDMORE_NOBLOCK)
            self._sock.send(protocol.pack(payload), _NOBLOCK)
        except zmq.ZMQError:
            pass  # no daemon and a full queue: the consumers will see silence, as before

    def _heartbeat_loop(self) -> None:
        """Heartbeats from a thread with its own socket (sockets are not thread-safe), so a
        worker in a long update or evaluation still shows as alive."""
        interval = float(self._heartbeat_interval or DEFAULT_HEARTBEAT_INTERVAL_S)
        topic = protocol.make_topic(protocol.HEARTBEAT, self.run, self.worker)
        sock = transport.publisher(self.endpoint, self.curve_client, sndhwm=16)
        sock.linger = 0
        # Wait (interruptibly) for the daemon, so the first heartbeat is not filtered away.
        while not self._heartbeat_stop.is_set():
            if transport.wait_for_subscriber(sock, min(interval, 0.5)):
                break
        host = socket.gethostname()
        try:
            while True:
                with self._heartbeat_lock:
                    # Checked under the lock: once close() has taken the closing seq, no
                    # periodic heartbeat may go out after it.
                    if self._heartbeat_stop.is_set():
                        break
                    payload = self._heartbeat_payload(self._heartbeat_seq, interval, host)
                    self._heartbeat_seq += 1
                    try:
                        sock.send_multipart([topic, protocol.pack(payload)], zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                    self._last_heartbeat_at = time.monotonic()
                self._heartbeat_stop.wait(interval)
        finally:
            # A short linger, not 0: a beat sent just before close() must still leave, or
            # the closing heartbeat's seq would show a false gap. Bounded, so exiting
            # never waits on an absent daemon for longer than this.
            sock.close(linger=int(HEARTBEAT_SETTLE_S * 1000))

