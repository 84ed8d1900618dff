"""The daemon's last-value cache: the last ``depth`` messages of every topic, served to late
joiners as snapshots.

Two implementations with one behaviour (tests/test_cache.py feeds both the same frames
and compares everything they say):

* :class:`CompiledCache` (the default): the cache in C (``bus/_cache.c``, built with the
  package, loaded with ctypes), together with the daemon's forwarding loop, which caches
  each event while forwarding it: a fraction of a microsecond per event with the GIL
  released, so the daemon costs about what libzmq's own proxy costs.
* :class:`LastValueCache`: the same in Python, ~2 µs per event, fed from a subscriber
  beside libzmq's proxy. Used where the C library was not built (no C compiler when the
  package was installed) or libzmq cannot be found in the process, and when
  ``TRAINBUS_DAEMON_CACHE=python`` asks for it.

What the cache checks, per message, in this order (what fails is never cached and is
counted by reason; it was forwarded anyway and every consumer rejects it itself):
one frame only or more than two (``bad_frame_count``), topic + payload over the size limit
(``too_large``), a payload that does not start with a msgpack map marker (``not_a_map``),
a new topic that :func:`bus.protocol.parse_topic` refuses (``bad_topic``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from collections import Counter, OrderedDict, deque
from pathlib import Path
from typing import Protocol

import zmq

from bus import protocol

log = logging.getLogger("trainbus.daemon")

#: ``python`` forces the Python cache; anything else (or unset) takes the compiled one
#: when it is available.
ENV_IMPLEMENTATION = "TRAINBUS_DAEMON_CACHE"
REJECT_REASONS = ("bad_frame_count", "too_large", "not_a_map", "bad_topic")
_NOBLOCK = int(zmq.NOBLOCK)
_MAP_MARKERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])


class FeedCache(Protocol):
    """What the daemon needs from a cache, whichever implementation it is."""

    name: str
    evicted: int

    def __len__(self) -> int: ...

    def feed(self, sock: zmq.Socket, limit: int | None, now: float, max_size: int,
             rejected: Counter[str]) -> tuple[int, int]: ...

    def evict_idle(self, now: float) -> int: ...

    def snapshot(self, prefixes: list[bytes]) -> list[tuple[bytes, bytes]]: ...

    def close(self) -> None: ...


class LastValueCache:
    """The last ``depth`` messages of every topic, in arrival order, bounded in streams."""

    name = "python"

    def __init__(self, depth: int, max_streams: int, idle_evict_s: float) -> None:
        if depth < 1 or max_streams < 1:
            raise ValueError("depth and max_streams must be at least 1")
        self.depth = depth
        self.max_streams = max_streams
        self.idle_evict_s = idle_evict_s
        self._streams: OrderedDict[bytes, tuple[deque[tuple[int, bytes]], list[float]]] = OrderedDict()
        self._arrivals = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._streams)

    def store(self, topic: bytes, payload: bytes, now: float) -> None:
        self._arrivals += 1
        entry = self._streams.get(topic)
        if entry is None:
            entry = self._streams[topic] = (deque(maxlen=self.depth), [now])
            if len(self._streams) > self.max_streams:
                self._streams.popitem(last=False)
                self.evicted += 1
        else:
            self._streams.move_to_end(topic)
            entry[1][0] = now
        entry[0].append((self._arrivals, payload))

    def feed(self, sock: zmq.Socket, limit: int | None, now: float, max_size: int,
             rejected: Counter[str]) -> tuple[int, int]:
        """Read and cache up to ``limit`` messages from ``sock`` (None: all it has queued);
        return (messages, frames) read. Never blocks.

        Written flat because it is the whole per-event cost: frames come as zmq.Frame
        (copy=False) since ``Frame.more`` costs far less than getsockopt(RCVMORE) from
        Python (~0.1 vs ~1.1 µs), and known topics are updated inline (:meth:`store` does
        the same, once per new topic)."""
        recv, markers = sock.recv, _MAP_MARKERS
        streams = self._streams
        lookup, to_end = streams.get, streams.move_to_end
        seen = frames = 0
        arrivals = self._arrivals
        try:
            while limit is None or seen < limit:
                try:
                    first = recv(_NOBLOCK, copy=False)
                except zmq.Again:
                    break
                seen += 1
                frames += 1
                if not first.more:
                    rejected["bad_frame_count"] += 1
                    continue
                second = recv(_NOBLOCK, copy=False)
                frames += 1
                if second.more:
                    while second.more:  # the rest of the message (frames arrive together)
                        second = recv(_NOBLOCK, copy=False)
                        frames += 1
                    rejected["bad_frame_count"] += 1
                    continue
                topic = first.bytes
                payload = second.bytes
                if len(topic) + len(payload) > max_size:
                    rejected["too_large"] += 1
                    continue
                if not payload or payload[0] not in markers:
                    rejected["not_a_map"] += 1
                    continue
                entry = lookup(topic)
                if entry is None:
                    if not topic_is_valid(topic):
                        rejected["bad_topic"] += 1
                        continue
                    self._arrivals = arrivals
                    self.store(topic, payload, now)
                    arrivals = self._arrivals
                    continue
                to_end(topic)
                entry[1][0] = now
                arrivals += 1
                entry[0].append((arrivals, payload))
        finally:
            self._arrivals = arrivals
        return seen, frames

    def evict_idle(self, now: float) -> int:
        """Drop streams silent for longer than ``idle_evict_s`` (oldest first)."""
        dropped = 0
        while self._streams:
            topic, (_, last) = next(iter(self._streams.items()))
            if now - last[0] <= self.idle_evict_s:
                break
            del self._streams[topic]
            dropped += 1
        self.evicted += dropped
        return dropped

    def snapshot(self, prefixes: list[bytes]) -> list[tuple[bytes, bytes]]:
        """Cached (topic, payload) pairs whose topic starts with any prefix, oldest first."""
        wanted = [p for p in prefixes if p]
        items: list[tuple[int, bytes, bytes]] = []
        for topic, (entries, _) in self._streams.items():
            if wanted and not any(topic.startswith(p) for p in wanted):
                continue
            items.extend((arrival, topic, payload) for arrival, payload in entries)
        items.sort(key=lambda item: item[0])
        return [(topic, payload) for _, topic, payload in items]

    def close(self) -> None:
        self._streams.clear()


def topic_is_valid(topic: bytes) -> bool:
    """The one topic check both caches apply, once per new topic."""
    try:
        protocol.parse_topic(topic)
    except protocol.ProtocolError:
        return False
    return True


_TOPIC_CHECK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)


@_TOPIC_CHECK
def _check_topic(data: int, size: int) -> int:
    """Called from C (GIL taken by ctypes) for each topic the cache has not seen."""
    return 1 if topic_is_valid(ctypes.string_at(data, size)) else 0


#: What bus/_cache.c calls in libzmq, in tb_bind_libzmq's order.
_LIBZMQ_FUNCTIONS = ("zmq_msg_init", "zmq_msg_close", "zmq_msg_recv", "zmq_msg_data",
                     "zmq_msg_size", "zmq_msg_more", "zmq_msg_send", "zmq_msg_copy", "zmq_poll",
                     "zmq_errno")


class _Library:
    """The compiled cache (bus/_cache.c) bound to the libzmq this process has loaded."""

    def __init__(self, path: str, zmq_lib: ctypes.CDLL) -> None:
        lib = ctypes.CDLL(path)
        u64, i64, ptr = ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p
        lib.tb_bind_libzmq.argtypes = [ptr] * len(_LIBZMQ_FUNCTIONS)
        lib.tb_bind_libzmq.restype = None
        lib.tb_cache_new.argtypes = [ctypes.c_uint32, u64]
        lib.tb_cache_new.restype = ptr
        lib.tb_cache_free.argtypes = [ptr]
        lib.tb_cache_free.restype = None
        lib.tb_cache_feed.argtypes = [ptr, ptr, i64, ctypes.c_double, u64, _TOPIC_CHECK,
                                      ctypes.POINTER(u64)]
        lib.tb_cache_feed.restype = i64
        lib.tb_cache_evict_idle.argtypes = [ptr, ctypes.c_double, ctypes.c_double]
        lib.tb_cache_evict_idle.restype = u64
        lib.tb_cache_stats.argtypes = [ptr, ctypes.POINTER(u64)]
        lib.tb_cache_stats.restype = None
        lib.tb_cache_forward.argtypes = [ptr, ptr, ptr, ptr, u64, _TOPIC_CHECK]
        lib.tb_cache_forward.restype = ctypes.c_int
        lib.tb_cache_snapshot.argtypes = [ptr, ctypes.POINTER(ctypes.c_char_p),
                                          ctypes.POINTER(u64), ctypes.c_uint32,
                                          ctypes.POINTER(ptr), ctypes.POINTER(ctypes.POINTER(u64)),
                                          ctypes.POINTER(u64)]
        lib.tb_cache_snapshot.restype = i64
        lib.tb_cache_hold.argtypes = [ptr, ctypes.c_int]
        lib.tb_cache_hold.restype = None
        lib.tb_cache_park_max.argtypes = []
        lib.tb_cache_park_max.restype = u64
        lib.tb_release.argtypes = [ptr]
        lib.tb_release.restype = None
        lib.tb_bind_libzmq(*(ctypes.cast(getattr(zmq_lib, n), ptr) for n in _LIBZMQ_FUNCTIONS))
        self.lib = lib


_library: _Library | None = None
_library_error: str | None = None


def _loaded_libzmq() -> ctypes.CDLL:
    """The libzmq pyzmq's sockets live in, found in this process's memory map (already
    loaded by pyzmq: the same copy, no reload).

    The compiled cache calls libzmq on pyzmq's socket handles, so it must be that very
    copy: exactly one libzmq mapped, with pyzmq's version."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        raise OSError("no /proc/self/maps to find libzmq in (not Linux)")
    found = set()
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and os.path.basename(fields[5]).startswith("libzmq"):
            found.add(fields[5].strip())
    if len(found) != 1:
        raise OSError(f"expected one libzmq in this process, found {sorted(found) or 'none'}")
    path = found.pop()
    lib = ctypes.CDLL(path)
    major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    lib.zmq_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    if (major.value, minor.value, patch.value) != zmq.zmq_version_info():
        raise OSError(f"{path} is libzmq {major.value}.{minor.value}.{patch.value}, pyzmq uses "
                      f"{zmq.zmq_version()}")
    return lib


