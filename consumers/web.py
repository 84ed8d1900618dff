"""``trainbus web``: the live view in a browser, pushed, tens of milliseconds behind training.

A second view over the console monitor's :class:`consumers.monitor_state.MonitorState`
(not a second model): the same fleet, the same banner precedence, the same health judged
by the same ``--rules``, the same status labels and sparkline cells — so a colour on the
page never disagrees with the console, the alerts or the aggregator.

Why this shape:

* **One thread owns the bus.** A :class:`consumers.runtime.Subscriber` (snapshot on
  connect, dedupe, gap accounting) is polled on its own thread, which feeds the state and
  builds every message under :attr:`WebHub.lock`; HTTP threads take the lock only to build
  a page's ``init`` (or a chart's history) and to register. Per event the cost is the
  monitor's (a few dict lookups and deque appends) plus one bounded deque append for the
  longer chart history.
* **Push, coalesced, bounded.** Server-Sent Events (one-way, auto-reconnecting, plain
  HTTP: enough here, and a standard-library server can do it). Changes are collected and
  sent at most :data:`FLUSH_HZ` times a second as one serialised ``delta`` shared by all
  clients; each client has a bounded queue, and a client that falls :data:`CLIENT_QUEUE`
  messages behind (a stuck tab, a slow link) is dropped — its socket shut — so it never
  slows the bus or other tabs; EventSource reconnects it and it gets a fresh ``init``.
  A comment line goes out every :data:`KEEPALIVE_S` so proxies and tunnels keep the
  connection. After the web process restarts, the page's EventSource reconnects by
  itself; after the daemon restarts, the Subscriber resumes (banner DISCONNECTED meanwhile).
* **Safe by default.** Loopback only unless told; a non-loopback ``--bind`` needs a token
  (generated, printed once as a URL, then kept in an HttpOnly SameSite=Strict cookie) or
  ``--insecure`` with a loud warning. GET/HEAD only (anything else: 405); nothing changes
  state. A strict Content-Security-Policy (no inline script, no outside origin) and
  ``nosniff`` on every response; the page sets every string from the bus with
  ``textContent``. Without a token, the ``Host`` header must name a loopback address, so a
  DNS-rebinding page in the same browser cannot read the stream.

Messages (JSON; non-finite floats as the strings "nan", "inf", "-inf", as everywhere in
trainbus): ``init`` {config, now, rows, fleet, alerts, banner, footer}; ``delta`` the same
keys holding only what changed (rows by id, ``gone`` ids). ``now`` is the server's wall
clock, so the page computes ages on the server's own clock even through a tunnel.
"""

from __future__ import annotations

import argparse
import hmac
import http.server
import importlib.resources
import ipaddress
import json
import logging
import math
import queue
import secrets
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bus import protocol
from bus.lifecycle import StopFlag
from consumers.fleet import STATUS_RANK, Worker, WorkerKey
from consumers.history import SPARK_BLOCKS, sparkline_cells, trend
from consumers.monitor_state import MonitorState
from consumers.monitor_view import status_label

log = logging.getLogger("trainbus.web")

DEFAULT_PORT = 8750
#: Most delta messages per second (per client: every client gets the same ones).
FLUSH_HZ = 60.0
#: Fleet rows, banner, footer and time-driven status changes (stale) this often.
TICK_S = 0.25
#: Messages a client may fall behind (about 2 s at the flush rate) before it is dropped.
CLIENT_QUEUE = 120
KEEPALIVE_S = 15.0
#: Points per worker kept for the longer chart (the page's "click for a longer chart").
LONG_HISTORY = 600
#: A run with more workers than this gets the fleet view on the page: the distribution
#: across workers and the worst :data:`WORST_N` rows (fewer when ``--max-rows`` is
#: smaller), as the console keeps the worst rows.
DEFAULT_MAX_ROWS = 48
WORST_N = 16
ENV_TOKEN = "TRAINBUS_WEB_TOKEN"
COOKIE_PREFIX = "trainbus_web_"

#: Row columns with a latest value and its health.
ROW_METRICS: tuple[str, ...] = ("grad_norm", "pre_clip_grad_norm", "approx_kl", "clip_fraction",
                                "entropy", "explained_variance", "episode_return_mean", "sps", "lr")
