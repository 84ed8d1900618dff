"""``trainbus alert --alertmanager URL``: hand alerts to Prometheus Alertmanager (API v2).

Why not just a webhook: Alertmanager is a *state* API, not a notification API. It owns
grouping, routing, silences, inhibition and the actual paging; a client's job is to keep
telling it which alerts are active, the way Prometheus does. So this sink keeps a table of
what it has told Alertmanager is firing and:

* posts an alert when it fires (``POST {URL}/api/v2/alerts``, a JSON list of postable
  alerts) with ``startsAt`` = the alert's ``since`` and ``endsAt`` = now + 4 re-send
  intervals (Prometheus' own choice: 4 x its 1 min resend delay);
* re-posts every firing alert every ``resend`` seconds (default 60, ``--alertmanager-resend``)
  with a fresh ``endsAt``. If this process dies, Alertmanager resolves its alerts by itself
  within 4 re-send intervals instead of paging forever — which is also why a resolve that
  never got through (Alertmanager down, queue overflow) only delays the resolution;
* posts once with ``endsAt`` = the resolve time when the alert resolves.

Identity. Alertmanager identifies an alert by its label set: ``alertname`` (the rule),
``run``, ``worker`` and ``severity``. The metric that broke (it can change while a
nonfinite alert fires) and the value are annotations, so they update the alert instead
of forking it. Severity is a label — that is what routing and inhibition match on — so an
escalation is a *different* alert to Alertmanager: on escalation the warning alert is
resolved and the critical one fires (startsAt = the escalation time), on de-escalation the
other way round, in one POST. Pending and cancelled notifications never reach it
(:attr:`~consumers.alerting.engine.Notification.pages`), as with Prometheus.

Threads. :meth:`AlertmanagerSink.send` runs on the evaluation thread: it updates the table
under a lock (microseconds) and queues the alerts to post; the POSTs, retries with
exponential backoff and the periodic re-sends run on the sink's own thread behind the
bounded queue of :class:`~consumers.alerting.sinks.QueuedSink`, so a slow or dead
Alertmanager never delays evaluation. Errors are logged at most every
:data:`ERROR_LOG_INTERVAL_S` (with a count of those held back) and never stop the process.
Only the standard library (urllib), like the webhook sink.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from consumers.alerting.engine import Notification
from consumers.alerting.sinks import DEFAULT_QUEUE_SIZE, QueuedSink, post_json

log = logging.getLogger(__name__)

API_PATH = "/api/v2/alerts"
DEFAULT_RESEND_S = 60.0
#: A firing alert's ``endsAt`` lies this many re-send intervals ahead of each post.
ENDS_AFTER_RESENDS = 4
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF_S = 0.5
#: Least seconds between two logged delivery errors of one sink.
ERROR_LOG_INTERVAL_S = 30.0

Key = tuple[str, str, str]  # (run, worker, rule): one severity at a time per key


def alertmanager_url(text: str) -> str:
    """The alerts endpoint for ``text``: a base URL (``http://host:9093``, maybe with a
    path prefix) gets ``/api/v2/alerts`` appended; a URL already ending in it is kept.

    Raises ValueError with a one-line reason, so a typo fails at startup rather than
    at the first incident.
    """
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError on a malformed port)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
            or parts.query or parts.fragment:
        raise ValueError(f"expected an http:// or https:// Alertmanager URL such as "
                         f"http://127.0.0.1:9093, got {text!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(API_PATH):
        path += API_PATH
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def rfc3339(ts: float) -> str:
    """UNIX seconds as the RFC 3339 UTC timestamp Alertmanager parses (millisecond precision)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _number(value: float) -> str:
    """Annotation text for a number: ``%g``-style, non-finite as nan / inf / -inf (the
    project's JSON spelling)."""
    return f"{value:.6g}" if math.isfinite(value) else f"{value}".lower()


@dataclass(frozen=True, slots=True)
class PostableAlert:
    """One entry of the POST body. ``ends_at`` None: still firing, so ``endsAt`` is put
    ``ENDS_AFTER_RESENDS`` re-send intervals after the moment it is actually sent."""

    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    ends_at: float | None = None

    @property
    def severity(self) -> str:
        return self.labels["severity"]

    def body(self, now: float, ends_after: float) -> dict[str, Any]:
        ends = now + ends_after if self.ends_at is None else self.ends_at
        # Alertmanager rejects endsAt < startsAt (e.g. a resolve stamped on a clock that
        # stepped back); clamping keeps the resolve instead of losing the whole POST.
        return {"labels": self.labels, "annotations": self.annotations,
                "startsAt": rfc3339(self.starts_at), "endsAt": rfc3339(max(ends, self.starts_at))}


