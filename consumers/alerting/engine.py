"""The alert state machine: Prometheus rule evaluation + Alertmanager notification policy.

One alert per key ``(run, worker, rule)``. A rule carries both severities, so "critical
suppresses warning for the same key" holds by construction: the key has one severity at
a time, and moving between them is a transition of that one alert.

States and transitions (each transition is exactly one :class:`Notification`)::

    inactive --breach--> pending --`for` breaching updates--> firing --past clear--> resolved
                            \\--past clear (never fired)--> resolved, transition "cancelled"
    ("past clear" = ``clear_for`` consecutive observations past the clear level)
    firing(warning) --`for` consecutive critical updates--> firing(critical)  "escalated"
    firing(critical) --`clear_for` consecutive updates past critical_clear--> firing(warning)
                                                                    transition "deescalated"
    firing --every `repeat` seconds--> reminder (same state, reminder=True)

Severity changes keep the same discipline as firing and resolving: consecutive
observations, both ways, so a value wandering across the critical level is not a page
every few updates (the flapping seen on real runs before this rule).

Paging floor (Alertmanager's ``group_interval``, per rule): once a key has paged, a
further paging transition within ``group_interval`` seconds is *held*, not sent (except a
first escalation to critical: getting worse pages at once, going critical *again* within
the interval is held like the rest); when the
interval has passed (checked on :meth:`tick`) only the net change goes out — resolved,
fired again, escalated or de-escalated relative to what was last sent — or nothing, when
the key is back where the last page left it. Pending notifications are limited the same
way: at most one pending (and its cancelled) per key per ``group_interval``; the others
are counted as ``suppressed``, so the console and the log are not a stream of near-misses.

Hysteresis (Schmitt trigger): between ``clear`` and the breach level a value is "in the
band"; it neither advances nor cancels a pending alert, neither escalates nor resolves a
firing one. So a value wobbling around a level produces nothing new. Non-finite values
fire at once (no pending); threshold rules ignore them, so one NaN is one alert, not two.

Only firing-related notifications page (:attr:`Notification.pages`); pending and
cancelled ones are for the bus, the log and the console, the way Prometheus shows
pending alerts in its UI but never sends them to Alertmanager.

The engine is pure: no I/O, no threads, and every method takes ``now`` (monotonic
seconds, for ``repeat`` and silence) and optionally ``wall`` (UNIX seconds for ``since``;
defaults to ``now``), so tests script thousands of events without sleeping.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bus import protocol
from consumers.alerting.rules import Rule
from consumers.history import HISTORY_LEN
from consumers.thresholds import SpikeTracker

Key = tuple[str, int | str, str]

#: Transition names (the ``transition`` extra field of alert events).
PENDING, CANCELLED, FIRED, ESCALATED, DEESCALATED, RESOLVED, REMINDER = (
    "pending", "cancelled", "fired", "escalated", "deescalated", "resolved", "reminder")


#: Transitions that reach pager sinks (and count against ``group_interval``).
PAGING = frozenset({FIRED, ESCALATED, DEESCALATED, RESOLVED, REMINDER})


class StreamLike(Protocol):
    """What the engine reads from consumers.runtime.StreamState (duck-typed for tests;
    an optional ``finished`` attribute, True after the worker's closing heartbeat, keeps
    a worker that ended cleanly out of the silence rule)."""

    last_received: float
    dropped: int


@dataclass(frozen=True, slots=True)
class Notification:
    """One alert notification; :meth:`fields` is the ``alert`` event payload."""

    run: str
    worker: int | str
    rule: str
    metric: str
    state: str  # pending | firing | resolved
    severity: str  # warning | critical
    since: float  # UNIX time the current state began
    transition: str
    at: float  # UNIX time of this notification
    value: float | None = None
    threshold: float | None = None
    reminder: bool = False
    summary: str = ""

    @property
    def pages(self) -> bool:
        """Whether pager-style sinks (exec, webhook) get it: firing, its changes, its end."""
        return self.transition in PAGING

    @property
    def key(self) -> Key:
        return (self.run, self.worker, self.rule)

    def fields(self) -> dict[str, Any]:
        """Fields of the ``alert`` event (schema in bus.protocol, plus ``transition``)."""
        out: dict[str, Any] = {"state": self.state, "severity": self.severity, "rule": self.rule,
                               "metric": self.metric, "since": float(self.since),
                               "reminder": self.reminder, "summary": self.summary,
                               "transition": self.transition}
        if self.value is not None:
            out["value"] = float(self.value)
        if self.threshold is not None:
            out["threshold"] = float(self.threshold)
        return out

    def record(self) -> dict[str, Any]:
        """A self-contained record (for the JSONL log and webhooks): who, when, what."""
        return {"type": protocol.ALERT, "ts": self.at, "run": self.run, "worker": self.worker,
                **self.fields()}

    def text(self) -> str:
        """One human line, also the Slack ``text`` field."""
        what = "REMINDER " if self.reminder else ""
        return (f"[{self.severity.upper()}] {what}{self.state} {self.rule} "
                f"{self.run}/{self.worker}: {self.summary}")


@dataclass(slots=True)
class _Alert:
    state: str  # pending | firing (inactive alerts are not stored)
    severity: str
    since: float
    metric: str
    value: float | None
    count: int = 1  # breaching updates seen while pending
    escalate: int = 0  # consecutive critical observations while firing warning
    calm: int = 0  # consecutive observations past critical_clear while firing critical
    clean: int = 0  # consecutive cleared observations (toward clear_for)
    last_sent: float = 0.0  # monotonic time of the last notification for this key
    announced: bool = False  # its pending notification went out (so its cancel does too)


@dataclass(slots=True)
class _Paged:
    """What the pager sinks were last told about one key, and when (monotonic). Reminders
    do not move ``at``: the floor spaces state changes, and a reminder is not one."""

    state: str  # firing | resolved
    severity: str
    at: float
    critical_at: float | None = None  # when "firing critical" was last paged


@dataclass(slots=True)
class _DropWindow:
    seen: int = 0
    recent: deque[tuple[float, int]] = field(default_factory=deque)

    def update(self, total: int, now: float, window: float) -> int:
        if total > self.seen:
            self.recent.append((now, total - self.seen))
        self.seen = max(self.seen, total)
        while self.recent and self.recent[0][0] <= now - window:
            self.recent.popleft()
        return sum(n for _, n in self.recent)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.4g}"


class AlertEngine:
    """Evaluates rules on updates and on ticks; returns the notifications to send."""

    def __init__(self, rules: Mapping[str, Rule] | Iterable[Rule]) -> None:
        items = tuple(rules.values()) if isinstance(rules, Mapping) else tuple(rules)
        self.rules: dict[str, Rule] = {r.name: r for r in items if r.enabled}
        # (rule, its shared threshold, clear level, critical_clear level): derived once,
        # not per observation. Levels are judged by the threshold code the monitor uses.
        self._threshold = tuple((r, r.threshold, r.clear_level, r.critical_clear_level)
                                for r in self.rules.values() if r.kind == "threshold")
        self._nonfinite = tuple(r for r in self.rules.values() if r.kind == "nonfinite")
        self._silent = tuple(r for r in self.rules.values() if r.kind == "silent")
        self._dropped = tuple(r for r in self.rules.values() if r.kind == "dropped")
        self._spike = tuple((r, r.clear_level, r.critical_clear_level, r.spike)
                            for r in self.rules.values() if r.kind == "spike")
        self._alerts: dict[Key, _Alert] = {}
        self._drops: dict[tuple[str, int | str, str], _DropWindow] = {}
        # Paging floor: the last paged state per key; keys with a held change (and the
        # alert as it was at that change, for a resolution whose alert is gone).
        self._paged: dict[Key, _Paged] = {}
        self._held: dict[Key, _Alert] = {}
        self._last_pending: dict[Key, float] = {}
        # Spike rules: per key, the values before the latest one and their ratios.
        self._trackers: dict[Key, SpikeTracker] = {}
        self._replaying = False
        self.counts: Counter[str] = Counter()

    # ------------------------------------------------------------------ inputs

    def observe(self, event: protocol.Event, now: float,
                wall: float | None = None) -> list[Notification]:
        """Evaluate one event (only ppo_update carries metrics; others are ignored)."""
        if event.type != protocol.PPO_UPDATE:
            return []
        return self.observe_fields(event.run, event.worker, event.fields, now, wall)

    def observe_fields(self, run: str, worker: int | str, fields: Mapping[str, Any],
                       now: float, wall: float | None = None) -> list[Notification]:
        """Evaluate one update's fields for (run, worker); the pure core of :meth:`observe`."""
        wall = now if wall is None else wall
        out: list[Notification] = []
        update = fields.get("update")
        for rule, threshold, clear, critical_clear in self._threshold:
            value = fields.get(rule.metric)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # absent = not measured: no evidence either way
            value = float(value)
            if not math.isfinite(value):
                continue  # the nonfinite rule's business: one NaN, one alert
            if rule.warmup and isinstance(update, int) and update < rule.warmup:
                continue
            self._step((run, worker, rule.name), rule, _level(threshold.severity(value)),
                       rule.past(value, clear), rule.past(value, critical_clear),
                       value, rule.metric, now, wall, out)
        for rule, clear, critical_clear, spike in self._spike:
            value = fields.get(rule.metric)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            value = float(value)
            key = (run, worker, rule.name)
            tracker = self._trackers.get(key)
            if tracker is None:
                tracker = self._trackers[key] = SpikeTracker(spike, HISTORY_LEN)
            ratio = tracker.observe(value)
            if ratio is None:
                continue  # too little finite history, or a non-finite value: no evidence
            self._step(key, rule, _level(spike.severity(ratio)), rule.past(ratio, clear),
                       rule.past(ratio, critical_clear), ratio, rule.metric, now, wall, out)
        for rule in self._nonfinite:
            bad_metric, bad_value, seen = None, None, False
            for name in rule.metrics:
                value = fields.get(name)
                if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                seen = True
                # *_count fields count non-finite elements: any is a breach.
                breach = value > 0 if name.startswith("nonfinite_") else not math.isfinite(value)
                if breach:
                    bad_metric, bad_value = name, float(value)
                    break
            if not seen:
                continue
            key = (run, worker, rule.name)
            alert = self._alerts.get(key)
            metric = bad_metric or (alert.metric if alert else rule.metrics[0])
            self._step(key, rule, "critical" if bad_metric else None, bad_metric is None,
                       False, bad_value, metric, now, wall, out)
        return out

    def observe_many(self, events: Iterable[protocol.Event], now: float,
                     wall: float | None = None, coalesce: bool = False) -> list[Notification]:
        """Evaluate a batch. With ``coalesce`` (history replayed from the daemon's
        snapshot), state is rebuilt but only the net change per key is notified: a NaN
        that fired and resolved before this process started is not news."""
        if not coalesce:
            out: list[Notification] = []
            for event in events:
                out.extend(self.observe(event, now, wall))
            return out
        before = {key: (a.state, a.severity) for key, a in self._alerts.items()}
        paged, held = dict(self._paged), dict(self._held)
        notes: list[Notification] = []
        self._replaying = True  # no paging floor inside the batch: it has one `now`
        try:
            for event in events:
                notes.extend(self.observe(event, now, wall))
        finally:
            self._replaying = False
        last = {note.key: note for note in notes}
        kept = []
        for key, note in last.items():
            alert = self._alerts.get(key)
            if ((alert.state, alert.severity) if alert else None) != before.get(key):
                kept.append(note)
        for note in notes:
            self.counts[note.transition] -= 1
        # The pager was told only what is kept: the floor restarts from that.
        self._paged, self._held = paged, held
        for note in kept:
            self.counts[note.transition] += 1
            if note.pages and not note.reminder:
                self._paged[note.key] = self._paged_now(note.key, note.state, note.severity, now)
                self._held.pop(note.key, None)
        return kept

    def tick(self, now: float, wall: float | None = None,
             streams: Mapping[tuple[str, int | str], StreamLike] | None = None) -> list[Notification]:
        """Time-driven evaluation: silence and loss per stream, reminders for every
        firing alert (also those whose worker has gone quiet). Call it periodically."""
        wall = now if wall is None else wall
        out: list[Notification] = []
        for (run, worker), stream in (streams or {}).items():
            if getattr(stream, "finished", False):
                # Ended cleanly (closing heartbeat): quiet is expected, and a silence
                # alert raised before the goodbye arrived is over.
                for rule in self._silent:
                    if (run, worker, rule.name) in self._alerts:
                        self._step((run, worker, rule.name), rule, None, True, True, 0.0,
                                   rule.metric, now, wall, out, force_clear=True)
            elif stream.last_received > 0:
                age = max(0.0, now - stream.last_received)
                for rule in self._silent:
                    self._step((run, worker, rule.name), rule, rule.level_of(age),
                               rule.past(age, rule.clear_level),
                               rule.past(age, rule.critical_clear_level),
                               age, rule.metric, now, wall, out)
            for rule in self._dropped:
                window = self._drops.setdefault((run, worker, rule.name), _DropWindow())
                lost = float(window.update(stream.dropped, now, rule.window))
                self._step((run, worker, rule.name), rule, rule.level_of(lost),
                           rule.past(lost, rule.clear_level),
                           rule.past(lost, rule.critical_clear_level),
                           lost, rule.metric, now, wall, out)
        if streams is not None:
            self._forget_gone_streams(streams, now, wall, out)
        for key, alert in list(self._alerts.items()):
            self._maybe_remind(key, alert, now, wall, out)
        self._release_held(now, wall, out)
        self._forget_quiet_keys(now)
        return out

    def _forget_gone_streams(self, streams: Mapping[tuple[str, int | str], StreamLike],
                             now: float, wall: float, out: list[Notification]) -> None:
        """Follow the runtime forgetting a worker (silent for its ``forget_after``): its
        alerts resolve — nothing is watched there any more, as Prometheus resolves an
        alert whose series went away — and its per-key state goes, so the engine's memory
        follows the workers that exist, not every key that ever spoke."""
        for key in [k for k in self._alerts if (k[0], k[1]) not in streams]:
            if key[1] == protocol.ALL_WORKERS:
                continue  # run-level alerts have no producer stream to follow
            rule = self.rules.get(key[2])
            if rule is not None:
                self._step(key, rule, None, True, True, self._alerts[key].value,
                           self._alerts[key].metric, now, wall, out, force_clear=True)
        for table in (self._trackers, self._drops):
            for key in [k for k in table if (k[0], k[1]) not in streams and k not in self._alerts]:
                del table[key]

    # ------------------------------------------------------------------ views

    def active(self) -> list[tuple[Key, str, str]]:
        """(key, state, severity) of every pending or firing alert."""
        return [(key, a.state, a.severity) for key, a in self._alerts.items()]

    def state_of(self, run: str, worker: int | str, rule: str) -> tuple[str, str | None]:
        alert = self._alerts.get((run, worker, rule))
        return (alert.state, alert.severity) if alert else ("inactive", None)

    # ------------------------------------------------------------------ machine

    def _step(self, key: Key, rule: Rule, level: str | None, cleared: bool, crit_cleared: bool,
              value: float | None, metric: str, now: float, wall: float,
              out: list[Notification], force_clear: bool = False) -> None:
        """Advance one key by one observation. ``level`` is the severity this observation
        breaches (None: none); ``cleared``/``crit_cleared``: past clear / critical_clear.
        ``force_clear`` resolves at once (the stream it watches has ended)."""
        need = rule.for_ if rule.kind in ("threshold", "spike") else 1
        alert = self._alerts.get(key)
        if alert is None:
            if level is None:
                return
            alert = self._alerts[key] = _Alert("pending", level, wall, metric, value)
            if need <= 1:
                self._fire(key, rule, alert, now, wall, out)
            else:
                self._emit(key, rule, alert, PENDING, now, wall, out)
            return
        alert.value = value
        if level is not None:
            alert.metric = metric
            alert.clean = 0
        elif cleared:
            alert.clean += 1
            alert.count = 0  # a healthy observation breaks a pending streak (band values hold it)
            if alert.clean >= rule.clear_after or force_clear:
                del self._alerts[key]
                self._emit(key, rule, alert, RESOLVED if alert.state == "firing" else CANCELLED,
                           now, wall, out)
            return
        else:
            alert.clean = 0  # inside the hysteresis band: hold

        if alert.state == "pending":
            if level is not None:
                alert.count += 1
                alert.severity = level
                if alert.count >= need:
                    self._fire(key, rule, alert, now, wall, out)
            return

        if alert.severity == "warning":
            # Escalate on `for` *consecutive* critical observations.
            alert.escalate = alert.escalate + 1 if level == "critical" else 0
            if alert.escalate >= need:
                alert.severity, alert.since, alert.escalate = "critical", wall, 0
                self._emit(key, rule, alert, ESCALATED, now, wall, out)
                return
        elif rule.warning is not None:
            # De-escalate on `clear_for` consecutive observations past critical_clear.
            alert.calm = alert.calm + 1 if level != "critical" and crit_cleared else 0
            if alert.calm >= rule.clear_after:
                alert.severity, alert.since, alert.calm = "warning", wall, 0
                self._emit(key, rule, alert, DEESCALATED, now, wall, out)
                return
        self._maybe_remind(key, alert, now, wall, out)

    def _fire(self, key: Key, rule: Rule, alert: _Alert, now: float, wall: float,
              out: list[Notification]) -> None:
        alert.state, alert.since, alert.escalate, alert.calm = "firing", wall, 0, 0
        self._emit(key, rule, alert, FIRED, now, wall, out)

    def _maybe_remind(self, key: Key, alert: _Alert, now: float, wall: float,
                      out: list[Notification]) -> None:
        rule = self.rules[key[2]]
        if alert.state != "firing" or rule.repeat <= 0 or key in self._held:
            return
        paged = self._paged.get(key)  # a reminder follows the last *page*, whichever alert
        last = max(alert.last_sent, paged.at) if paged is not None else alert.last_sent
        if now - last >= rule.repeat:
            self._emit(key, rule, alert, REMINDER, now, wall, out)

    def _emit(self, key: Key, rule: Rule, alert: _Alert, transition: str, now: float,
              wall: float, out: list[Notification]) -> None:
        """Send one transition, unless the paging floor or the pending limit holds it."""
        if not self._replaying:
            if transition == PENDING:
                last = self._last_pending.get(key)
                if last is not None and now - last < rule.group_interval:
                    self.counts["suppressed"] += 1
                    return
                self._last_pending[key] = now
                alert.announced = True
            elif transition == CANCELLED and not alert.announced:
                self.counts["suppressed"] += 1
                return
            elif transition in PAGING and transition != REMINDER:
                paged = self._paged.get(key)
                if paged is not None and self._holds(paged, transition, now, rule.group_interval):
                    self._held[key] = alert  # the net change goes out on a later tick
                    self.counts["held"] += 1
                    return
        self._send(key, rule, alert, transition, now, wall, out)

    @staticmethod
    def _holds(paged: _Paged, transition: str, now: float, interval: float) -> bool:
        """Whether the paging floor holds this change. A first escalation to critical is
        never held (getting worse is the news a pager exists for); going critical again
        within ``interval`` of the last critical page is, as is every other change."""
        if transition == ESCALATED:
            return paged.critical_at is not None and now - paged.critical_at < interval
        return now - paged.at < interval

    def _send(self, key: Key, rule: Rule, alert: _Alert, transition: str, now: float,
              wall: float, out: list[Notification]) -> None:
        if transition in (RESOLVED, CANCELLED):
            state, since, threshold = "resolved", wall, rule.clear_level
        else:
            state = "pending" if transition == PENDING else "firing"
            since, threshold = alert.since, rule.level_value(alert.severity)
        if rule.kind == "nonfinite":
            threshold = None
        alert.last_sent = now
        if transition in PAGING and transition != REMINDER:
            self._paged[key] = self._paged_now(key, state, alert.severity, now)
            self._held.pop(key, None)
        self.counts[transition] += 1
        out.append(Notification(
            run=key[0], worker=key[1], rule=key[2], metric=alert.metric, state=state,
            severity=alert.severity, since=since, transition=transition, at=wall,
            value=alert.value, threshold=threshold, reminder=transition == REMINDER,
            summary=_summary(rule, alert, transition, threshold)))

    def _paged_now(self, key: Key, state: str, severity: str, now: float) -> _Paged:
        before = self._paged.get(key)
        critical_at = before.critical_at if before is not None else None
        if state == "firing" and severity == "critical":
            critical_at = now
        return _Paged(state, severity, now, critical_at)

    def _release_held(self, now: float, wall: float, out: list[Notification]) -> None:
        """Send the net change of every held key whose ``group_interval`` has passed."""
        for key, snapshot in list(self._held.items()):
            rule, paged = self.rules[key[2]], self._paged[key]
            if now - paged.at < rule.group_interval:
                continue
            del self._held[key]
            alert = self._alerts.get(key)
            if alert is not None and alert.state == "firing":
                if paged.state == "resolved":
                    transition = FIRED
                elif alert.severity != paged.severity:
                    transition = ESCALATED if alert.severity == "critical" else DEESCALATED
                else:
                    continue  # back where the last page left it: nothing new to say
                self._send(key, rule, alert, transition, now, wall, out)
            elif paged.state == "firing":
                self._send(key, rule, snapshot, RESOLVED, now, wall, out)

    def _forget_quiet_keys(self, now: float) -> None:
        """Drop paging/pending bookkeeping of keys that are inactive and past their floor,
        so memory follows the active alerts, not every key that ever fired."""
        for table in (self._paged, self._last_pending):
            for key in [k for k in table if k not in self._alerts and k not in self._held]:
                at = table[key].at if isinstance(table[key], _Paged) else table[key]
                if now - at >= self.rules[key[2]].group_interval:
                    del table[key]


