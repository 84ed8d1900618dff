"""The contract equals the code: every producer's real output against ``bus.protocol.SCHEMAS``,
and SCHEMAS against the README's event tables.

Why run the producers for real: the schemas drifted from what was sent (fields declared
that nothing sent, fields sent that nothing declared) because each producer builds its
payload in its own module. Here every one of them runs as an operator runs it — a node
daemon forwarding to a hub (``bus_stats`` with its upstream fields), ``trainbus train``
(TelemetryEmitter: ppo_update, periodic and closing heartbeats with ``node``), the SB3 callback in a real ``PPO.learn``, ``trainbus publish``,
``trainbus aggregate`` (ppo_summary) and ``trainbus alert`` driven into firing — and a plain
SUB socket collects what actually crossed the bus. Any field sent but not declared fails,
and so does any declared field that none of them sent (every optional field has a
producer path exercised here, so "nobody sends it" is decidable).
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from bus import protocol
from tests.conftest import REPO, ProcessGroup, start_daemon, trainbus_cmd, wait_for

pytest.importorskip("torch")
pytest.importorskip("stable_baselines3")

TRAIN_RUN = "contract-train"
SB3_RUN = "contract-sb3"
SYNTH_RUN = "contract-synth"

# Two PPO updates of 64 steps each, run as a user would: the callback's own emitter.
SB3_SCRIPT = f"""
import torch
torch.set_num_threads(1)
from stable_baselines3 import PPO
from emitter.integrations.sb3 import TrainbusCallback
callback = TrainbusCallback(run={SB3_RUN!r}, worker=0)
assert callback.emitter.wait_for_bus(15), "no daemon"
model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=2, seed=0,
            device="cpu")
model.learn(128, callback=callback)
callback.close()
"""


class BusTap:
    """A plain SUB socket on the daemon's subscribe side, keeping every message raw."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.frames: list[list[bytes]] = []

    def drain(self) -> None:
        while self.sock.poll(20):
            self.frames.append(self.sock.recv_multipart())

    def payloads(self) -> list[tuple[str, dict[str, Any]]]:
        return [(f[0].decode(), msgpack.unpackb(f[1], raw=False)) for f in self.frames]

    def has(self, topic_prefix: str, **fields: Any) -> bool:
        self.drain()
        return any(topic.startswith(topic_prefix)
                   and all(payload.get(k) == v for k, v in fields.items())
                   for topic, payload in self.payloads())

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def run_every_producer(procs: ProcessGroup, tmp_path: Path) -> tuple[BusTap, dict[str, Any]]:
    # A node daemon (--upstream to a hub of its own), so bus_stats' upstream fields are sent.
    hub = start_daemon(procs, "--stats-interval", "0.2")
    daemon = start_daemon(procs, "--stats-interval", "0.2", "--upstream", hub.publish)
    tap = BusTap(daemon.subscribe)
    try:
        wait_for(lambda: tap.has("bus_stats/daemon/all"), 15, message="the tap to see bus_stats")
        alert = procs.start(trainbus_cmd("alert", "--log", str(tmp_path / "alerts.jsonl")),
                            env=daemon.env)
        aggregate = procs.start(trainbus_cmd("aggregate", "--interval", "0.5"), env=daemon.env)
        alert.stderr.wait_for_line(r"ready: \d+ rules", 15)
        aggregate.stderr.wait_for_line(r"aggregating", 15)
        producers = {
            # GROUP_RANK: the launcher's node index, so heartbeats carry `node`.
            "train": procs.start(trainbus_cmd("train", "--updates", "2", "--envs", "2",
                                              "--run", TRAIN_RUN),
                                 env={**daemon.env, "GROUP_RANK": "0"}),
            "sb3": procs.start([sys.executable, "-c", SB3_SCRIPT], env=daemon.env),
            # explode: healthy for 20 updates, then past 5 and 10, so grad_norm_high fires.
            "publish": procs.start(trainbus_cmd("publish", "--run", SYNTH_RUN, "--pattern",
                                                "explode", "--count", "50", "--rate", "200"),
                                   env=daemon.env),
        }
        for name, proc in producers.items():
            assert proc.wait(60) == 0, f"{name} failed:\n{proc.stderr.text()[-3000:]}"
        for run in (TRAIN_RUN, SB3_RUN):
            wait_for(lambda run=run: tap.has(f"heartbeat/{run}/", closing=True), 10,
                     message=f"{run}'s closing heartbeat")
        wait_for(lambda: tap.has(f"alert/{SYNTH_RUN}/0", state="firing", rule="grad_norm_high"),
                 15, message=f"a firing alert; alert log:\n{alert.stdout.text()[-2000:]}")
        wait_for(lambda: tap.has(f"ppo_summary/{SYNTH_RUN}/all"), 10, message="a ppo_summary")
        for prefix in (f"ppo_update/{TRAIN_RUN}/", f"ppo_update/{SB3_RUN}/",
                       f"ppo_update/{SYNTH_RUN}/", f"heartbeat/{SYNTH_RUN}/"):
            assert tap.has(prefix), f"nothing on {prefix}"
        return tap, producers
    except BaseException:
        tap.close()
        raise