def compiled_library() -> _Library:
    """The compiled cache library, loaded once; OSError saying why it is unavailable."""
    global _library, _library_error
    if _library is not None:
        return _library
    if _library_error is not None:
        raise OSError(_library_error)
    try:
        spec = importlib.util.find_spec("bus._cache")
        if spec is None or not spec.origin:
            raise OSError("bus/_cache.c was not built (no C compiler when the package was "
                          "installed?)")
        _library = _Library(spec.origin, _loaded_libzmq())
    except OSError as exc:
        _library_error = str(exc)
        raise
    return _library


class CompiledCache:
    """:class:`LastValueCache`'s behaviour in C, and the daemon's forwarding loop with it.

    :meth:`forward` is the daemon's XSUB → PUB forwarder (run on a thread of its own): it
    caches each event while forwarding it, so the cache costs no second pipe, no second
    receive and no second look at cold data. :meth:`feed` applies the same checks and
    store to messages read from a socket, the way :meth:`LastValueCache.feed` does, which
    is what the differential test compares.

    Payloads are copied out of the received messages (a message read over TCP can be a
    slice of libzmq's shared receive buffer, which holding it would keep alive), so the
    cache's memory is what it holds: at most ``max_streams`` x ``depth`` payloads."""

    name = "compiled"
    _handle: int | None = None  # until allocated (close() and __del__ may run before)

    def __init__(self, depth: int, max_streams: int, idle_evict_s: float) -> None:
        if depth < 1 or max_streams < 1:
            raise ValueError("depth and max_streams must be at least 1")
        self._lib = compiled_library().lib
        self.idle_evict_s = idle_evict_s
        self._handle = self._lib.tb_cache_new(depth, max_streams)
        if not self._handle:
            raise MemoryError("could not allocate the compiled cache")
        #: Events the forwarder parks at most while the cache is held (see bus/_cache.c).
        self.park_max = self._lib.tb_cache_park_max()
        self._stats = (ctypes.c_uint64 * (5 + len(REJECT_REASONS)))()
        self._frames = ctypes.c_uint64()
        self._rejects_seen = [0] * len(REJECT_REASONS)

    def _read_stats(self) -> list[int]:
        """streams, evicted, messages, frames, dropped, then the rejects by reason."""
        self._lib.tb_cache_stats(self._handle, self._stats)
        return list(self._stats)

    def __len__(self) -> int:
        return self._read_stats()[0]

    @property
    def evicted(self) -> int:
        return self._read_stats()[1]

    def counts(self, rejected: Counter[str]) -> tuple[int, int, int]:
        """(messages, frames, events not cached for want of memory or room to park them)
        the cache has seen so far; adds the rejects since the last call to ``rejected``."""
        stats = self._read_stats()
        rejects = stats[5:]
        for index, (count, before) in enumerate(zip(rejects, self._rejects_seen, strict=True)):
            if count != before:
                rejected[REJECT_REASONS[index]] += count - before
        self._rejects_seen = rejects
        return stats[2], stats[3], stats[4]

    def forward(self, xsub: zmq.Socket, pub: zmq.Socket, control: zmq.Socket,
                max_size: int) -> None:
        """Forward ``xsub`` → ``pub`` frame for frame (never blocking on ``pub``: a PUB
        drops for a full subscriber), caching every event on the way, until ``TERMINATE``
        arrives on ``control``. Runs with the GIL released; raises ZMQError when libzmq
        fails (ETERM: the context is ending)."""
        if self._lib.tb_cache_forward(self._handle, xsub.underlying, pub.underlying,
                                      control.underlying, max_size, _check_topic) < 0:
            raise zmq.ZMQError(zmq.zmq_errno())

    def feed(self, sock: zmq.Socket, limit: int | None, now: float, max_size: int,
             rejected: Counter[str]) -> tuple[int, int]:
        """As :meth:`LastValueCache.feed`; the loop runs in C with the GIL released."""
        seen = self._lib.tb_cache_feed(self._handle, sock.underlying,
                                       -1 if limit is None else limit, now, max_size,
                                       _check_topic, ctypes.byref(self._frames))
        self.counts(rejected)
        if seen < 0:
            raise MemoryError("the compiled cache ran out of memory")
        return seen, self._frames.value

    def evict_idle(self, now: float) -> int:
        return self._lib.tb_cache_evict_idle(self._handle, now, self.idle_evict_s)

    def snapshot(self, prefixes: list[bytes]) -> list[tuple[bytes, bytes]]:
        """As :meth:`LastValueCache.snapshot`."""
        n = len(prefixes)
        prefix_array = (ctypes.c_char_p * max(n, 1))(*prefixes)
        size_array = (ctypes.c_uint64 * max(n, 1))(*(len(p) for p in prefixes))
        buffer = ctypes.c_void_p()
        sizes = ctypes.POINTER(ctypes.c_uint64)()
        total = ctypes.c_uint64()
        count = self._lib.tb_cache_snapshot(self._handle, prefix_array, size_array, n,
                                            ctypes.byref(buffer), ctypes.byref(sizes),
                                            ctypes.byref(total))
        if count < 0:
            raise MemoryError("no memory for a snapshot")
        if count == 0:
            return []
        try:
            blob = ctypes.string_at(buffer, total.value)
            pairs = []
            offset = 0
            for i in range(count):
                topic_end = offset + sizes[2 * i]
                end = topic_end + sizes[2 * i + 1]
                pairs.append((blob[offset:topic_end], blob[topic_end:end]))
                offset = end
        finally:
            self._lib.tb_release(buffer)
            self._lib.tb_release(ctypes.cast(sizes, ctypes.c_void_p))
        return pairs

    def hold(self, held: bool) -> None:
        """Hold the cache from this thread (or let it go), as a long snapshot holds it;
        meanwhile the forwarder parks events (for tests: nothing else needs it)."""
        self._lib.tb_cache_hold(self._handle, int(held))

    def close(self) -> None:
        """Free the cache (only once :meth:`forward` has returned)."""
        if self._handle:
            self._lib.tb_cache_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()


def make_cache(depth: int, max_streams: int, idle_evict_s: float,
               implementation: str | None = None) -> FeedCache:
    """The compiled cache when it is available, else the Python one (saying why).

    ``implementation`` (default: the ``TRAINBUS_DAEMON_CACHE`` environment variable) may
    be ``python`` or ``compiled``; ``compiled`` fails loudly where it is unavailable."""
    wanted = implementation or os.environ.get(ENV_IMPLEMENTATION) or "auto"
    if wanted not in ("auto", "python", "compiled"):
        raise ValueError(f"{ENV_IMPLEMENTATION}={wanted!r}: expected python or compiled")
    if wanted == "python":
        return LastValueCache(depth, max_streams, idle_evict_s)
    try:
        return CompiledCache(depth, max_streams, idle_evict_s)
    except OSError as exc:
        if wanted == "compiled":
            raise
        log.warning("the compiled cache is unavailable (%s); using the Python one, which "
                    "costs ~2 us of CPU per forwarded event", exc)
        return LastValueCache(depth, max_streams, idle_evict_s)
