"""Where alert notifications go: console, JSONL log, the bus, a command, a webhook.

Two families, because they fail differently:

* **Local sinks** (console, log file, bus) are fast and run inline: a write, a flush, a
  non-blocking ZeroMQ send. They see every notification, pending ones included.
* **Pager sinks** (``--exec``, ``--webhook``, ``--alertmanager`` in
  :mod:`consumers.alerting.alertmanager`) may take seconds or hang. Each runs on its own
  thread behind a bounded queue, so a slow endpoint can never delay evaluation of the next
  event; when the queue is full the *oldest* waiting notification is dropped (the newest
  state is the one worth delivering) and counted. They get only notifications that
  :attr:`~consumers.alerting.engine.Notification.pages` (firing, escalation, reminders,
  resolution), as Alertmanager never pages on pending alerts.

No sink's failure stops the process: errors are logged (rate-limited) and counted.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from rich.console import Console
from rich.text import Text

from bus import protocol
from consumers.alerting.engine import Notification

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 256
DEFAULT_EXEC_TIMEOUT_S = 10.0
DEFAULT_WEBHOOK_TIMEOUT_S = 5.0
DEFAULT_WEBHOOK_RETRIES = 3
DEFAULT_WEBHOOK_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0


class Sink(Protocol):
    name: str
    pages_only: bool

    def send(self, note: Notification) -> None: ...

    def close(self, timeout: float) -> None: ...


# ---------------------------------------------------------------------- local sinks

_STYLE = {("firing", "critical"): "bold red", ("firing", "warning"): "bold yellow",
          ("pending", "critical"): "dim red", ("pending", "warning"): "dim yellow",
          ("resolved", "critical"): "green", ("resolved", "warning"): "green"}


class ConsoleSink:
    """Coloured one-line notifications (colour = severity/state, like the monitor)."""

    name = "console"
    pages_only = False

    def __init__(self, file: IO[str] | None = None, color: bool | None = None) -> None:
        self.console = Console(file=file or sys.stdout, highlight=False, soft_wrap=True,
                               no_color=None if color is None else not color,
                               force_terminal=color or None)

    def send(self, note: Notification) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(note.at))
        label = "reminder" if note.reminder else note.transition
        line = Text(f"{stamp} ")
        line.append(f"{note.severity.upper():8} {note.state:8}",
                    style=_STYLE.get((note.state, note.severity), ""))
        line.append(f" {label:11} {note.rule} {note.run}/{note.worker}  {note.summary}")
        self.console.print(line)
        self.console.file.flush()

    def close(self, timeout: float) -> None:
        self.console.file.flush()


class JsonlSink:
    """``--log FILE``: one strict-JSON object per notification, appended, flushed each time
    so ``tail -f`` and a crash both see every alert that was raised."""

    name = "log"
    pages_only = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh = self.path.open("a", encoding="utf-8")

    def send(self, note: Notification) -> None:
        self._fh.write(protocol.to_json(note.record()) + "\n")
        self._fh.flush()

    def close(self, timeout: float) -> None:
        if not self._fh.closed:
            self._fh.close()


class BusSink:
    """``alert/<run>/<worker>`` events, so the monitor and any other consumer see alerts."""

    name = "bus"
    pages_only = False

    def __init__(self, publisher: Any) -> None:
        self.publisher = publisher  # bus.publisher.EventPublisher
        self.dropped = 0

    def send(self, note: Notification) -> None:
        if not self.publisher.publish(protocol.ALERT, note.run, note.worker, note.fields(),
                                      ts=note.at):
            self.dropped += 1

    def close(self, timeout: float) -> None:
        pass  # the publisher's owner closes it (bounded linger)


# ---------------------------------------------------------------------- queued sinks

_STOP = object()
_IDLE = object()  # the queue stayed empty until the next idle() was due


class QueuedSink:
    """A bounded queue drained by one daemon thread; subclasses implement :meth:`deliver`.

    Counters: ``delivered``, ``failed`` (gave up after retries), ``dropped`` (queue full).
    """

    name = "queued"
    pages_only = True
    #: Seconds between :meth:`idle` calls on the delivery thread; None: never. For an
    #: endpoint that forgets what is not repeated (Alertmanager expires unrefreshed alerts).
    idle_interval: float | None = None

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._loop, name=f"alert-{self.name}", daemon=True)
        self._thread.start()

    def send(self, note: Notification) -> None:
        """Never blocks: a full queue loses its oldest entry instead."""
        self._enqueue(note)

    def _enqueue(self, item: Any) -> None:
        """Queue one item for :meth:`deliver` (dropping the oldest when full)."""
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self._queue.task_done()
                    with self._lock:
                        self.dropped += 1
                    log.warning("%s sink: queue full, dropped the oldest alert (%d so far)",
                                self.name, self.dropped)
                except queue.Empty:
                    pass

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far was handled; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float) -> None:
        """Deliver what is queued within ``timeout``, then give up on the rest."""
        done = self.flush(timeout)
        self._abort.set()
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass
        self._thread.join(0.5)
        if not done:
            log.warning("%s sink: %d alert(s) not delivered at exit", self.name,
                        self._queue.qsize())

    def _loop(self) -> None:
        interval = self.idle_interval
        next_idle = None if interval is None else time.monotonic() + interval
        while True:
            timeout = None if next_idle is None else max(0.0, next_idle - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = _IDLE
            if next_idle is not None and interval is not None and time.monotonic() >= next_idle:
                if not self._abort.is_set():
                    try:
                        self.idle()
                    except Exception:  # a sink bug must not kill the thread
                        log.exception("%s sink: periodic work raised", self.name)
                next_idle = time.monotonic() + interval
            if item is _IDLE:
                continue
            try:
                if item is _STOP:
                    return
                if self._abort.is_set():
                    continue
                try:
                    ok = self.deliver(item)
                except Exception:  # a sink bug must not kill the thread
                    log.exception("%s sink: delivery raised", self.name)
                    ok = False
                with self._lock:
                    if ok:
                        self.delivered += 1
                    else:
                        self.failed += 1
            finally:
                self._queue.task_done()

    def deliver(self, note: Any) -> bool:
        raise NotImplementedError

    def idle(self) -> None:
        """Periodic work on the delivery thread, every :attr:`idle_interval` seconds."""


class ExecSink(QueuedSink):
    """``--exec CMD``: run CMD through the shell with the alert JSON on stdin (and the main
    fields in ``TRAINBUS_ALERT_*`` variables); killed, with its process group, after
    ``timeout`` seconds. A failure is logged and the next alert still runs."""

    name = "exec"

    def __init__(self, command: str, timeout: float = DEFAULT_EXEC_TIMEOUT_S,
                 queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.command = command
        self.timeout = timeout
        super().__init__(queue_size)

    def deliver(self, note: Notification) -> bool:
        env = dict(os.environ)
        env.update({"TRAINBUS_ALERT_STATE": note.state, "TRAINBUS_ALERT_SEVERITY": note.severity,
                    "TRAINBUS_ALERT_RULE": note.rule, "TRAINBUS_ALERT_RUN": note.run,
                    "TRAINBUS_ALERT_WORKER": str(note.worker),
                    "TRAINBUS_ALERT_TRANSITION": note.transition})
        data = (protocol.to_json(note.record()) + "\n").encode()
        try:
            proc = subprocess.Popen(self.command, shell=True, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env=env, start_new_session=True)
        except OSError as exc:
            log.warning("exec sink: cannot start %r: %s", self.command, exc)
            return False
        try:
            _, err = proc.communicate(data, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            log.warning("exec sink: %r killed after %.1f s", self.command, self.timeout)
            return False
        if proc.returncode != 0:
            detail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
            log.warning("exec sink: %r exited %d%s", self.command, proc.returncode,
                        f": {detail[0][:200]}" if detail else "")
            return False
        return True


class WebhookSink(QueuedSink):
    """``--webhook URL``: POST the alert record as JSON plus a Slack-compatible ``text``.

    Each attempt has ``timeout`` seconds; network errors, timeouts, 429 and 5xx are retried
    ``retries`` times with exponential backoff (``backoff``, doubling, capped at 8 s);
    other 4xx are not (the payload will not get better). Runs on the sink's own thread.
    """

    name = "webhook"

    def __init__(self, url: str, timeout: float = DEFAULT_WEBHOOK_TIMEOUT_S,
                 retries: int = DEFAULT_WEBHOOK_RETRIES, backoff: float = DEFAULT_WEBHOOK_BACKOFF_S,
                 queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.attempts = 0
        super().__init__(queue_size)

    @staticmethod
    def payload(note: Notification) -> bytes:
        body = note.record()
        body["text"] = note.text()
        return protocol.to_json(body).encode()

    def deliver(self, note: Notification) -> bool:
        ok, attempts = post_json(self.url, self.payload(note), timeout=self.timeout,
                                 retries=self.retries, backoff=self.backoff, abort=self._abort,
                                 warn=log.warning, label="webhook")
        self.attempts += attempts
        return ok


def post_json(url: str, data: bytes, *, timeout: float, retries: int, backoff: float,
              abort: threading.Event, warn: Callable[..., None],
              label: str) -> tuple[bool, int]:
    """POST ``data`` as JSON; (delivered, attempts made). Network errors, 429 and 5xx are
    retried ``retries`` times with doubling backoff (capped at 8 s) — waits that ``abort``
    cuts short at exit; other 4xx are not (the receiver refused this payload, resending it
    would not help). Failures are reported through ``warn`` (the caller's rate limit)."""
    delay = backoff
    attempts = 0
    for attempt in range(retries + 1):
        if attempt:
            if abort.wait(delay):
                return False, attempts
            delay = min(delay * 2, MAX_BACKOFF_S)
        attempts += 1
        request = urllib.request.Request(
            url, data=data, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "trainbus-alert"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read(65536)
            return True, attempts
        except urllib.error.HTTPError as exc:
            try:  # receivers such as Alertmanager say why they refused a payload
                detail = exc.read(300).decode(errors="replace").strip()
            except OSError:
                detail = ""
            retry = exc.code == 429 or exc.code >= 500
            warn("%s %s: HTTP %d %s%s", label, url, exc.code, detail,
                 " (will retry)" if retry and attempt < retries else "")
            if not retry:
                return False, attempts
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            warn("%s %s: %s%s", label, url, reason, " (will retry)" if attempt < retries else "")
    return False, attempts


# ---------------------------------------------------------------------- fan-out


class Dispatcher:
    """Sends each notification to every sink that wants it; a sink error is survived."""

    def __init__(self, sinks: list[Any]) -> None:
        self.sinks = list(sinks)
        self.errors = 0

    def send(self, note: Notification) -> None:
        for sink in self.sinks:
            if sink.pages_only and not note.pages:
                continue
            try:
                sink.send(note)
            except Exception as exc:  # a full disk or closed pipe must not stop alerting
                self.errors += 1
                if self.errors == 1 or self.errors % 100 == 0:
                    log.warning("%s sink failed: %s (%d errors so far)", sink.name, exc, self.errors)

    def close(self, timeout: float = 2.0) -> None:
        """Flush every sink within one shared deadline."""
        deadline = time.monotonic() + timeout
        for sink in self.sinks:
            try:
                sink.close(max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                log.warning("%s sink: close failed: %s", sink.name, exc)

