"""The bus daemon: XSUB (publish side) → PUB (subscribe side) forwarded in C on a thread,
plus a last-value cache served on a ROUTER snapshot port for late joiners.

Guarantees:

* **Forwarding in C, at most once, never stalled by a subscriber.** The compiled forwarder
  (``bus/_cache.c``: the loop libzmq's ``zmq_proxy`` runs, zmq_msg_recv then zmq_msg_send,
  frame for frame) moves messages without entering Python, and caches each event as it
  passes. Where it was not built, libzmq's ``zmq_proxy_steerable`` forwards and the cache
  reads a copy of the stream from an inproc SUB of its own. The PUB drops for a subscriber
  whose queue (SNDHWM) is full; that subscriber sees the loss as seq gaps while publishers
  and the other subscribers keep full rate.
* **Size refused by ZeroMQ.** A frame over ``--max-msg-size`` is refused by ZeroMQ itself
  (ZMQ_MAXMSGSIZE on the publish side: the sender's connection is dropped, nothing is
  allocated or forwarded), so a hostile peer cannot make the daemon allocate without bound.
* **Everything else is forwarded as sent; consumers validate.** The daemon no longer
  drops structurally bad messages (wrong frame count, not a map, bad topic): every
  consumer validates every message anyway and counts rejects by reason. The cache path
  applies those structural checks to its own copy of the stream: what fails is never
  cached and is counted by reason in ``bus_stats.rejected``.
* **The cache never slows forwarding.** The compiled forwarder never waits for the cache:
  while the main thread holds it (a snapshot being copied), events are parked by
  reference and cached when it is free, up to a bound; beyond, an event is forwarded but
  not cached, counted in ``bus_stats.cache_dropped``. The fallback's feed reads in
  batches; if it fell a queue (FEED_RCVHWM) behind, the PUB would drop for it alone,
  counted the same way.
* **Bounded cache.** The last ``depth`` events per topic; streams idle longer than
  ``idle_evict_s`` and the least recently active beyond ``max_streams`` are evicted.

Federation (``--upstream EP``): a node daemon also forwards what its local publishers send
to a hub daemon's publish side, with a second ``zmq_proxy_steerable`` on a thread of its
own: an inproc SUB on the node's own PUB (subscribed to every event type but
``bus_stats``) → a PUB connected to the hub (a CURVE client with ``--upstream-curve``).
Proxies chain, so node → mid → hub works the same way. Events only ever travel up (the
hub never connects back), so a tree has no way to send an event back where it came
from; a cycle is a misconfiguration, and the obvious one (``--upstream`` naming this
daemon's own endpoint) is refused at start-up.

Snapshot protocol (DEALER or REQ client): request ``[b"SNAPSHOT", prefix...]`` (no
prefix, or an empty one, means everything); reply ``[b"SNAPSHOT", b"<n>", topic_1,
payload_1, ..., topic_n, payload_n]`` in arrival order, each pair the original two frames.
A request the daemon does not understand, or one naming more than 64 prefixes, gets
``[b"ERROR", b"<reason>"]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from bus import endpoints, lifecycle, protocol, transport
from bus.cache import CompiledCache, make_cache

log = logging.getLogger("trainbus.daemon")

CACHE_DEPTH = 10
#: nice of the daemon's main thread (cache, snapshots, bus_stats); the proxy threads and
#: ZeroMQ's I/O thread keep the process's own priority. When CPUs are short, forwarding
#: and the consumers on the same machine go first, and the cache (a side path with
#: seconds of queue) catches up after. Flat out on 2 cores, subscribers lost events by HWM
#: in 4 of 12 daemon runs without it, 1 of 15 with it; throughput moved within the noise.
CACHE_THREAD_NICE = 5
DEFAULT_MAX_STREAMS = 10_000
DEFAULT_IDLE_EVICT_S = 3600.0
XSUB_RCVHWM = 100_000
#: Per-subscriber send queue on the subscribe side; beyond it that subscriber loses events.
XPUB_SNDHWM = 20_000
#: The cache feed's own queue, on top of XPUB_SNDHWM: at 50k ev/s, over 4 s of traffic.
FEED_RCVHWM = 200_000
#: How often the fallback's cache reads its feed while events flow. Not per event, and not
#: more often: every wake-up of a thread costs CPU of its own, whatever the thread then does
#: (on this project's 2-core VM 60-160 µs: a 50 Hz tick alone cost an idle daemon 8 ms of
#: CPU a second, and flat out ~0.16 µs per event, a tenth of a bare proxy's cost). While
#: nothing flows the thread waits on the feed itself and wakes for the first event. Neither
#: delays a late joiner: a snapshot request wakes the thread at once, and the feed is read
#: to its end before the reply is built.
FEED_INTERVAL_S = 0.1
#: How often the main thread reads the compiled forwarder's counts (for the "not cached"
#: warnings; bus_stats and snapshots read them when they need them).
COUNTS_INTERVAL_S = 1.0
#: Most messages stored per feed read between two looks at the snapshot port.
MAX_FEED_BATCH = 50_000
#: How long to wait for the proxy thread (STATISTICS answer, TERMINATE).
PROXY_JOIN_S = 0.5
#: A snapshot request may name at most this many prefixes (the runtime sends <= 5): the
#: reply costs streams x prefixes comparisons, and forwarding waits while it is built.
MAX_SNAPSHOT_PREFIXES = 64
#: Snapshot replies queued per client that does not read them; beyond, they are dropped,
#: so a client that asks and never reads cannot pile up copies of the cache.
SNAPSHOT_SNDHWM = 16
#: Events a node daemon keeps for a hub it cannot reach (down, restarting, or reading too
#: slowly); beyond, new ones are dropped for the hub only (its consumers see seq gaps).
DEFAULT_UPSTREAM_HWM = 100_000
#: The upstream tap's own receive queue (the node's PUB adds XPUB_SNDHWM in front of it).
UPSTREAM_TAP_RCVHWM = 100_000
#: ZMTP heartbeats on the upstream connection, so a hub that vanished without closing its
#: TCP connection (power cut, cable) is noticed and reconnected to within seconds.
UPSTREAM_HEARTBEAT_IVL_MS = 2000
UPSTREAM_HEARTBEAT_TIMEOUT_MS = 6000
#: Once the hub refuses a node's handshake (its key is not authorized, or CURVE on one side
#: only), libzmq gives that connection up for good: it reconnects after a lost connection,
#: never after a refused one. So the node dials again itself, first after this long, then
#: doubling up to UPSTREAM_REDIAL_MAX_S: a key authorized on the hub later takes effect
#: without restarting the node.
UPSTREAM_REDIAL_FIRST_S = 2.0
UPSTREAM_REDIAL_MAX_S = 30.0
#: What goes upstream: every event type but the daemon's own statistics. A daemon's
#: bus_stats describe that daemon to the consumers connected to it; forwarded, every
#: node's would share the hub's one ``bus_stats/daemon/all`` stream.
UPSTREAM_TYPES = tuple(t for t in protocol.EVENT_TYPES if t != protocol.BUS_STATS)


class AuthorizedKeys:
    """The ZAP credentials provider behind ``--curve``: admits exactly the public keys in
    ``authorized/*.key``, re-read whenever any of those files changes.

    Why not ``configure_curve(location=...)``: that loads the directory all or nothing (one
    stray or half-copied ``*.key`` file and no new key is admitted — at start-up, nobody
    is), and only a change of the directory's own mtime triggered a reload, which misses a
    key whose content is written after its (empty) file was created, or one edited in
    place. Here each file is loaded on its own, bad ones are skipped with a warning, and
    the signature is every file's name, size and mtime.
    """

    MAX_LOGGED_DENIALS = 1000

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.keys: frozenset[bytes] = frozenset()
        self.denied = 0
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._logged: set[bytes] = set()

    def _current_signature(self) -> tuple[tuple[str, int, int], ...]:
        entries = []
        for path in self.directory.glob("*.key"):
            try:
                st = path.stat()
            except OSError:
                continue  # removed while we looked
            entries.append((path.name, st.st_size, st.st_mtime_ns))
        return tuple(sorted(entries))

    def reload(self, force: bool = False) -> bool:
        """Re-read the keys if any file changed; True when it did."""
        signature = self._current_signature()
        if not force and signature == self._signature:
            return False
        self._signature = signature
        keys: set[bytes] = set()
        bad: list[str] = []
        for name, _, _ in signature:
            try:
                public, _secret = zmq.auth.load_certificate(str(self.directory / name))
            except (OSError, ValueError) as exc:
                bad.append(f"{name} ({exc})")
                continue
            keys.add(public)
        self.keys = frozenset(keys)  # one assignment: the ZAP thread sees old or new set
        log.info("CURVE on: %d authorized client key(s) in %s", len(keys), self.directory)
        if bad:
            log.warning("ignoring %d unreadable key file(s) in %s: %s", len(bad),
                        self.directory, "; ".join(bad))
        return True

    def callback(self, domain: str, client_key: bytes) -> bool:
        """Called by the ZAP thread with the client's z85 public key."""
        if client_key in self.keys:
            return True
        self.denied += 1
        if client_key not in self._logged and len(self._logged) < self.MAX_LOGGED_DENIALS:
            self._logged.add(client_key)
            log.warning("CURVE: refused client key %s (not in %s)",
                        client_key.decode("ascii", "replace"), self.directory)
        return False


class Daemon:
    """Binds the three sockets; :meth:`serve` forwards on a thread and serves snapshots and
    bus_stats on the calling thread until :meth:`stop`.

    With ``upstream`` (a node daemon) a second proxy thread forwards to a hub, see
    :class:`Upstream`.

    Why this split: forwarding every event through Python cost ~3.9x the CPU of a bare
    ``zmq.proxy``. Then libzmq's ``zmq_proxy_steerable`` forwarded and the cache read its
    own copy of the stream from an inproc SUB, in C: still ~1.3x, for the second pipe,
    two more receives per event and data gone cold by the time the batch was read. Now
    the compiled forwarder caches each event while forwarding it (about a bare proxy's
    CPU); the proxy and the feed remain as the fallback where it was not built.
    """

    def __init__(self, publish: str, subscribe: str, snapshot: str, *,
                 max_msg_size: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
                 stats_interval: float = 5.0, curve_dir: str | None = None,
                 insecure: bool = False, max_streams: int = DEFAULT_MAX_STREAMS,
                 idle_evict_s: float = DEFAULT_IDLE_EVICT_S, upstream: str | None = None,
                 upstream_curve: str | None = None,
                 upstream_hwm: int = DEFAULT_UPSTREAM_HWM) -> None:
        if upstream is not None:
            endpoints.check_upstream(upstream, curve=bool(upstream_curve), insecure=insecure)
        for endpoint in (publish, subscribe, snapshot):
            endpoints.check_bind_allowed(endpoint, curve=bool(curve_dir), insecure=insecure)
            if not endpoints.is_loopback(endpoint) and not curve_dir:
                log.warning("INSECURE: binding %s without CURVE; anyone who can reach it can "
                            "read and inject telemetry", endpoint)
        self.max_msg_size = max_msg_size
        self.stats_interval = stats_interval
        self.cache = make_cache(CACHE_DEPTH, max_streams, idle_evict_s)
        #: Messages the cache path saw go through (valid or not, bus_stats included).
        self.forwarded = 0
        #: What the cache path refused to cache, by reason (forwarded all the same).
        self.rejected: Counter[str] = Counter()
        self.snapshots_served = 0
        #: Frames the cache path saw; in the fallback, libzmq's own frame count minus
        #: this is what the cache feed dropped (its queue was full), see
        #: :meth:`_proxy_frames`.
        self.frames_seen = 0
        self.frames_forwarded = 0
        self.cache_dropped = 0
        #: The cache's own subscriber on the PUB, where libzmq's proxy forwards (None where
        #: the compiled cache forwards and caches in one loop).
        self.feed: zmq.Socket | None = None
        self.session = uuid.uuid4().hex[:16]
        self._stats_seq = 0
        self._running = True
        self._started = time.monotonic()
        self._ctx = transport.context()
        self._auth = None
        self._proxy_thread: threading.Thread | None = None
        self._upstream_thread: threading.Thread | None = None
        self.upstream: Upstream | None = None
        self.authorized: AuthorizedKeys | None = None
        if curve_dir:
            self._start_authenticator(Path(curve_dir))
        # Queue bounds are set in _bind, before bind(): ZeroMQ copies a listening socket's
        # options when it binds, so a high-water mark set afterwards never reaches the
        # connections it accepts (they would get the default of 1000).
        # MAXMSGSIZE is the size limit itself on the publish side: the proxy cannot drop
        # and count a frame, so ZeroMQ refuses it (and drops that sender's connection)
        # before anything is allocated or forwarded.
        self.xsub = self._bind(zmq.XSUB, publish, curve_dir, rcvhwm=XSUB_RCVHWM,
                               max_msg_size=max_msg_size)
        # The cache wants every stream whoever listens, so the daemon takes everything from
        # publishers itself (PUB sockets filter at the sender: without this, events sent
        # before the first subscriber arrives would never reach the cache).
        self.xsub.send(b"\x01")
        # A PUB, not an XPUB: it filters per subscriber and drops at SNDHWM exactly like
        # one, but keeps subscriptions to itself, so the proxy never has a "reply"
        # direction to move (publishers stay subscribed to everything, as before).
        self.pub = self._bind(zmq.PUB, subscribe, curve_dir, sndhwm=XPUB_SNDHWM)
        self.router = self._bind(zmq.ROUTER, snapshot, curve_dir, sndhwm=SNAPSHOT_SNDHWM)
        # A reply the ROUTER cannot queue raises (see _send_reply) instead of vanishing.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.endpoints = {
            "publish": self.xsub.getsockopt_string(zmq.LAST_ENDPOINT),
            "subscribe": self.pub.getsockopt_string(zmq.LAST_ENDPOINT),
            "snapshot": self.router.getsockopt_string(zmq.LAST_ENDPOINT),
        }
        self._wire_internal()
        if upstream is not None:
            # Checked against the endpoints as bound (an ephemeral port is known only now).
            for role, bound in self.endpoints.items():
                if endpoints.points_at(upstream, bound):
                    self.close()
                    raise endpoints.EndpointError(
                        f"--upstream {upstream} is this daemon's own {role} endpoint "
                        f"({bound}): every event would come back to it for ever (a cycle); "
                        "point it at the hub daemon's publish endpoint")
            try:
                self.upstream = Upstream(self._ctx, self.pub,
                                         f"inproc://trainbus-daemon-{self.session}", upstream,
                                         upstream_curve, upstream_hwm)
            except BaseException:
                self.close()
                raise

    def _wire_internal(self) -> None:
        """The inproc sockets beside the proxy: the cache feed, the bus_stats injector and
        the proxy's control pair. Each is wired deterministically before the proxy starts
        (the sockets' pending commands are processed here, on this thread), so neither the
        first events nor the first bus_stats can be missed by a subscription in flight."""
        base = f"inproc://trainbus-daemon-{self.session}"
        # Cache feed (only where libzmq's proxy forwards; the compiled forwarder caches as
        # it forwards): a SUB of the daemon's own on the PUB, i.e. exactly the publish ->
        # subscribe direction, never subscriptions. Its queue (PUB SNDHWM + this RCVHWM)
        # holds seconds of traffic at any rate the proxy sustains; beyond, the PUB drops
        # for it as for any slow subscriber, and the drop is counted (cache_dropped).
        if not isinstance(self.cache, CompiledCache):
            self.pub.bind(f"{base}-feed")
            self.feed = self._ctx.socket(zmq.SUB)
            self.feed.linger = 0
            self.feed.rcvhwm = FEED_RCVHWM
            self.feed.setsockopt(zmq.SUBSCRIBE, b"")
            self.feed.connect(f"{base}-feed")
            self.pub.getsockopt(zmq.EVENTS)  # attach the feed and apply its subscription now
        # bus_stats go out through the proxy like any event (the PUB belongs to the proxy
        # thread), from an XPUB connected to the XSUB; it waits for the XSUB's subscription.
        self.xsub.bind(f"{base}-stats")
        self.stats_pub = transport.publisher(f"{base}-stats", ctx=self._ctx)
        self.xsub.getsockopt(zmq.EVENTS)  # attach it: the XSUB sends its subscription
        if not transport.wait_for_subscriber(self.stats_pub, 5.0):
            raise RuntimeError("internal: the bus_stats socket never saw the XSUB's subscription")
        self.control = self._ctx.socket(zmq.PAIR)
        self.control.linger = 0
        self.control.bind(f"{base}-control")
        self._proxy_control = self._ctx.socket(zmq.PAIR)
        self._proxy_control.linger = 0
        self._proxy_control.connect(f"{base}-control")

    def _start_authenticator(self, curve_dir: Path) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        authorized = curve_dir / "authorized"
        if not (curve_dir / "server.key_secret").is_file():
            raise FileNotFoundError(f"no server.key_secret in {curve_dir} (run: trainbus keys init {curve_dir})")
        if not authorized.is_dir():
            raise FileNotFoundError(f"no authorized/ directory in {curve_dir} (run: trainbus keys init {curve_dir})")
        self.authorized = AuthorizedKeys(authorized)
        self.authorized.reload(force=True)
        self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("trainbus.daemon.auth"))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self.authorized)

    def _reload_authorized(self) -> None:
        """Admit the public keys now in authorized/ (checked each stats tick, so keys
        dropped in while the daemon runs take effect without a restart; removing one
        refuses new connections with it, established ones stay until they drop)."""
        if self.authorized is not None:
            self.authorized.reload()

    def _bind(self, kind: int, endpoint: str, curve_dir: str | None, *,
              sndhwm: int | None = None, rcvhwm: int | None = None,
              max_msg_size: int | None = None) -> zmq.Socket:
        """A bound socket; every option is set before bind() so accepted connections get it."""
        sock = self._ctx.socket(kind)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_size or self.max_msg_size * 16)
        if sndhwm is not None:
            sock.sndhwm = sndhwm
        if rcvhwm is not None:
            sock.rcvhwm = rcvhwm
        if curve_dir:
            transport.apply_curve_server(sock, curve_dir)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self.close()
            raise endpoints.EndpointError(f"cannot bind {endpoint}: {exc}") from None
        return sock

    # ------------------------------------------------------------------ loop

    def stop(self, *_: Any) -> None:
        """Ask :meth:`serve` to return (safe from a signal handler: it only sets a flag;
        serve() then stops the proxy with its TERMINATE command)."""
        self._running = False

    def _run_proxy(self) -> None:
        try:
            if isinstance(self.cache, CompiledCache):
                self.cache.forward(self.xsub, self.pub, self._proxy_control, self.max_msg_size)
            else:
                zmq.proxy_steerable(self.xsub, self.pub, None, self._proxy_control)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.ETERM:
                log.error("forwarding stopped: %s", exc)
                self._running = False

    def _redial_upstream(self) -> None:
        """Dial the hub again after it refused us (see UPSTREAM_REDIAL_FIRST_S). The
        upstream socket belongs to its proxy thread, so that proxy is paused (TERMINATE,
        joined) around the redial and started again; the tap keeps what arrives meanwhile."""
        assert self.upstream is not None
        self.upstream.stats()  # its frame count, before the proxy that counted it stops
        _stop_proxy_thread(self._upstream_thread, self.upstream.control, "upstream forwarding")
        if self._upstream_thread is not None and self._upstream_thread.is_alive():
            return  # it did not stop: its socket is not ours to touch; try again later
        self.upstream.redial()
        self._upstream_thread = threading.Thread(target=self._run_upstream_proxy,
                                                 name="trainbus-upstream", daemon=True)
        self._upstream_thread.start()

    def _run_upstream_proxy(self) -> None:
        assert self.upstream is not None
        try:
            self.upstream.run_proxy()
        except zmq.ZMQError as exc:
            if exc.errno != zmq.ETERM:
                log.error("forwarding upstream stopped: %s", exc)
                self._running = False

    def serve(self) -> None:
        """Start forwarding, then answer snapshots and publish bus_stats (and, in the
        fallback, feed the cache).

        The fallback's cache is fed in batches every FEED_INTERVAL_S while events flow
        (and right before a snapshot is answered, so a reply holds everything forwarded
        before the request): this thread does not wake per event, so at any rate its cost
        is its per-event bookkeeping. Once a read finds the feed empty, the thread waits
        on the feed socket instead of the clock. With the compiled forwarder it wakes once
        every COUNTS_INTERVAL_S, for a snapshot request, and for bus_stats."""
        self._proxy_thread = threading.Thread(target=self._run_proxy, name="trainbus-proxy",
                                              daemon=True)
        self._proxy_thread.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        if self.upstream is not None:
            self._upstream_thread = threading.Thread(target=self._run_upstream_proxy,
                                                     name="trainbus-upstream", daemon=True)
            self._upstream_thread.start()
            poller.register(self.upstream.monitor, zmq.POLLIN)
        _lower_priority_of_this_thread(CACHE_THREAD_NICE)
        next_stats = time.monotonic()  # the first bus_stats at once: the bus is up
        last_forwarded = 0
        last_stats_time = time.monotonic()
        waiting_on_feed = False
        try:
            while self._running:
                wait_s = next_stats - time.monotonic()
                if self.upstream is not None and self.upstream.redial_at is not None:
                    wait_s = min(wait_s, self.upstream.redial_at - time.monotonic())
                if self.feed is None:
                    wait_s = min(COUNTS_INTERVAL_S, wait_s)
                elif not waiting_on_feed:
                    wait_s = min(FEED_INTERVAL_S, wait_s)
                try:
                    ready = dict(poller.poll(max(0.0, wait_s) * 1000))
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EINTR:
                        continue
                    raise
                fed = self._catch_up()
                if self.feed is not None and (fed == 0) != waiting_on_feed:
                    waiting_on_feed = not waiting_on_feed
                    if waiting_on_feed:
                        poller.register(self.feed, zmq.POLLIN)
                    else:
                        poller.unregister(self.feed)
                if self.router in ready:
                    self._serve_snapshots()
                if self.upstream is not None and self.upstream.monitor in ready:
                    self.upstream.read_events()
                now = time.monotonic()
                if self.upstream is not None and self.upstream.redial_due(now):
                    self._redial_upstream()
                if now >= next_stats:
                    rate = (self.forwarded - last_forwarded) / max(now - last_stats_time, 1e-9)
                    last_forwarded, last_stats_time = self.forwarded, now
                    self._publish_stats(rate)
                    self.cache.evict_idle(now)
                    self._reload_authorized()
                    next_stats = now + self.stats_interval
        finally:
            # The local proxy first, then the upstream one, so what the first forwarded
            # last has the best chance to be on its way to the hub.
            _stop_proxy_thread(self._proxy_thread, self.control, "forwarding")
            if self.upstream is not None:
                _stop_proxy_thread(self._upstream_thread, self.upstream.control,
                                   "upstream forwarding")

    def _catch_up(self, limit: int | None = MAX_FEED_BATCH) -> int:
        """Bring the cache and its counts up to date; returns how many messages the feed
        read (0 where the compiled forwarder caches as it forwards: then only its counts
        are read).

        In the fallback, store what the proxy forwarded since the last call: at most
        ``limit`` messages (so snapshot requests never wait long), or everything queued
        with None. Either way the checks are :mod:`bus.cache`'s: what fails is counted by
        reason and never cached; it was forwarded anyway, and every consumer rejects and
        counts it itself."""
        before = dict(self.rejected)
        try:
            if isinstance(self.cache, CompiledCache):
                self.forwarded, self.frames_seen, self.cache_dropped = self.cache.counts(
                    self.rejected)
                self.frames_forwarded = self.frames_seen
                return 0
            assert self.feed is not None
            seen, frames = self.cache.feed(self.feed, limit, time.monotonic(),
                                           self.max_msg_size, self.rejected)
        finally:
            for reason, count in self.rejected.items():
                done = before.get(reason, 0)
                if count != done and (done == 0 or count // 10_000 > done // 10_000):
                    log.warning("not cached (%s), %d so far with this reason", reason, count)
        self.forwarded += seen
        self.frames_seen += frames
        return seen

    def _proxy_frames(self) -> int | None:
        """Frames libzmq's proxy moved from the publish to the subscribe side so far (its
        STATISTICS command), or None if it did not answer in time."""
        return proxy_frames(self.control)

    def _serve_snapshots(self) -> None:
        for _ in range(100):
            try:
                request = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, body = request[:1], request[1:]
            if body and body[0] == b"":  # REQ clients add an empty delimiter frame
                identity, body = request[:2], request[2:]
            if not body or body[0] != b"SNAPSHOT":
                self._send_reply(identity, [b"ERROR", b"expected SNAPSHOT request"])
                continue
            if len(body) - 1 > MAX_SNAPSHOT_PREFIXES:
                self._send_reply(identity, [b"ERROR", b"too many prefixes (at most %d)"
                                            % MAX_SNAPSHOT_PREFIXES])
                continue
            self._catch_up(limit=None)  # all that was forwarded before the request
            pairs = self.cache.snapshot(body[1:])
            reply = [b"SNAPSHOT", str(len(pairs)).encode()]
            for topic, payload in pairs:
                reply.append(topic)
                reply.append(payload)
            self._send_reply(identity, reply)
            self.snapshots_served += 1

    def _send_reply(self, identity: list[bytes], reply: list[bytes]) -> None:
        """Queue a reply without blocking; count it when it cannot be (client gone, or more
        than SNAPSHOT_SNDHWM replies left unread).

        A NOBLOCK send is also refused as "full" while libzmq has not yet processed the
        client's acknowledgements of replies it already read (a send processes pending
        commands at most every ~1 ms): a client that asks in quick succession on one
        connection then lost a reply now and then, and a REQ client would wait for ever.
        Reading ZMQ_EVENTS processes them; then one more try tells the two cases apart."""
        frames = identity + reply
        try:
            self.router.send_multipart(frames, zmq.NOBLOCK)
            return
        except zmq.Again:
            self.router.getsockopt(zmq.EVENTS)
            try:
                self.router.send_multipart(frames, zmq.NOBLOCK)
                return
            except zmq.ZMQError:
                pass
        except zmq.ZMQError:
            pass
        self.rejected["snapshot_reply_failed"] += 1

    def _publish_stats(self, rate: float) -> None:
        """bus_stats, sent through the proxy like any event (and so cached by the feed)."""
        frames = self._proxy_frames() if self.feed is not None else None
        self._catch_up(limit=None)  # now frames_seen covers what the proxy had counted
        if frames is not None:
            self.frames_forwarded = frames
            # Never decreasing: frames forwarded after the STATISTICS answer can make
            # frames_seen run ahead for a moment, never behind, so this only lags.
            self.cache_dropped = max(self.cache_dropped, frames - self.frames_seen)
        payload = {
            "v": protocol.PROTOCOL_VERSION, "type": protocol.BUS_STATS, "run": "daemon",
            "worker": protocol.ALL_WORKERS, "session": self.session, "seq": self._stats_seq,
            "ts": time.time(), "uptime_s": time.monotonic() - self._started,
            "forwarded": self.forwarded, "frames_forwarded": self.frames_forwarded,
            "cache_dropped": self.cache_dropped, "rejected": dict(self.rejected),
            "streams_cached": len(self.cache), "rate_eps": rate,
            "snapshots_served": self.snapshots_served, "streams_evicted": self.cache.evicted,
            "auth_denied": self.authorized.denied if self.authorized is not None else 0,
        }
        if self.upstream is not None:
            payload.update(self.upstream.stats())
        self._stats_seq += 1
        try:
            self.stats_pub.send_multipart(protocol.encode(payload), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        """Close every socket (after serve() stopped the proxy; if its thread is somehow
        still running, the sockets it uses are left to process exit, never closed under it)."""
        proxy_running = self._proxy_thread is not None and self._proxy_thread.is_alive()
        names = ["feed", "stats_pub", "control", "router"]
        if not proxy_running:
            names += ["_proxy_control", "xsub", "pub"]
        if self.upstream is not None:
            self.upstream.close(proxy_running=self._upstream_thread is not None
                                and self._upstream_thread.is_alive())
        for name in names:
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if not proxy_running:
            self.cache.close()


def _lower_priority_of_this_thread(nice: int) -> None:
    """Lower this thread's scheduling priority alone (Linux nice is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted
        log.debug("could not lower this thread's priority: %s", exc)


def proxy_frames(control: zmq.Socket) -> int | None:
    """Frames a ``zmq_proxy_steerable`` moved from its frontend so far (its STATISTICS
    command on ``control``), or None if it did not answer in time."""
    try:
        control.send(b"STATISTICS", zmq.NOBLOCK)
        if not control.poll(PROXY_JOIN_S * 1000):
            return None
        values = control.recv_multipart()
    except zmq.ZMQError:
        return None
    if len(values) != 8:
        return None
    return int.from_bytes(values[0], sys.byteorder)


def _stop_proxy_thread(thread: threading.Thread | None, control: zmq.Socket, what: str) -> None:
    if thread is None or not thread.is_alive():
        return
    try:
        control.send(b"TERMINATE", zmq.NOBLOCK)
    except zmq.ZMQError:
        pass
    thread.join(PROXY_JOIN_S)
    if thread.is_alive():
        log.warning("the %s thread did not stop within %.1f s", what, PROXY_JOIN_S)


class Upstream:
    """A node daemon's link to its hub: libzmq's proxy from a tap on the node's own PUB to
    a PUB connected to the hub's publish side, plus a monitor that says what the link does.

    Why this shape: it is the ZeroMQ Guide's proxy chain, nothing home-made. The tap is a
    subscriber of the node's PUB like any consumer, so the local bus never waits for the
    hub: while the hub is away the upstream PUB keeps up to ``hwm`` events (ZeroMQ keeps a
    connecting socket's queue across reconnects) and hands them over when the hub is back;
    beyond that it drops for the hub alone, which the hub's consumers count as seq gaps
    (events are forwarded byte for byte, so sessions and seqs are the workers' own).

    The tap subscribes to each event type but ``bus_stats``: the node's statistics stay on
    the node (its consumers see them; the hub's ``bus_stats/daemon/all`` is the hub's
    alone), and topics of no known type (garbage a consumer would reject anyway) are not
    spread across the cluster.
    """

    def __init__(self, ctx: zmq.Context, local_pub: zmq.Socket, base: str, endpoint: str,
                 curve_dir: str | None, hwm: int) -> None:
        self.endpoint = endpoint
        self.curve_dir = curve_dir
        self.hwm = hwm
        self.connected = False
        self.connects = 0
        self.refused = 0
        self.frames = 0
        self._failure_logged = False
        #: When to dial the hub again after a refused handshake (None: not refused).
        self.redial_at: float | None = None
        self._redial_delay = UPSTREAM_REDIAL_FIRST_S
        self._frames_before_redials = 0
        # The hub side first: a missing or unreadable key file fails here, before anything
        # else of ours exists (the caller closes the daemon's sockets).
        self.out = ctx.socket(zmq.PUB)
        try:
            if curve_dir:
                transport.apply_curve_client(self.out, curve_dir)
        except BaseException:
            self.out.close(linger=0)
            raise
        self.out.linger = transport.DEFAULT_LINGER_MS
        self.out.sndhwm = hwm
        self.out.setsockopt(zmq.RECONNECT_IVL, transport.RECONNECT_IVL_MS)
        self.out.setsockopt(zmq.RECONNECT_IVL_MAX, transport.RECONNECT_IVL_MAX_MS)
        self.out.setsockopt(zmq.HEARTBEAT_IVL, UPSTREAM_HEARTBEAT_IVL_MS)
        self.out.setsockopt(zmq.HEARTBEAT_TIMEOUT, UPSTREAM_HEARTBEAT_TIMEOUT_MS)
        local_pub.bind(f"{base}-upstream")
        self.tap = ctx.socket(zmq.SUB)
        self.tap.linger = 0
        self.tap.rcvhwm = UPSTREAM_TAP_RCVHWM
        for event_type in UPSTREAM_TYPES:
            self.tap.setsockopt(zmq.SUBSCRIBE, f"{event_type}/".encode())
        self.tap.connect(f"{base}-upstream")
        local_pub.getsockopt(zmq.EVENTS)  # attach the tap and apply its subscriptions now
        # The monitor is attached before connect(), or a fast handshake is over unheard.
        self.monitor = self.out.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.out.connect(endpoint)
        self.control = ctx.socket(zmq.PAIR)
        self.control.linger = 0
        self.control.bind(f"{base}-upstream-control")
        self._proxy_control = ctx.socket(zmq.PAIR)
        self._proxy_control.linger = 0
        self._proxy_control.connect(f"{base}-upstream-control")
        log.info("forwarding upstream to %s%s (up to %d events kept while it is away)",
                 endpoint, " [CURVE]" if curve_dir else "", hwm)

    def run_proxy(self) -> None:
        """On its own thread: tap -> hub, in libzmq, until TERMINATE."""
        zmq.proxy_steerable(self.tap, self.out, None, self._proxy_control)

    def redial_due(self, now: float) -> bool:
        return self.redial_at is not None and now >= self.redial_at

    def redial(self) -> None:
        """Connect to the hub anew (only while the upstream proxy is stopped: the proxy
        started after it counts frames from 0 again, so what was counted is kept)."""
        self._frames_before_redials = self.frames
        try:
            self.out.disconnect(self.endpoint)
        except zmq.ZMQError:
            pass  # libzmq already dropped the refused connection's endpoint
        self.out.connect(self.endpoint)
        self.redial_at = None
        log.debug("upstream %s: dialling again", self.endpoint)

    def _refused(self) -> None:
        """A refused handshake: counted, and a redial scheduled (backing off)."""
        self.refused += 1
        self.connected = False
        if self.redial_at is None:
            self.redial_at = time.monotonic() + self._redial_delay
            self._redial_delay = min(self._redial_delay * 2, UPSTREAM_REDIAL_MAX_S)

    def read_events(self) -> None:
        """Log and count what the upstream connection did (called on the main thread)."""
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connects += 1
                self.connected = True
                self._failure_logged = False
                self._redial_delay = UPSTREAM_REDIAL_FIRST_S
                log.info("upstream %s: %s", self.endpoint,
                         "connected" if self.connects == 1 else f"reconnected ({self.connects - 1} time(s))")
            elif kind == zmq.EVENT_DISCONNECTED:
                if self.connected:
                    log.warning("upstream %s: connection lost; keeping up to %d events for it "
                                "while ZeroMQ reconnects", self.endpoint, self.hwm)
                self.connected = False
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._refused()
                if not self._failure_logged:
                    self._failure_logged = True
                    log.error("upstream %s refused this node's CURVE key (%s/client.key is not in "
                              "the hub's authorized/ directory): nothing is forwarded; dialling "
                              "again every %.0f-%.0f s, so authorizing the key there is enough",
                              self.endpoint, self.curve_dir, UPSTREAM_REDIAL_FIRST_S,
                              UPSTREAM_REDIAL_MAX_S)
            else:  # a failed handshake: protocol or no detail
                self._refused()
                if not self._failure_logged:
                    self._failure_logged = True
                    log.error("upstream %s: handshake failed (%s): %s", self.endpoint,
                              event.get("value"),
                              f"is {self.curve_dir}/server.key the hub's, and does the hub run "
                              "with --curve?" if self.curve_dir else
                              "the hub probably requires CURVE (--upstream-curve DIR)")

    def stats(self) -> dict[str, Any]:
        """The upstream_* fields of the node's bus_stats."""
        frames = proxy_frames(self.control)
        if frames is not None:
            self.frames = self._frames_before_redials + frames
        return {"upstream": self.endpoint, "upstream_connected": self.connected,
                "upstream_connects": self.connects, "upstream_refused": self.refused,
                "upstream_frames": self.frames}

    def close(self, proxy_running: bool) -> None:
        """Close what is ours (the proxy's sockets only once its thread has stopped). The
        upstream PUB keeps its linger, so the last events still leave for the hub."""
        names = ["monitor", "control"]
        if not proxy_running:
            names += ["_proxy_control", "tap"]
        for name in names:
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if not proxy_running:
            try:
                self.out.disable_monitor()
            except zmq.ZMQError:
                pass
            self.out.close()


# ---------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bus.cli import nonneg_int, positive_float, positive_int

    parser.add_argument("--publish", metavar="EP",
                        help=f"bind for publishers (XSUB); env {endpoints.ENV_PUBLISH}, default {endpoints.DEFAULT_PUBLISH}")
    parser.add_argument("--subscribe", metavar="EP",
                        help=f"bind for subscribers (XPUB); env {endpoints.ENV_SUBSCRIBE}, default {endpoints.DEFAULT_SUBSCRIBE}")
    parser.add_argument("--snapshot", metavar="EP",
                        help=f"bind for snapshot requests (ROUTER); env {endpoints.ENV_SNAPSHOT}, default {endpoints.DEFAULT_SNAPSHOT}")
    parser.add_argument("--max-msg-size", metavar="BYTES", type=positive_int,
                        default=protocol.DEFAULT_MAX_MESSAGE_BYTES,
                        help="drop (and count) messages larger than this (default 1 MiB)")
    parser.add_argument("--stats-interval", metavar="S", type=positive_float, default=5.0,
                        help="seconds between bus_stats events (default 5)")
    parser.add_argument("--max-streams", metavar="N", type=nonneg_int, default=DEFAULT_MAX_STREAMS,
                        help="most topics kept in the snapshot cache (default 10000)")
    parser.add_argument("--idle-evict", metavar="S", type=positive_float, default=DEFAULT_IDLE_EVICT_S,
                        help="drop a topic from the snapshot cache after S seconds without events "
                             "(default 3600)")
    parser.add_argument("--curve", metavar="DIR",
                        help="require CURVE on all ports: DIR/server.key_secret, admit keys in DIR/authorized/")
    parser.add_argument("--insecure", action="store_true",
                        help="allow binding a non-loopback address without CURVE (anyone may connect), "
                             "and a non-loopback --upstream without --upstream-curve")
    parser.add_argument("--upstream", metavar="EP",
                        help="also forward every event but bus_stats to the hub daemon whose publish "
                             "side is EP (a node daemon in a cluster; docs/cluster.md)")
    parser.add_argument("--upstream-curve", metavar="DIR",
                        help="connect upstream as a CURVE client: DIR holds the hub's server.key and "
                             "this node's client.key/client.key_secret (trainbus keys client)")
    parser.add_argument("--upstream-hwm", metavar="N", type=positive_int, default=DEFAULT_UPSTREAM_HWM,
                        help="events kept for an unreachable hub before dropping for it "
                             f"(default {DEFAULT_UPSTREAM_HWM})")


def run(args: argparse.Namespace) -> int:
    daemon = Daemon(
        endpoints.resolve("publish", args.publish),
        endpoints.resolve("subscribe", args.subscribe),
        endpoints.resolve("snapshot", args.snapshot),
        max_msg_size=args.max_msg_size, stats_interval=args.stats_interval,
        curve_dir=args.curve, insecure=args.insecure, max_streams=args.max_streams or 1,
        idle_evict_s=args.idle_evict, upstream=args.upstream, upstream_curve=args.upstream_curve,
        upstream_hwm=args.upstream_hwm,
    )
    for signum in lifecycle.STOP_SIGNALS:  # Ctrl-C, a supervisor, a closed terminal
        signal.signal(signum, daemon.stop)
    eps = daemon.endpoints
    log.info("listening (pid %d): publish %s, subscribe %s, snapshot %s%s; %s", os.getpid(),
             eps["publish"], eps["subscribe"], eps["snapshot"], " [CURVE]" if args.curve else "",
             "compiled forwarder and cache" if isinstance(daemon.cache, CompiledCache)
             else f"libzmq proxy, {daemon.cache.name} cache")
    # One machine-readable line on stdout, so scripts and tests can use ephemeral ports.
    print(f"trainbus daemon ready publish={eps['publish']} subscribe={eps['subscribe']} "
          f"snapshot={eps['snapshot']}" + (f" upstream={args.upstream}" if args.upstream else ""),
          flush=True)
    try:
        daemon.serve()
    finally:
        daemon.close()
        log.info("stopped: forwarded %d, rejected %s", daemon.forwarded, dict(daemon.rejected) or 0)
    return 0


if __name__ == "__main__":
    from bus.cli import main

    sys.exit(main(["daemon", *sys.argv[1:]]))
