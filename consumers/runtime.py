"""The subscriber runtime every consumer process shares.

Guarantees to the consumer on top of it:

* **Validated input only.** Each message is decoded with :func:`bus.protocol.decode`; bad
  ones are counted by reason in ``stats.rejected`` and skipped. Nothing raises on input.
* **Late join with history.** The SUB socket subscribes first; once its connection is up
  it asks the daemon's snapshot port for the cached last events of every stream (the
  ZeroMQ Guide's Clone pattern) and hands those out before live events. Live events the
  snapshot already covered are dropped by (session, type, seq). The same happens after a
  daemon restart, so a consumer resumes without being restarted itself.
* **Loss is visible.** Per (session, type) gaps in ``seq`` are counted; per (run, worker)
  a new session is a restart (its seq reset is not loss).
* **Own clock for staleness.** ``StreamState.last_received`` is this process's monotonic
  clock, so a producer with a skewed wall clock cannot make a stream look fresh.
* **Finished is not silent.** ``StreamState.finished`` is True once the stream's current
  session sent its closing heartbeat (``closing: true``, from ``TelemetryEmitter.close()``):
  the worker ended, so a consumer should show it as done rather than judge its silence.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from bus import endpoints, protocol, transport
from bus.lifecycle import install_stop_handlers

log = logging.getLogger(__name__)

__all__ = ["Subscriber", "StreamBook", "StreamState", "SubscriberStats", "install_stop_handlers",
           "is_closing_heartbeat"]

SNAPSHOT_REQUEST = b"SNAPSHOT"
SNAPSHOT_REPLY = b"SNAPSHOT"
#: How long one snapshot request may take before the consumer goes on live-only.
SNAPSHOT_TIMEOUT_MS = 1000
#: Most messages handled per poll() call, so a flood cannot starve a consumer's redraws.
MAX_BATCH = 5000
#: After the daemon refuses this client's CURVE key, try again this often. ZeroMQ itself
#: gives up on a connection after a ZAP refusal, so without this a consumer started before
#: its key was added to authorized/ would stay locked out until restarted.
AUTH_RETRY_S = 1.0
_HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no_detail",
}
#: Streams (and their sequence books) silent this long are forgotten (the consumers'
#: ``--forget-after`` default): memory follows the workers that are alive, not every
#: session a long-lived consumer ever saw.
DEFAULT_FORGET_AFTER_S = 3600.0
#: Most streams a consumer keeps books for (least recently active dropped first).
DEFAULT_MAX_STREAMS = 10_000
#: Earlier sessions per stream whose late events are still recognised (and ignored).
RETIRED_SESSIONS = 4
#: How often poll() runs StreamBook.forget (it is O(streams)).
FORGET_EVERY_S = 1.0
#: How often poll() hands freed heap back to the OS (see release_freed_memory).
TRIM_EVERY_S = 10.0
#: Types a worker produces; only these make a (run, worker) stream "alive" or "restarted".
PRODUCER_TYPES = (protocol.PPO_UPDATE, protocol.HEARTBEAT)


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand heap that was freed back to the operating system (glibc ``malloc_trim``).

    Why: a consumer that fell behind once (a burst, a starved CPU) held up to its receive
    queue's worth of messages; once they are worked off and idle workers forgotten, glibc
    keeps the freed pages in its arenas (libzmq's I/O thread has one of its own), so the
    process's RSS would stay at the burst's high-water mark for weeks. A few milliseconds
    every TRIM_EVERY_S seconds make RSS follow what the consumer really holds."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def is_closing_heartbeat(event: protocol.Event) -> bool:
    """True for the heartbeat that ends its session (``closing: true``, see bus.protocol)."""
    return event.type == protocol.HEARTBEAT and event.fields.get("closing") is True


@dataclass(slots=True)
class StreamState:
    """What a consumer knows about one (run, worker) producer: the runtime's accounting,
    which every per-worker view (consumers.fleet) reads by reference instead of copying.

    ``finished``: the current session has closed (its closing heartbeat arrived), so its
    silence from then on is the end of the work, not a fault: views show it as done,
    aggregates stop counting it as live, silence alerts should skip it. Any later
    ppo_update or ordinary heartbeat of that session makes it live again (the emitter
    sends the closing heartbeat after its last update on the same connection, so this
    only happens to a producer that really kept going), and so does a new session (a
    restarted worker). Events of an older session arriving late change nothing.
    """

    run: str
    worker: int | str
    session: str | None = None
    sessions_seen: int = 0
    restarts: int = 0
    dropped: int = 0
    last_received: float = 0.0  # time.monotonic() on this machine, of a producer event
    last_ts: float | None = None  # producer wall clock of the newest event
    last_update: int | None = None
    updates_received: int = 0
    finished: bool = False
    #: Sessions this stream had before the current one, newest last (bounded): their late
    #: events change nothing, even once their sequence books have been forgotten.
    retired: deque[str] = field(default_factory=lambda: deque(maxlen=RETIRED_SESSIONS))
    touched: float = 0.0  # when the book last recorded any event of this key (own clock)

    def age(self, now: float | None = None) -> float:
        """Seconds since this consumer last heard from the stream (own clock)."""
        return (time.monotonic() if now is None else now) - self.last_received


class StreamBook:
    """Per-stream accounting of accepted events: duplicates and sequence gaps per (session,
    type), restarts, finished, own-clock age. Kept apart from the socket so that anything
    fed events with a clock of its own (the alert engine replaying a recording) keeps the
    same books as a live Subscriber.

    A late event of a session the stream had before its current one (a straggler after a
    restart) is passed on but changes nothing; the stream remembers a few earlier
    sessions (``retired``) so that holds even once their sequence books are gone.

    Memory follows the live streams, not history: :meth:`forget` drops streams and
    sequence books idle for ``forget_after`` seconds (a restarted worker's old session
    goes that way), and at most ``max_streams`` streams and ``max_sequences`` sequence
    books are kept, the least recently active dropped first (a flood of made-up names
    costs a bounded amount).
    """

    def __init__(self, *, forget_after: float = DEFAULT_FORGET_AFTER_S,
                 max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        self.forget_after = forget_after
        self.max_streams = max_streams
        self.max_sequences = 4 * max_streams
        self.streams: OrderedDict[tuple[str, int | str], StreamState] = OrderedDict()
        #: (session, type) -> (last seq, when last touched), least recently touched first.
        self._last_seq: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self.forgotten = 0  # streams dropped by forget() or the bound

    def record(self, event: protocol.Event, now: float) -> int | None:
        """Account one event received at ``now``: None for a duplicate (already seen by
        seq), else the number of events of its (session, type) lost just before it."""
        key = (event.session, event.type)
        entry = self._last_seq.get(key)
        last = entry[0] if entry is not None else None
        if last is not None and event.seq <= last:
            return None
        stream_key = (event.run, event.worker)
        streams = self.streams
        stream = streams.get(stream_key)
        if stream is None:
            stream = streams[stream_key] = StreamState(event.run, event.worker)
            if len(streams) > self.max_streams:
                self._drop_stream(next(iter(streams)))
        else:
            streams.move_to_end(stream_key)
        producer = event.type in PRODUCER_TYPES
        seqs = self._last_seq
        seqs[key] = (event.seq, now)
        if entry is not None:
            seqs.move_to_end(key)
        elif len(seqs) > self.max_sequences:
            seqs.popitem(last=False)
        stream.touched = now
        gap = event.seq - last - 1 if last is not None and event.seq > last + 1 else 0
        if producer and event.session != stream.session and \
                (last is not None or event.session in stream.retired):
            return gap  # a straggler from before the worker's restart: passed on, no effect
        if producer:
            stream.dropped += gap
            if stream.session != event.session and last is None:
                if stream.session is not None:
                    stream.restarts += 1
                    log.info("%s/%s restarted (new session %s)", event.run, event.worker, event.session)
                    stream.retired.append(stream.session)
                stream.session = event.session
                stream.sessions_seen += 1
            if event.session == stream.session:
                stream.finished = is_closing_heartbeat(event)
            stream.last_received = now
            if stream.last_ts is None or event.ts >= stream.last_ts:
                stream.last_ts = event.ts
            if event.type == protocol.PPO_UPDATE:
                stream.updates_received += 1
                stream.last_update = event.fields.get("update")
        return gap

    def _drop_stream(self, key: tuple[str, int | str]) -> None:
        stream = self.streams.pop(key)
        self.forgotten += 1
        if stream.session is not None:
            for kind in PRODUCER_TYPES:
                self._last_seq.pop((stream.session, kind), None)

    def forget(self, now: float) -> list[tuple[str, int | str]]:
        """Drop streams and sequence books idle for longer than ``forget_after``; returns
        the streams' keys. O(streams), so call it about once a second, not per event."""
        horizon = now - self.forget_after
        gone = [key for key, stream in self.streams.items() if stream.touched < horizon]
        for key in gone:
            self._drop_stream(key)
        seqs = self._last_seq
        while seqs:
            oldest = next(iter(seqs))
            if seqs[oldest][1] >= horizon:
                break
            del seqs[oldest]
        return gone

    def __len__(self) -> int:
        """Sequence books held (for memory tests: bounded by live sessions, not history)."""
        return len(self._last_seq)


