"""Socket construction shared by every process: one Context per process, bounded queues,
bounded linger, and CURVE on request.

Why here: the options that keep training from blocking (NOBLOCK sends, bounded SNDHWM,
short LINGER) and the CURVE wiring must be the same for every publisher and subscriber,
and ``bus/`` is the package both sides may import.
"""

from __future__ import annotations

import multiprocessing.util
import os
import threading
import time
from pathlib import Path

import zmq
import zmq.auth

#: Per-connection queue bounds. A publisher keeps at most this many messages for a missing
#: or slow daemon, then drops (receivers see the loss as sequence gaps).
PUBLISHER_SNDHWM = 10_000
SUBSCRIBER_RCVHWM = 100_000
#: close() never waits longer than this for queued messages to leave.
DEFAULT_LINGER_MS = 200
#: Reconnect quickly after a daemon restart, backing off to 1 s while it stays away.
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000


_exit_flush_pid: int | None = None


def context() -> zmq.Context:
    """The process's single Context (pyzmq makes a fresh one in a forked child)."""
    global _exit_flush_pid
    ctx = zmq.Context.instance()
    if _exit_flush_pid != os.getpid():
        _exit_flush_pid = os.getpid()
        # A multiprocessing child started with fork ends in os._exit, which skips the
        # Context teardown that normally lets closed sockets deliver their last messages
        # (up to their LINGER). Its exit hook still runs Finalize callbacks: flush there.
        multiprocessing.util.Finalize(None, _flush_on_exit, args=(ctx,), exitpriority=-100)
    return ctx


def _flush_on_exit(ctx: zmq.Context) -> None:
    """Terminate the Context (delivering what closed sockets still hold, within their
    LINGER) from a helper thread, waiting a bounded time: a socket left open would make
    term() wait forever, and exiting must never hang on telemetry."""
    if ctx.closed:
        return
    worker = threading.Thread(target=ctx.term, name="trainbus-flush", daemon=True)
    worker.start()
    worker.join(timeout=(DEFAULT_LINGER_MS + 300) / 1000)


class KeyFileError(FileNotFoundError):
    """A CURVE key file that is missing or unreadable (one-line message)."""


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise KeyFileError(f"CURVE key file not found: {path} (create keys with: trainbus keys init DIR)")
    public, secret_key = zmq.auth.load_certificate(str(path))
    if secret and secret_key is None:
        raise KeyFileError(f"{path} holds no secret key")
    return public, secret_key


def apply_curve_client(sock: zmq.Socket, curve_dir: str | Path) -> None:
    """Make ``sock`` a CURVE client of the daemon whose public key is DIR/server.key."""
    curve_dir = Path(curve_dir)
    client_public, client_secret = _load(curve_dir / "client.key_secret", secret=True)
    server_public, _ = _load(curve_dir / "server.key", secret=False)
    sock.curve_publickey = client_public
    sock.curve_secretkey = client_secret
    sock.curve_serverkey = server_public


def apply_curve_server(sock: zmq.Socket, curve_dir: str | Path) -> None:
    """Make ``sock`` a CURVE server with DIR/server.key_secret."""
    public, secret = _load(Path(curve_dir) / "server.key_secret", secret=True)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True


def _common(sock: zmq.Socket) -> None:
    sock.linger = DEFAULT_LINGER_MS
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)


def publisher(endpoint: str, curve_dir: str | Path | None = None,
              sndhwm: int = PUBLISHER_SNDHWM, ctx: zmq.Context | None = None) -> zmq.Socket:
    """A publishing socket connected to the daemon's publish side (or a direct subscriber).

    It is an XPUB rather than a PUB: it sends exactly like a PUB (filtering at the sender,
    dropping at SNDHWM, never blocking with NOBLOCK), but it also lets a publisher that
    must not lose its first events (synthetic publisher, replay) see when the daemon's
    subscription has arrived, see :func:`wait_for_subscriber`. Until then a PUB-family
    socket silently drops what it is given.
    """
    sock = (ctx or context()).socket(zmq.XPUB)
    _common(sock)
    # Verbose: every subscription message reaches wait_for_subscriber, also a repeated
    # one. A connecting socket keeps its pipe (and the subscriptions on it) across a
    # daemon restart, so the restarted daemon's subscription is a duplicate, which a
    # plain XPUB swallows: wait_for_bus() then timed out against a daemon that was up.
    sock.setsockopt(zmq.XPUB_VERBOSE, 1)
    sock.sndhwm = sndhwm
    if curve_dir:
        apply_curve_client(sock, curve_dir)
    sock.connect(endpoint)
    return sock


def subscriber(endpoint: str, prefixes: list[bytes] | None = None,
               curve_dir: str | Path | None = None, rcvhwm: int = SUBSCRIBER_RCVHWM,
               ctx: zmq.Context | None = None, connect: bool = True) -> zmq.Socket:
    """A SUB socket connected to the daemon's subscribe side, subscribed to ``prefixes``.

    ``connect=False`` leaves the connect to the caller: one that watches connection events
    must attach its monitor first, or a fast handshake is over before anyone listens.
    """
    sock = (ctx or context()).socket(zmq.SUB)
    _common(sock)
    sock.rcvhwm = rcvhwm
    if curve_dir:
        apply_curve_client(sock, curve_dir)
    for prefix in prefixes if prefixes is not None else [b""]:
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    if connect:
        sock.connect(endpoint)
    return sock


def wait_for_subscriber(sock: zmq.Socket, timeout_s: float) -> bool:
    """Block up to ``timeout_s`` until a subscription reaches this publisher (the daemon
    subscribes to everything as soon as it is connected). Returns False on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0 or not sock.poll(remaining_ms, zmq.POLLIN):
            return False
        message = sock.recv()
        if message[:1] == b"\x01":
            return True