#: Metrics with a 10-cell sparkline and trend arrow on each row.
SPARK_METRICS: tuple[str, ...] = ("grad_norm", "pre_clip_grad_norm")
#: Metrics of the longer chart, in each stored point after its index and update.
CHART_METRICS: tuple[str, ...] = ("grad_norm", "pre_clip_grad_norm", "approx_kl", "clip_fraction",
                                  "entropy", "explained_variance", "episode_return_mean")
DIST_METRICS: tuple[str, ...] = ("grad_norm", "pre_clip_grad_norm", "approx_kl", "clip_fraction",
                                 "entropy")
STATIC_FILES: dict[str, str] = {
    "/": "index.html", "/index.html": "index.html", "/app.js": "app.js",
    "/style.css": "style.css", "/favicon.svg": "favicon.svg",
}
CONTENT_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
                 "css": "text/css; charset=utf-8", "svg": "image/svg+xml"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = (("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
                    ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"),
                    ("Cross-Origin-Opener-Policy", "same-origin"))


# --------------------------------------------------------------------- JSON


def num(value: Any) -> Any:
    """A number for JSON: non-finite floats as "nan"/"inf"/"-inf" (trainbus' JSON rule)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _clean(obj: Any) -> Any:
    """Recursively make a structure strict JSON (see :func:`num`)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return num(obj)


def dumps(obj: Any) -> str:
    """Strict JSON. Values are converted with :func:`num` where they are read; a NaN that
    slipped through anyway (a new field) costs one more walk, never a crashed push."""
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_clean(obj), separators=(",", ":"), allow_nan=False)


def spark_levels(values: list[float]) -> list[int]:
    """The console's 10 sparkline cells as numbers: 0..7 a block's height, -1 padding,
    -2 non-finite (the red glyph). Same cells as the console, drawn on a canvas."""
    out = []
    for glyph, nonfinite in sparkline_cells(values):
        out.append(-2 if nonfinite else (SPARK_BLOCKS.index(glyph) if glyph in SPARK_BLOCKS else -1))
    return out


# --------------------------------------------------------------------- the hub