@dataclass
class SubscriberStats:
    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    snapshot_events: int = 0
    snapshots: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    dropped_by_type: Counter[str] = field(default_factory=Counter)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped_by_type.values())


class Subscriber:
    """A SUB connection to the daemon with snapshot merge, validation and gap accounting."""

    def __init__(self, subscribe: str | None = None, snapshot: str | None = None, *,
                 curve_client: str | None = None, types: list[str] | None = None,
                 run: str | None = None, worker: int | str | None = None,
                 use_snapshot: bool = True,
                 max_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
                 rcvhwm: int = transport.SUBSCRIBER_RCVHWM,
                 forget_after: float = DEFAULT_FORGET_AFTER_S,
                 book: StreamBook | None = None) -> None:
        self.subscribe_endpoint = endpoints.resolve("subscribe", subscribe)
        self.snapshot_endpoint = endpoints.resolve("snapshot", snapshot) if use_snapshot else None
        self.curve_client = endpoints.resolve_curve_client(curve_client)
        self.types = list(types) if types else None
        self.run = run
        self.worker = worker
        self.max_bytes = max_bytes
        self.stats = SubscriberStats()
        #: The accounting; pass one in to share it with a per-worker model that reads it
        #: (consumers.fleet.Fleet), so both forget on the same clock.
        self.book = StreamBook(forget_after=forget_after) if book is None else book
        self.streams = self.book.streams
        self._next_forget = 0.0
        self._next_trim = time.monotonic() + TRIM_EVERY_S
        self.connected = False
        self.ever_connected = False
        self._prefixes = protocol.subscription_prefixes(self.types, run, worker)
        self._ctx = transport.context()
        self._sock = transport.subscriber(self.subscribe_endpoint, self._prefixes,
                                          self.curve_client, rcvhwm=rcvhwm, ctx=self._ctx,
                                          connect=False)
        # Monitor first, connect second: the snapshot (and, until it is in, every live
        # read) waits for HANDSHAKE_SUCCEEDED, so a handshake finished before the monitor
        # was attached would leave this consumer silent for ever.
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._sock.connect(self.subscribe_endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._snapshot_due = False
        self._first_snapshot_pending = self.snapshot_endpoint is not None
        self._closed = False
        #: Failed handshakes by kind ("auth": key refused; "protocol"/"no_detail": e.g.
        #: wrong server key, or CURVE on one side only). Warned about once per kind.
        self.handshake_failures: Counter[str] = Counter()
        self._retry_at: float | None = None

    @classmethod
    def from_args(cls, args: Any, **kwargs: Any) -> Subscriber:
        """Build from the flags of :func:`bus.cli.add_subscriber_arguments`."""
        return cls(getattr(args, "subscribe", None), getattr(args, "snapshot", None),
                   curve_client=getattr(args, "curve_client", None), **kwargs)

    # ------------------------------------------------------------------ polling

    def poll(self, timeout_ms: int = 100, max_messages: int = MAX_BATCH) -> list[protocol.Event]:
        """Events that arrived within ``timeout_ms`` (snapshot events first after a
        (re)connect), validated, filtered and de-duplicated. Never busy-waits. At most
        ``max_messages`` live messages are read per call (a consumer with a frame to draw
        passes a small number, so one call cannot outlast its time budget)."""
        events: list[protocol.Event] = []
        now = time.monotonic()
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_connect()
        if now >= self._next_forget:
            self._next_forget = now + FORGET_EVERY_S
            self.book.forget(now)
            if now >= self._next_trim:
                self._next_trim = now + TRIM_EVERY_S
                release_freed_memory()
        if self._first_snapshot_pending:
            # Until the first snapshot is in, leave live events queued in the SUB socket:
            # reading them first would make the (older) cached history look like duplicates.
            if self._monitor.poll(timeout_ms):
                self._drain_monitor()
            if not self._snapshot_due:
                return events
            live_ready = True
        else:
            ready = dict(self._poller.poll(timeout_ms))
            if self._monitor in ready:
                self._drain_monitor()
            live_ready = self._sock in ready
        if self._snapshot_due:
            self._snapshot_due = False
            self._first_snapshot_pending = False
            events.extend(self._fetch_snapshot())
            live_ready = True
        if live_ready:
            self._drain(events, max_messages)
        return events

    def _drain_monitor(self) -> None:
        while True:
            try:
                message = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if message["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if not self.connected:
                    log.info("connected to %s", self.subscribe_endpoint)
                self.connected = True
                self.ever_connected = True
                self._snapshot_due = self.snapshot_endpoint is not None
            elif message["event"] == zmq.EVENT_DISCONNECTED:
                if self.connected:
                    log.warning("daemon at %s went away; waiting for it", self.subscribe_endpoint)
                self.connected = False
            elif message["event"] in _HANDSHAKE_FAILED:
                self._handshake_failed(_HANDSHAKE_FAILED[message["event"]])

    def _handshake_failed(self, kind: str) -> None:
        self.handshake_failures[kind] += 1
        if kind == "auth":
            self._retry_at = time.monotonic() + AUTH_RETRY_S
            if self.handshake_failures["auth"] > 1:
                return
        elif sum(self.handshake_failures.values()) - self.handshake_failures["auth"] > 1:
            return
        if kind == "auth":
            log.warning("the daemon at %s refused this client's CURVE key (%s/client.key is not "
                        "in its authorized/ directory); retrying every %.0f s",
                        self.subscribe_endpoint, self.curve_client, AUTH_RETRY_S)
        elif self.curve_client:
            log.warning("CURVE handshake with %s failed: is %s/server.key the daemon's, and does "
                        "the daemon run with --curve? retrying", self.subscribe_endpoint,
                        self.curve_client)
        else:
            log.warning("handshake with %s failed: the daemon probably requires CURVE "
                        "(--curve-client DIR); retrying", self.subscribe_endpoint)

    def _retry_connect(self) -> None:
        """Connect again after a refused key (ZeroMQ does not retry those by itself)."""
        self._retry_at = None
        try:
            self._sock.disconnect(self.subscribe_endpoint)
        except zmq.ZMQError:
            pass  # ZeroMQ already dropped the endpoint
        self._sock.connect(self.subscribe_endpoint)

    def _drain(self, events: list[protocol.Event], limit: int = MAX_BATCH) -> int:
        """Read up to ``limit`` queued messages without waiting, each handed to
        :meth:`_take`; returns how many were read (``limit``: more may be queued).

        Frame by frame rather than ``recv_multipart``: ``recv(copy=False)`` and the frame's
        own ``more`` flag cost ~2 µs a message against ~3 µs (measured on the 2-core VM,
        20k two-frame messages), which is most of the receive cost at tens of thousands
        of events a second. Every frame of a message is still read, so a message of the
        wrong frame count is rejected (and counted) as one, exactly as before."""
        recv = self._sock.recv
        take = self._take
        read = 0
        while read < limit:
            try:
                frame = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            read += 1
            frames = [frame.bytes]
            while frame.more:  # a message's frames arrive together: the rest are queued
                frame = recv(zmq.NOBLOCK, copy=False)
                frames.append(frame.bytes)
            take(frames, events)
        return read

    def _take(self, frames: list[bytes], events: list[protocol.Event]) -> None:
        """One message read by :meth:`_drain`: validated, filtered and accounted for."""
        event = self._accept(frames)
        if event is not None:
            events.append(event)

    def _accept(self, frames: list[bytes], from_snapshot: bool = False) -> protocol.Event | None:
        self.stats.received += 1
        try:
            event = protocol.decode(frames, self.max_bytes)
        except protocol.ProtocolError as exc:
            self._reject(exc.reason, exc.detail)
            return None
        if (self.types is not None or self.run is not None or self.worker is not None) and \
                not protocol.matches(event, self.types, self.run, self.worker):
            return None
        gap = self.book.record(event, time.monotonic())
        if gap is None:
            self.stats.duplicates += 1
            return None
        if gap:
            self.stats.dropped_by_type[event.type] += gap
        self.stats.accepted += 1
        if from_snapshot:
            self.stats.snapshot_events += 1
        return event

    def _reject(self, reason: str, detail: str) -> None:
        self.stats.rejected[reason] += 1
        count = self.stats.rejected[reason]
        if count == 1 or count % 1000 == 0:
            log.warning("rejected message (%s%s), %d so far with this reason",
                        reason, f": {detail}" if detail else "", count)

    # ------------------------------------------------------------------ snapshot

    def _fetch_snapshot(self) -> list[protocol.Event]:
        """Ask the daemon for its cached events; on no answer, go on with live ones."""
        assert self.snapshot_endpoint is not None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.linger = 0
        if self.curve_client:
            transport.apply_curve_client(dealer, self.curve_client)
        events: list[protocol.Event] = []
        try:
            dealer.connect(self.snapshot_endpoint)
            dealer.send_multipart([SNAPSHOT_REQUEST, *self._prefixes])
            if not dealer.poll(SNAPSHOT_TIMEOUT_MS):
                log.warning("no snapshot from %s within %d ms; live events only",
                            self.snapshot_endpoint, SNAPSHOT_TIMEOUT_MS)
                return events
            reply = dealer.recv_multipart()
        finally:
            dealer.close(linger=0)
        if len(reply) < 2 or reply[0] != SNAPSHOT_REPLY or len(reply) % 2 != 0:
            self._reject("bad_snapshot", f"{len(reply)} frames")
            return events
        self.stats.snapshots += 1
        for i in range(2, len(reply), 2):
            event = self._accept([reply[i], reply[i + 1]], from_snapshot=True)
            if event is not None:
                events.append(event)
        return events

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