def _level(severity: str) -> str | None:
    """The engine's level of a shared severity: "ok" is no breach."""
    return None if severity == "ok" else severity


def _summary(rule: Rule, alert: _Alert, transition: str, threshold: float | None) -> str:
    """A sentence a person can act on: what, how bad, compared with what, and why it matters."""
    value = _fmt(alert.value)
    if transition in (RESOLVED, CANCELLED):
        if rule.kind == "nonfinite":
            return f"values finite again for {rule.clear_after} updates ({alert.metric} was non-finite)"
        if rule.kind == "silent":
            return "worker is sending events again"
        side = "below" if rule.op == ">" else "above"
        what = "resolved" if transition == RESOLVED else "pending cancelled"
        if rule.kind == "spike":
            return (f"{what}: {rule.metric} back to {value}x its recent median "
                    f"(below {_fmt(threshold)}x)")
        return f"{what}: {rule.metric} = {value}, back {side} {_fmt(threshold)}"
    if rule.kind == "nonfinite":
        head = f"{alert.metric} = {value}"
    elif rule.kind == "silent":
        head = f"no event for {alert.value or 0:.0f} s (> {_fmt(threshold)} s)"
    elif rule.kind == "dropped":
        head = f"{value} events lost in the last {rule.window:g} s"
    elif rule.kind == "spike":
        head = (f"{rule.metric} at {value}x its median over the previous updates "
                f"(> {_fmt(threshold)}x)")
    else:
        head = f"{rule.metric} = {value} {rule.op} {_fmt(threshold)}"
    verb = {PENDING: "pending", ESCALATED: "escalated", DEESCALATED: "de-escalated",
            REMINDER: "still firing"}.get(transition)
    tail = f" ({verb})" if verb else ""
    return f"{head}{tail}: {rule.summary}" if rule.summary else f"{head}{tail}"