class Client:
    """One connected page: a bounded queue of serialised SSE messages."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.queue: queue.Queue[bytes | None] = queue.Queue(CLIENT_QUEUE)
        self.sock = sock
        self.dropped = False

    def offer(self, message: bytes) -> bool:
        """Queue ``message``; a full queue drops the client (False)."""
        if self.dropped:
            return False
        try:
            self.queue.put_nowait(message)
            return True
        except queue.Full:
            self.drop()
            return False

    def drop(self) -> None:
        """Disconnect: unblock a handler stuck writing to a tab that stopped reading."""
        self.dropped = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass


class WebHub:
    """The state, what changed since the last push, the longer chart history and the
    connected clients. Every method runs with :attr:`lock` held (the caller takes it)."""

    def __init__(self, state: MonitorState, *, max_rows: int = DEFAULT_MAX_ROWS,
                 run: str | None = None) -> None:
        self.lock = threading.Lock()
        self.state = state
        self.max_rows = max_rows
        self.worst_n = min(WORST_N, max_rows)
        self.run = run
        self.long: dict[WorkerKey, deque[list[Any]]] = {}
        self._point_index: dict[WorkerKey, int] = {}
        self._new_points: dict[WorkerKey, list[list[Any]]] = {}
        self.dirty: set[WorkerKey] = set()
        self._sent_status: dict[WorkerKey, tuple[str, str]] = {}
        self._gone: set[WorkerKey] = set()
        self._fleet_runs: set[str] = set()
        self._alerts_dirty = True
        self._tick_dirty = True
        self._last_tick_msg: dict[str, Any] = {}
        self.clients: set[Client] = set()
        self.clients_dropped = 0
        self.messages_sent = 0

    # ------------------------------------------------------------------ input

    def ingest(self, events: Iterable[protocol.Event], now: float) -> None:
        state = self.state
        alerts_before = state.alert_events
        for event in events:
            state.ingest(event, now)
            kind = event.type
            if kind == protocol.PPO_UPDATE or kind == protocol.HEARTBEAT:
                key = (event.run, event.worker)
                if key in state.rows:
                    self.dirty.add(key)
                    self._fleet_runs.add(event.run)
                    if kind == protocol.PPO_UPDATE:
                        self._add_point(key, event.fields)
            elif kind == protocol.PPO_SUMMARY:
                self._fleet_runs.add(event.run)
        if state.alert_events != alerts_before:
            self._alerts_dirty = True

    def _add_point(self, key: WorkerKey, fields: dict[str, Any]) -> None:
        index = self._point_index.get(key, -1) + 1
        self._point_index[key] = index
        point = [index, fields.get("update")]
        for metric in CHART_METRICS:
            value = fields.get(metric)
            point.append(num(float(value)) if isinstance(value, int | float)
                         and not isinstance(value, bool) else None)
        series = self.long.get(key)
        if series is None:
            series = self.long[key] = deque(maxlen=LONG_HISTORY)
        series.append(point)
        self._new_points.setdefault(key, []).append(point)

    # ------------------------------------------------------------------ periodic

    def tick(self, sub: Any, now: float) -> None:
        """Connection figures, forgetting, and rows whose status changed with time alone
        (a worker going stale sends nothing: only the clock knows)."""
        state = self.state
        state.sync_from(sub, now)
        rows = state.rows
        for key in [k for k in self.long if k not in rows]:
            self.long.pop(key, None)
            self._point_index.pop(key, None)
            self._new_points.pop(key, None)
            self._sent_status.pop(key, None)
            self.dirty.discard(key)
            self._gone.add(key)
        for key, row in rows.items():
            if key not in self.dirty and key in self._sent_status \
                    and status_label(state, row, now) != self._sent_status[key]:
                self.dirty.add(key)
        self._fleet_runs.update(state.runs())
        self._tick_dirty = True

    @property
    def pending(self) -> bool:
        return bool(self.dirty or self._gone or self._alerts_dirty or self._tick_dirty)

    # ------------------------------------------------------------------ messages

    def _row(self, row: Worker, now: float, wall: float) -> dict[str, Any]:
        state = self.state
        status, label = status_label(state, row, now)
        self._sent_status[row.key] = (status, label)
        latest = row.history.latest
        metrics = {m: [num(latest(m)), state.value_health(row, m)] for m in ROW_METRICS}
        sparks = {}
        for metric in SPARK_METRICS:
            values = row.history.values(metric)
            sparks[metric] = [spark_levels(values), trend(values)]
        return {
            "id": f"{row.run}/{row.worker}", "run": row.run, "worker": row.worker,
            "status": status, "label": label, "rank": STATUS_RANK[status],
            "update": row.update, "dropped": row.dropped, "restarts": row.restarts,
            "seen": wall - (now - row.last_seen), "ts": row.last_ts,
            "m": metrics, "spark": sparks,
        }

    def _fleet(self, run: str, now: float) -> dict[str, Any]:
        state = self.state
        source, summary = state.fleet_row(run, now)
        workers = state.fleet.run_workers(run)
        out: dict[str, Any] = {"run": run, "source": source, "summary": _clean(summary),
                               "workers": len(workers),
                               "done": sum(1 for w in workers if w.finished)}
        metrics = summary.get("metrics") or {}
        out["health"] = {m: state.metric_health(m, entry.get("mean"))
                         for m, entry in metrics.items() if isinstance(entry, dict)}
        if len(workers) > self.max_rows:
            out["dist"] = {m: _clean(state.fleet.distribution(run, m, now)) for m in DIST_METRICS}
            # The console's choice: worst status first, then furthest outside the band.
            worst = state.fleet.worst(run, now, self.worst_n, by_distance=True)
            out["worst"] = [f"{w.run}/{w.worker}" for w in worst]
        return out

    def _alerts(self) -> list[dict[str, Any]]:
        alerts = sorted(self.state.alerts.values(), key=lambda a: (a.severity != "critical", a.since))
        return [{"run": a.run, "worker": a.worker, "rule": a.rule, "severity": a.severity,
                 "metric": a.metric, "since": a.since, "value": num(a.value),
                 "threshold": num(a.threshold), "summary": a.summary} for a in alerts]

    def _banner_footer(self, now: float) -> dict[str, Any]:
        state = self.state
        banner = state.banner(now)
        footer = {"events": state.events_total, "rate": round(state.rate_eps, 1),
                  "lost": state.lost, "rejected": state.rejected, "endpoint": state.endpoint,
                  "alert_events": state.alert_events, "clients": len(self.clients),
                  "forwarded": state.bus_stats[0].get("forwarded") if state.bus_stats else None}
        return {"banner": {"state": banner.state, "counts": banner.counts, "detail": banner.detail},
                "footer": footer}

    def init_message(self, now: float, wall: float) -> bytes:
        state = self.state
        rows = [self._row(r, now, wall) for r in state.sorted_rows()]
        body = {"config": {"max_rows": self.max_rows, "worst_n": self.worst_n, "run": self.run,
                           "stale_after": state.stale_after, "history": LONG_HISTORY},
                "now": wall, "rows": rows, "fleet": [self._fleet(r, now) for r in state.runs()],
                "alerts": self._alerts(), **self._banner_footer(now)}
        return sse("init", body)

    def delta_message(self, now: float, wall: float) -> bytes | None:
        """What changed since the last delta, or None when nothing did."""
        state = self.state
        body: dict[str, Any] = {"now": wall}
        if self.dirty:
            rows = state.rows
            out = []
            for key in self.dirty:
                row = rows.get(key)
                if row is None:
                    continue
                entry = self._row(row, now, wall)
                points = self._new_points.pop(key, None)
                if points:
                    entry["pts"] = points
                out.append(entry)
            body["rows"] = out
            self.dirty.clear()
        if self._gone:
            body["gone"] = [f"{r}/{w}" for r, w in self._gone]
            self._gone.clear()
        if self._alerts_dirty:
            body["alerts"] = self._alerts()
            self._alerts_dirty = False
        if self._tick_dirty:
            body["fleet"] = [self._fleet(r, now) for r in sorted(self._fleet_runs)
                             if state.fleet.run_workers(r) or r in state.summaries]
            self._fleet_runs.clear()
            body.update(self._banner_footer(now))
            self._tick_dirty = False
        if len(body) == 1:
            return None
        return sse("delta", body)

    def history(self, run: str, worker: str) -> dict[str, Any] | None:
        wid: int | str = int(worker) if worker.isdigit() else worker
        series = self.long.get((run, wid))
        if series is None:
            return None
        return {"id": f"{run}/{worker}", "metrics": list(CHART_METRICS),
                "points": list(series)}

    def broadcast(self, message: bytes) -> None:
        for client in list(self.clients):
            if not client.offer(message):
                self.clients.discard(client)
                self.clients_dropped += 1
                log.warning("dropped a slow web client (%d queued messages unread)", CLIENT_QUEUE)
        self.messages_sent += 1


def sse(event: str, body: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {dumps(body)}\n\n".encode()


# --------------------------------------------------------------------- the bus thread


def bus_loop(hub: WebHub, sub: Any, stop: StopFlag) -> None:
    """Poll the bus, feed the state, push coalesced deltas: at most FLUSH_HZ a second, and
    at once when the previous push is older than that (so one event is on its way within
    a millisecond or two of arriving)."""
    period = 1.0 / FLUSH_HZ
    next_flush = 0.0
    next_tick = 0.0
    while not stop.is_set():
        now = time.monotonic()
        if hub.pending:
            timeout = max(0.0, min(next_flush, next_tick) - now)
        else:
            timeout = max(0.0, min(0.1, next_tick - now))
        events = sub.poll(int(math.ceil(timeout * 1000)))
        now = time.monotonic()
        with hub.lock:
            if events:
                hub.ingest(events, now)
            if now >= next_tick:
                hub.tick(sub, now)
                next_tick = now + TICK_S
            if hub.pending and now >= next_flush:
                message = hub.delta_message(now, time.time())
                if message is not None:
                    hub.broadcast(message)
                next_flush = now + period
    with hub.lock:
        for client in list(hub.clients):
            client.drop()
        hub.clients.clear()


# --------------------------------------------------------------------- HTTP


def load_static() -> dict[str, bytes]:
    """The page's assets from the package (works from a wheel too: package data)."""
    root = importlib.resources.files("consumers") / "web_static"
    return {name: (root / name).read_bytes() for name in set(STATIC_FILES.values())}