def producer_of(topic: str) -> str:
    kind, run, _ = topic.split("/")
    return {"bus_stats": "daemon", "alert": "trainbus alert",
            "ppo_summary": "trainbus aggregate"}.get(kind, run)


@pytest.mark.timeout(90)
def test_every_producer_sends_exactly_the_declared_fields(procs, tmp_path):
    tap, _ = run_every_producer(procs, tmp_path)
    try:
        sent: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        entry_fields: dict[str, set[str]] = defaultdict(set)
        for frames in tap.frames:
            event = protocol.decode(frames)  # every real message is valid v1
            who = producer_of(event.topic)
            for name in event.fields.keys() - set(protocol.ENVELOPE_FIELDS):
                sent[event.type][name].add(who)
            if event.type == protocol.PPO_SUMMARY:
                for metric, entry in event.fields["metrics"].items():
                    for name in entry:
                        entry_fields[name].add(metric)
    finally:
        tap.close()

    assert set(sent) == set(protocol.SCHEMAS), "a producer's type is missing or undeclared"
    problems = []
    for event_type, (required, optional) in protocol.SCHEMAS.items():
        declared = required.keys() | optional.keys()
        for name in sorted(sent[event_type].keys() - declared):
            problems.append(f"{event_type}.{name} is sent by {sorted(sent[event_type][name])} "
                            "but not declared in bus.protocol.SCHEMAS")
        for name in sorted(declared - sent[event_type].keys()):
            problems.append(f"{event_type}.{name} is declared but no producer sent it")
    declared_entry = set(protocol.PPO_SUMMARY_METRIC_FIELDS)
    for name in sorted(entry_fields.keys() - declared_entry):
        problems.append(f"ppo_summary metrics entries carry undeclared {name!r}")
    for name in sorted(declared_entry - entry_fields.keys()):
        problems.append(f"ppo_summary metrics entries never carry declared {name!r}")
    assert not problems, "\n".join(problems)


def test_alert_transitions_are_the_engines():
    from consumers.alerting import engine

    assert set(protocol.ALERT_TRANSITIONS) == {
        engine.PENDING, engine.CANCELLED, engine.FIRED, engine.ESCALATED, engine.DEESCALATED,
        engine.RESOLVED, engine.REMINDER}


# --------------------------------------------------------------------------- README

_TYPE_HEADER = re.compile(r"^\*\*`(\w+)/[^/`]+/[^/`]+`\*\*", re.M)
_ENTRY_MARKER = "Each `metrics` entry"


def _table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[1:] if rows else rows  # drop the header row


def readme_event_tables() -> dict[str, Any]:
    """Per type: (required names, optional names) from the README's event tables, plus the
    ppo_summary metrics entry names under the key ``"metrics entry"``."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Event types"):text.index("### Snapshot (late joiners)")]
    headers = list(_TYPE_HEADER.finditer(section))
    tables: dict[str, Any] = {}
    for i, header in enumerate(headers):
        body = section[header.end():headers[i + 1].start() if i + 1 < len(headers) else None]
        if _ENTRY_MARKER in body:
            body, entry = body.split(_ENTRY_MARKER, 1)
            tables["metrics entry"] = {n for row in _table_rows(entry)
                                       for n in re.findall(r"`(\w+)`", row[0])}
        required: set[str] = set()
        optional: set[str] = set()
        for row in _table_rows(body):
            names = re.findall(r"`(\w+)`", row[0])
            assert row[2] in ("required", "optional"), row
            (required if row[2] == "required" else optional).update(names)
        tables[header.group(1)] = (required, optional)
    return tables


def test_readme_event_tables_list_exactly_the_schemas():
    tables = readme_event_tables()
    assert tables.pop("metrics entry") == set(protocol.PPO_SUMMARY_METRIC_FIELDS)
    assert set(tables) == set(protocol.SCHEMAS)
    for event_type, (required, optional) in protocol.SCHEMAS.items():
        assert tables[event_type] == (set(required), set(optional)), event_type