def postable(note: Notification, starts_at: float, ends_at: float | None) -> PostableAlert:
    """The Alertmanager view of one notification (labels = identity, annotations = news)."""
    labels = {"alertname": note.rule, "run": note.run, "worker": str(note.worker),
              "severity": note.severity}
    annotations = {"summary": note.summary or note.text(), "metric": note.metric}
    if note.value is not None:
        annotations["value"] = _number(note.value)
    if note.threshold is not None:
        annotations["threshold"] = _number(note.threshold)
    return PostableAlert(labels, annotations, starts_at, ends_at)


@dataclass(slots=True)
class _ErrorLog:
    """Rate-limited warnings: the first at once, then at most one per ``interval`` seconds
    with the number held back, so a dead Alertmanager is one line a while, not a flood."""

    interval: float = ERROR_LOG_INTERVAL_S
    last: float = field(default=-math.inf)
    held: int = 0

    def warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.held += 1
            return
        if self.held:
            message += " (%d similar errors not logged)"
            args = (*args, self.held)
        log.warning(message, *args)
        self.last, self.held = now, 0


class AlertmanagerSink(QueuedSink):
    """Keeps Alertmanager's view of the firing alerts in step with the engine (see the
    module doc). Counters: ``delivered``/``failed``/``dropped`` (QueuedSink, per queued
    POST), ``attempts`` (HTTP requests), ``resent`` / ``resend_failed`` (periodic re-posts)."""

    name = "alertmanager"

    def __init__(self, url: str, resend: float = DEFAULT_RESEND_S,
                 timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 backoff: float = DEFAULT_BACKOFF_S, queue_size: int = DEFAULT_QUEUE_SIZE,
                 clock: Callable[[], float] = time.time) -> None:
        self.url = alertmanager_url(url)
        self.resend = resend
        self.idle_interval = resend  # before the thread starts: it reads it once
        self.ends_after = ENDS_AFTER_RESENDS * resend
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.clock = clock
        self.attempts = 0
        self.resent = 0
        self.resend_failed = 0
        self._firing: dict[Key, PostableAlert] = {}
        self._table_lock = threading.Lock()
        self._errors = _ErrorLog()
        super().__init__(queue_size)

    # ------------------------------------------------------------ evaluation thread

    def send(self, note: Notification) -> None:
        """Update the firing table and queue what changed; never blocks, never raises."""
        if not note.pages:
            return
        batch = self._apply(note)
        if batch:
            self._enqueue(batch)

    def _apply(self, note: Notification) -> list[PostableAlert]:
        """The alerts one notification changes. Convergent on purpose: a firing note makes
        its severity *the* alert of the key (resolving any other), a resolved note ends the
        key, whatever came before — so a notification lost in between cannot leave a
        stale alert behind."""
        key = (note.run, str(note.worker), note.rule)
        out: list[PostableAlert] = []
        with self._table_lock:
            old = self._firing.get(key)
            if note.state == "firing":
                if old is not None and old.severity != note.severity:
                    out.append(replace(old, ends_at=note.at))  # escalated / de-escalated
                alert = postable(note, starts_at=note.since, ends_at=None)
                self._firing[key] = alert
                out.append(alert)
            elif note.state == "resolved":
                self._firing.pop(key, None)
                # Without a table entry (a previous process posted it), still resolve.
                starts = old.starts_at if old is not None else note.at
                alert = postable(note, starts_at=min(starts, note.at), ends_at=note.at)
                if old is not None:  # resolve the identity Alertmanager actually holds
                    alert = replace(alert, labels=old.labels)
                out.append(alert)
        return out

    def firing(self) -> list[PostableAlert]:
        """What Alertmanager is being told is firing right now."""
        with self._table_lock:
            return list(self._firing.values())

    # ------------------------------------------------------------ delivery thread

    def deliver(self, note: Any) -> bool:
        return self._post(note)

    def idle(self) -> None:
        """Re-post every firing alert with a fresh ``endsAt`` (Alertmanager's keep-alive)."""
        alerts = self.firing()
        if not alerts:
            return
        if self._post(alerts):
            self.resent += 1
        else:
            self.resend_failed += 1

    def _post(self, alerts: list[PostableAlert]) -> bool:
        """POST one batch; network errors, 429 and 5xx are retried ``retries`` times with
        doubling backoff (capped at 8 s), other 4xx are not (Alertmanager rejected the
        payload; resending it would not help)."""
        data = json.dumps([a.body(self.clock(), self.ends_after) for a in alerts]).encode()
        ok, attempts = post_json(self.url, data, timeout=self.timeout, retries=self.retries,
                                 backoff=self.backoff, abort=self._abort, warn=self._errors.warn,
                                 label="alertmanager")
        self.attempts += attempts
        return ok