def host_is_loopback(host_header: str | None) -> bool:
    """Whether a Host header names this machine's loopback (DNS-rebinding guard)."""
    if not host_header:
        return False
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host.lower() in ("localhost", "ip6-localhost") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: WebHub, static: dict[str, bytes], *,
                 token: str | None, check_host: bool) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)
        self.hub = hub
        self.static = static
        self.token = token
        self.check_host = check_host
        self.cookie_name = f"{COOKIE_PREFIX}{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: WebServer
    server_version = "trainbus-web"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        # The request line may carry ?token=...: log the path without its query.
        log.debug("%s %s %s", self.address_string(), self.command, urlsplit(self.path).path)

    # ------------------------------------------------------------------ helpers

    def _headers(self, status: int, content_type: str, length: int | None = None,
                 extra: Iterable[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()

    def _plain(self, status: int, text: str, extra: Iterable[tuple[str, str]] = ()) -> None:
        body = (text + "\n").encode()
        self._headers(status, "text/plain; charset=utf-8", len(body),
                      [("Cache-Control", "no-store"), *extra])
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self, query: dict[str, list[str]]) -> bool | None:
        """True, False (403), or None when this request just presented the right token
        (answered with a redirect that sets the cookie and drops the token from the URL)."""
        server = self.server
        if server.check_host and not host_is_loopback(self.headers.get("Host")):
            return False
        if server.token is None:
            return True
        cookies = self.headers.get("Cookie") or ""
        for part in cookies.split(";"):
            name, _, value = part.strip().partition("=")
            if name == server.cookie_name and hmac.compare_digest(value.encode(), server.token.encode()):
                return True
        offered = (query.get("token") or [""])[0]
        if offered and hmac.compare_digest(offered.encode(), server.token.encode()):
            cookie = (f"{server.cookie_name}={server.token}; HttpOnly; SameSite=Strict; Path=/")
            self._headers(303, "text/plain; charset=utf-8", 0,
                          [("Location", urlsplit(self.path).path or "/"), ("Set-Cookie", cookie),
                           ("Cache-Control", "no-store")])
            return None
        return False

    # ------------------------------------------------------------------ methods

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        allowed = self._authorized(query)
        if allowed is None:
            return
        if not allowed:
            self._plain(403, "forbidden: open the URL with ?token=... that trainbus web printed "
                             "(or reach it through an SSH tunnel to its loopback address)")
            return
        path = url.path
        if path == "/events":
            self._events()
            return
        if path == "/api/history":
            run = (query.get("run") or [""])[0]
            worker = (query.get("worker") or [""])[0]
            with self.server.hub.lock:
                body = self.server.hub.history(run, worker)
            if body is None:
                self._plain(404, "no such worker")
                return
            data = dumps(body).encode()
            self._headers(200, "application/json", len(data), [("Cache-Control", "no-store")])
            if self.command != "HEAD":
                self.wfile.write(data)
            return
        name = STATIC_FILES.get(path)
        if name is None:
            self._plain(404, "not found")
            return
        data = self.server.static[name]
        self._headers(200, CONTENT_TYPES[name.rsplit(".", 1)[1]], len(data),
                      [("Cache-Control", "no-cache")])
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        if urlsplit(self.path).path == "/events":
            self._plain(405, "the event stream is GET only", [("Allow", "GET")])
            return
        self.do_GET()

    def _method_not_allowed(self) -> None:
        self._plain(405, "read-only: GET and HEAD only", [("Allow", "GET, HEAD")])

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _method_not_allowed

    def _events(self) -> None:
        hub = self.server.hub
        client = Client(self.connection)
        self._headers(200, "text/event-stream; charset=utf-8", None,
                      [("Cache-Control", "no-store"), ("X-Accel-Buffering", "no")])
        with hub.lock:
            init = hub.init_message(time.monotonic(), time.time())
            hub.clients.add(client)
        try:
            self.wfile.write(b"retry: 1000\n\n" + init)
            self.wfile.flush()
            while not client.dropped:
                try:
                    message = client.queue.get(timeout=KEEPALIVE_S)
                except queue.Empty:
                    message = b": keep-alive\n\n"
                if message is None:
                    break
                parts = [message]
                while True:  # write what else is queued in the same send
                    try:
                        more = client.queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        client.dropped = True
                        break
                    parts.append(more)
                self.wfile.write(b"".join(parts))
                self.wfile.flush()
        except OSError:
            pass
        finally:
            with hub.lock:
                hub.clients.discard(client)
            self.close_connection = True


# --------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bus.cli import add_subscriber_arguments, nonneg_int, positive_int, run_name
    from consumers.fleet import add_fleet_arguments
    from consumers.health import add_rules_argument

    add_subscriber_arguments(parser)
    parser.add_argument("--port", type=nonneg_int, default=DEFAULT_PORT,
                        help=f"HTTP port (default {DEFAULT_PORT}; 0: any free port, printed)")
    parser.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                        help="address to serve on (default 127.0.0.1; anything else needs the "
                             "token, which is then generated, or --insecure)")
    parser.add_argument("--token", nargs="?", const="", default=None, metavar="TOKEN",
                        help="require this access token (no value: generate one) even on "
                             f"loopback, e.g. on a shared machine (env {ENV_TOKEN})")
    parser.add_argument("--insecure", action="store_true",
                        help="serve a non-loopback --bind WITHOUT a token (anyone who can reach "
                             "the port reads your telemetry)")
    parser.add_argument("--run", type=run_name, default=None, help="show only this run")
    parser.add_argument("--max-rows", type=positive_int, default=DEFAULT_MAX_ROWS, metavar="N",
                        help=f"runs with more workers get the fleet view: distribution and the "
                             f"worst {WORST_N} (default {DEFAULT_MAX_ROWS})")
    add_rules_argument(parser)
    add_fleet_arguments(parser)


