"""EventPublisher: envelope stamping and non-blocking sends for any process that publishes
events other than a training worker's hot path (alerting, aggregator, synthetic publisher,
replay).

Guarantee: at most once, never blocking (NOBLOCK on a PUB with a bounded SNDHWM). Each
(run, worker) gets its own session id and each topic its own ``seq`` counter, so that a
consumer filtering on one run or worker sees a gap-free sequence (every gap it does see is
real loss), and a worker's heartbeats share its updates' session as an emitter's do.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import zmq

from bus import endpoints, protocol, transport


class EventPublisher:
    """Publishes validated protocol-v1 events to the daemon's publish side."""

    def __init__(self, publish: str | None = None, curve_client: str | None = None,
                 sndhwm: int = transport.PUBLISHER_SNDHWM) -> None:
        self.endpoint = endpoints.resolve("publish", publish)
        self._sock = transport.publisher(self.endpoint,
                                         endpoints.resolve_curve_client(curve_client), sndhwm=sndhwm)
        self._sessions: dict[tuple[str, int | str], str] = {}
        self._next_seq: dict[bytes, int] = {}
        self.sent = 0
        self.dropped = 0

    def stamp(self, event_type: str, run: str, worker: int | str,
              fields: dict[str, Any], ts: float | None = None) -> list[bytes]:
        """Frames for one event: envelope added, the type's schema checked (raises
        ProtocolError on a programming error), seq advanced."""
        topic = protocol.make_topic(event_type, run, worker)
        session = self._sessions.get((run, worker))
        if session is None:
            session = self._sessions[(run, worker)] = uuid.uuid4().hex[:16]
        seq = self._next_seq.get(topic, 0)
        payload = dict(fields)
        payload.update(v=protocol.PROTOCOL_VERSION, type=event_type, run=run, worker=worker,
                       session=session, seq=seq, ts=time.time() if ts is None else ts)
        protocol.validate_fields(payload, event_type)
        self._next_seq[topic] = seq + 1
        return [topic, protocol.pack(payload)]

    def publish(self, event_type: str, run: str, worker: int | str,
                fields: dict[str, Any], ts: float | None = None) -> bool:
        """Stamp and send; False (and ``dropped`` + 1) if ZeroMQ refused it."""
        return self.send_frames(self.stamp(event_type, run, worker, fields, ts))

    def send_frames(self, frames: list[bytes]) -> bool:
        """Send already-encoded frames as they are (replay, tests of hostile input)."""
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def wait_for_bus(self, timeout_s: float = 5.0) -> bool:
        """Wait until the daemon (or a direct subscriber) has subscribed, so the first
        events are not dropped by the sender's filter. False on timeout."""
        return transport.wait_for_subscriber(self._sock, timeout_s)

    def close(self, linger_ms: int = transport.DEFAULT_LINGER_MS) -> None:
        self._sock.close(linger=linger_ms)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