def resolve_token(args: argparse.Namespace, loopback: bool) -> str | None:
    """The access token: given, from the environment, generated for a non-loopback bind,
    or None (loopback without --token, or --insecure)."""
    import os

    if args.token:
        return str(args.token)
    env = os.environ.get(ENV_TOKEN)
    if args.token == "" or (not loopback and not args.insecure):
        return env or secrets.token_urlsafe(24)
    if env:
        return env
    return None


def run(args: argparse.Namespace) -> int:
    from bus.cli import UsageError
    from bus.endpoints import is_loopback
    from bus.lifecycle import install_stop_handlers
    from consumers.health import health_from_args
    from consumers.runtime import Subscriber

    health = health_from_args(args)
    bind = args.bind.strip("[]")
    host = f"[{bind}]" if ":" in bind else bind
    loopback = is_loopback(f"tcp://{host}:0")
    token = resolve_token(args, loopback)
    if not loopback and args.insecure and token is None:
        print("trainbus web: WARNING: --insecure: serving on "
              f"{bind} WITHOUT authentication; anyone who can reach this port can read your "
              "training telemetry. Prefer the default token, or an SSH tunnel to 127.0.0.1.",
              file=sys.stderr, flush=True)
    static = load_static()
    stop = install_stop_handlers()
    sub = Subscriber.from_args(args, run=args.run, forget_after=args.forget_after)
    state = MonitorState(health.table, spikes=health.spikes, stale_after=args.stale_after,
                         forget_after=args.forget_after, book=sub.book)
    hub = WebHub(state, max_rows=args.max_rows, run=args.run)
    try:
        server = WebServer((bind, args.port), hub, static, token=token,
                           check_host=loopback and token is None)
    except OSError as exc:
        sub.close()
        raise UsageError(f"cannot listen on {host}:{args.port}: {exc.strerror or exc}") from None
    port = server.server_address[1]
    shown = socket.gethostname() if bind in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/"
    print(f"trainbus web: serving {url}", flush=True)
    if token is not None:
        print(f"trainbus web: open {url}?token={token}", flush=True)
    http_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                   name="trainbus-web-http", daemon=True)
    http_thread.start()
    try:
        bus_loop(hub, sub, stop)
    finally:
        server.shutdown()
        server.server_close()
        sub.close()
    return 0
