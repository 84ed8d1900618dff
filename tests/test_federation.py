"""Federation: node daemons forward to a hub (``trainbus daemon --upstream``).

Why real processes and real network namespaces: the promise spans machines — workers talk
to their own node's daemon over loopback, only the node daemons cross the network (with
CURVE), the hub's consumers see the whole cluster, and a hub outage costs the nodes
nothing but is counted at the hub's consumers as seq gaps. Network namespaces joined by
veth pairs are the closest thing to separate machines a test can create: each has its own
loopback, addresses and routes, so "connect to 127.0.0.1" on node A cannot reach node B.

The loopback tests (a chain of two hops, refusals) run everywhere; the namespace test
needs root and ``ip netns`` and skips, saying why, where the machine refuses them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bus import protocol
from consumers.runtime import Subscriber
from tests.conftest import (
    DaemonHandle,
    Proc,
    ProcessGroup,
    start_daemon,
    trainbus_cmd,
    wait_for,
)


def keys_init(procs: ProcessGroup, directory: Path) -> Path:
    proc = procs.start(trainbus_cmd("keys", "init", str(directory)))
    assert proc.wait(timeout=20) == 0, proc.stderr.text()
    return directory


def keys_client(procs: ProcessGroup, directory: Path, name: str) -> Path:
    """``trainbus keys client DIR NAME``: the directory a node's --upstream-curve takes."""
    proc = procs.start(trainbus_cmd("keys", "client", str(directory), name))
    assert proc.wait(timeout=20) == 0, proc.stderr.text()
    return directory / "clients" / name


def drain(sub: Subscriber, into: list[protocol.Event], timeout_ms: int = 20) -> list[protocol.Event]:
    into.extend(sub.poll(timeout_ms))
    return into


# ----------------------------------------------------------------------------- loopback


@pytest.mark.timeout(60)
def test_chain_of_two_hops_with_curve(procs: ProcessGroup, tmp_path: Path) -> None:
    """node -> mid -> hub, CURVE on both network hops: the hub's late joiner gets the
    node's events byte for byte (same session, gap-free seqs), and every bus_stats stream
    stays with its own daemon (the hub's consumers see one daemon's, one session)."""
    hub_keys = keys_init(procs, tmp_path / "hub-keys")
    mid_keys = keys_init(procs, tmp_path / "mid-keys")
    mid_to_hub = keys_client(procs, hub_keys, "mid")
    node_to_mid = keys_client(procs, mid_keys, "node")
    hub = start_daemon(procs, "--curve", str(hub_keys), "--stats-interval", "0.2")
    mid = start_daemon(procs, "--curve", str(mid_keys), "--stats-interval", "0.2",
                       "--upstream", hub.publish, "--upstream-curve", str(mid_to_hub))
    node = start_daemon(procs, "--stats-interval", "0.2", "--upstream", mid.publish,
                        "--upstream-curve", str(node_to_mid))
    assert f"upstream={mid.publish}" in node.proc.stdout.text()

    # Both hops up (the node's bus_stats say so) before anything is published.
    with Subscriber(node.subscribe, node.snapshot, types=["bus_stats"],
                    use_snapshot=False) as node_stats:
        seen: list[protocol.Event] = []
        wait_for(lambda: any(e.fields.get("upstream_connected") for e in drain(node_stats, seen)),
                 15, interval=0, message="the node's bus_stats to report its upstream connected")
        assert seen[-1].fields["upstream"] == mid.publish
    mid.proc.stderr.wait_for_line(r"upstream .*: connected", 15)

    publisher = procs.start(trainbus_cmd("publish", "--run", "chain", "--workers", "2",
                                         "--count", "30", "--rate", "300"), env=node.env)
    assert publisher.wait(30) == 0, publisher.stderr.text()

    with Subscriber(hub.subscribe, hub.snapshot, curve_client=str(hub_keys),
                    types=["ppo_update", "bus_stats"]) as late:
        events: list[protocol.Event] = []

        def complete() -> bool:
            drain(late, events)
            last = {e.worker: e.seq for e in events if e.type == "ppo_update"}
            stats = [e for e in events if e.type == "bus_stats"]
            return last == {0: 29, 1: 29} and len(stats) >= 3

        wait_for(complete, 15, interval=0, message="the hub to hold both workers' history")
        updates = [e for e in events if e.type == "ppo_update"]
        # The snapshot: the last 10 of each worker, in order, nothing lost on the way.
        for worker in (0, 1):
            seqs = [e.seq for e in updates if e.worker == worker]
            assert seqs == list(range(20, 30)), seqs
        assert late.stats.dropped_total == 0
        stats_sessions = {e.session for e in events if e.type == "bus_stats"}
        assert len(stats_sessions) == 1, f"bus_stats from several daemons at the hub: {stats_sessions}"
        assert all("upstream" not in e.fields for e in events if e.type == "bus_stats")


@pytest.mark.timeout(60)
def test_a_refused_node_forwards_once_its_key_is_authorized(procs: ProcessGroup,
                                                            tmp_path: Path) -> None:
    """The hub refuses a node whose key is not (yet) in its authorized/ directory, and
    libzmq then gives that connection up for good. Authorizing the key on the hub must be
    enough: the node dials again by itself (no restart) and its events reach the hub."""
    hub_keys = keys_init(procs, tmp_path / "hub-keys")
    node_to_hub = keys_client(procs, hub_keys, "node")
    authorized = hub_keys / "authorized" / "node.key"
    held_back = tmp_path / "node.key"
    authorized.rename(held_back)
    hub = start_daemon(procs, "--curve", str(hub_keys), "--stats-interval", "0.2")
    node = start_daemon(procs, "--stats-interval", "0.2", "--upstream", hub.publish,
                        "--upstream-curve", str(node_to_hub))
    node.proc.stderr.wait_for_line(r"refused this node's CURVE key", 15)
    with Subscriber(node.subscribe, node.snapshot, types=["bus_stats"],
                    use_snapshot=False) as node_stats:
        # Events while refused: handed to the upstream socket (and dropped there), counted.
        early = procs.start(trainbus_cmd("publish", "--run", "early", "--workers", "1",
                                         "--count", "20", "--rate", "200"), env=node.env)
        assert early.wait(30) == 0, early.stderr.text()
        stats: list[protocol.Event] = []
        wait_for(lambda: any(e.fields["upstream_frames"] >= 40 for e in drain(node_stats, stats)),
                 15, interval=0, message="the node to count the early events' frames")
        shutil.copyfile(held_back, authorized)  # the hub rereads authorized/ by itself
        node.proc.stderr.wait_for_line(r"upstream .*: connected", 20)
        # A few bus_stats after the redial: the restarted upstream proxy counts from 0.
        wait_for(lambda: sum(e.fields["upstream_connected"] for e in drain(node_stats, stats)) >= 3,
                 15, interval=0, message="the node's bus_stats to say it is connected")
        counted = [e.fields["upstream_frames"] for e in stats]
        assert counted == sorted(counted), f"upstream_frames went back across the redial: {counted}"
        assert stats[-1].fields["upstream_refused"] >= 1

    with Subscriber(hub.subscribe, hub.snapshot, curve_client=str(hub_keys),
                    types=["ppo_update"], use_snapshot=False) as at_hub:
        publisher = procs.start(trainbus_cmd("publish", "--run", "late-key", "--workers", "1",
                                             "--count", "200", "--rate", "100"), env=node.env)
        events: list[protocol.Event] = []
        wait_for(lambda: any(e.run == "late-key" for e in drain(at_hub, events)), 15,
                 interval=0, message="the node's events at the hub after its key was authorized")
        assert publisher.wait(30) == 0, publisher.stderr.text()
    assert node.proc.popen.poll() is None


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_upstream_at_its_own_publish_endpoint_is_refused(procs: ProcessGroup, tmp_path: Path,
                                                         kind: str) -> None:
    """The obvious cycle: a daemon told to forward into itself refuses to start."""
    if kind == "ipc":
        own = f"ipc://{tmp_path}/pub.sock"
        upstream = f"ipc://{tmp_path}/./pub.sock"
    else:
        port = _free_tcp_port()
        own, upstream = f"tcp://127.0.0.1:{port}", f"tcp://localhost:{port}"
    proc = procs.start(trainbus_cmd("daemon", "--publish", own, "--subscribe", "tcp://127.0.0.1:*",
                                    "--snapshot", "tcp://127.0.0.1:*", "--upstream", upstream))
    assert proc.wait(15) != 0
    assert "cycle" in proc.stderr.text() and "own publish endpoint" in proc.stderr.text(), \
        proc.stderr.text()


def test_upstream_beyond_loopback_needs_curve(procs: ProcessGroup) -> None:
    proc = procs.start(trainbus_cmd("daemon", "--publish", "tcp://127.0.0.1:*", "--subscribe",
                                    "tcp://127.0.0.1:*", "--snapshot", "tcp://127.0.0.1:*",
                                    "--upstream", "tcp://192.0.2.1:7751"))
    assert proc.wait(15) != 0
    assert "--upstream-curve" in proc.stderr.text(), proc.stderr.text()


# --------------------------------------------------------------------- network namespaces


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@dataclass
class Cluster:
    """Four network namespaces — node A, node B, the hub and an observer — each joined to
    the hub's by a veth pair: A 10.77.1.2 <-> hub 10.77.1.1, B 10.77.2.2 <-> 10.77.2.1,
    observer 10.77.3.2 <-> 10.77.3.1. Processes started with :meth:`start` run inside one
    and are killed (process group) before the namespaces are deleted."""

    names: dict[str, str]
    procs: ProcessGroup = field(default_factory=ProcessGroup)

    HUB_ADDRESS = {"a": "10.77.1.1", "b": "10.77.2.1", "observer": "10.77.3.1"}

    def start(self, where: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        return self.procs.start(["ip", "netns", "exec", self.names[where], *trainbus_cmd(*args)],
                                env=env)

    def daemon(self, where: str, *args: str) -> DaemonHandle:
        proc = self.start(where, "daemon", *args)
        match = proc.stdout.wait_for_line(r"ready publish=(\S+) subscribe=(\S+) snapshot=(\S+)", 15)
        return DaemonHandle(proc, match.group(1), match.group(2), match.group(3))


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    tag = secrets.token_hex(3)  # unique per run: interface names stay within 15 characters
    names = {role: f"tb{tag}{role[0]}" for role in ("a", "b", "hub", "observer")}
    created: list[str] = []
    cluster = Cluster(names)
    try:
        for name in names.values():
            result = _ip("netns", "add", name)
            if result.returncode != 0:
                pytest.skip(f"this machine refuses network namespaces: ip netns add: "
                            f"{result.stderr.strip()}")
            created.append(name)
            _check(_ip("-n", name, "link", "set", "lo", "up"))
        for index, role in enumerate(("a", "b", "observer"), start=1):
            near, far = f"tb{tag}{role[0]}0", f"tb{tag}{role[0]}1"
            result = _ip("link", "add", near, "type", "veth", "peer", "name", far)
            if result.returncode != 0:
                pytest.skip(f"this machine refuses veth pairs: {result.stderr.strip()}")
            _check(_ip("link", "set", near, "netns", names[role]))
            _check(_ip("link", "set", far, "netns", names["hub"]))
            _check(_ip("-n", names[role], "addr", "add", f"10.77.{index}.2/24", "dev", near))
            _check(_ip("-n", names["hub"], "addr", "add", f"10.77.{index}.1/24", "dev", far))
            _check(_ip("-n", names[role], "link", "set", near, "up"))
            _check(_ip("-n", names["hub"], "link", "set", far, "up"))
        yield cluster
    finally:
        cluster.procs.cleanup()
        for name in created:  # deleting a namespace deletes its end of each veth pair
            _ip("netns", "del", name)
        leftover = set(_ip("netns", "list").stdout.split()) & set(created)
        assert not leftover, f"namespaces left behind: {leftover}"


def _check(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}: {result.stderr}"


class JsonLines:
    """The events a `trainbus tail --json` process printed, parsed as they come."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.proc.stdout.snapshot():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def updates(self, run: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events()
                if e.get("type") == "ppo_update" and (run is None or e["run"] == run)]

    def last_seq(self, run: str, worker: int) -> int:
        seqs = [e["seq"] for e in self.updates(run) if e["worker"] == worker]
        return max(seqs, default=-1)


def seq_gaps(events: list[dict[str, Any]]) -> int:
    """Events missing between the first and last seq of every (session, type) stream."""
    seqs: dict[tuple[str, str], set[int]] = defaultdict(set)
    for event in events:
        seqs[event["session"], event["type"]].add(event["seq"])
    return sum(max(s) - min(s) + 1 - len(s) for s in seqs.values())


@pytest.mark.timeout(120)
def test_cluster_across_network_namespaces(cluster: Cluster, tmp_path: Path) -> None:
    """Workers on A and B -> their node daemons (loopback) -> hub (CURVE over veth) ->
    a monitor and tail in the observer's namespace; the hub killed and restarted on the
    same ports; a node with a key the hub does not know; a late joiner at the hub."""
    keys = tmp_path / "hub-keys"
    setup = ProcessGroup()
    try:
        keys_init(setup, keys)
        node_keys = {role: keys_client(setup, keys, f"node-{role}") for role in ("a", "b")}
        observer_keys = keys_client(setup, keys, "observer")
        # A node whose key the hub never authorized: its own pair, the hub's server.key.
        rogue = keys_init(setup, tmp_path / "rogue-keys")
        shutil.copy(keys / "server.key", rogue / "server.key")
    finally:
        setup.cleanup()

    hub_args = ("--curve", str(keys), "--stats-interval", "0.3")
    hub = cluster.daemon("hub", *hub_args, "--publish", "tcp://0.0.0.0:*",
                         "--subscribe", "tcp://0.0.0.0:*", "--snapshot", "tcp://0.0.0.0:*")
    port = {role: getattr(hub, role).rsplit(":", 1)[1] for role in ("publish", "subscribe", "snapshot")}
    local = ("--publish", "tcp://127.0.0.1:*", "--subscribe", "tcp://127.0.0.1:*",
             "--snapshot", "tcp://127.0.0.1:*", "--stats-interval", "0.3")

    def upstream(role: str) -> str:
        return f"tcp://{Cluster.HUB_ADDRESS[role]}:{port['publish']}"

    # Node A keeps only 20 events for an absent hub, so the outage below certainly costs
    # events at the hub's consumers; node B keeps the default.
    nodes = {
        "a": cluster.daemon("a", *local, "--upstream", upstream("a"),
                            "--upstream-curve", str(node_keys["a"]), "--upstream-hwm", "20"),
        "b": cluster.daemon("b", *local, "--upstream", upstream("b"),
                            "--upstream-curve", str(node_keys["b"])),
    }
    rogue_node = cluster.daemon("b", *local, "--upstream", upstream("b"), "--upstream-curve",
                                str(rogue))
    for node in nodes.values():
        node.proc.stderr.wait_for_line(r"upstream \S+: connected", 15)
    rogue_node.proc.stderr.wait_for_line(r"refused this node's CURVE key", 15)

    observer_env = {"TRAINBUS_SUBSCRIBE": f"tcp://{Cluster.HUB_ADDRESS['observer']}:{port['subscribe']}",
                    "TRAINBUS_SNAPSHOT": f"tcp://{Cluster.HUB_ADDRESS['observer']}:{port['snapshot']}",
                    "TRAINBUS_CURVE_CLIENT": str(observer_keys)}
    watch = JsonLines(cluster.start("observer", "tail", "--json", "--type", "all",
                                    env=observer_env))
    watch.proc.stderr.wait_for_line(r"connected to", 15)
    # Node A's own consumer, on A's loopback: it must not notice the hub's outage.
    local_a = JsonLines(cluster.start("a", "tail", "--json", env=nodes["a"].env))
    local_a.proc.stderr.wait_for_line(r"connected to", 15)

    # One run across two nodes: workers 0-1 on A, 2-3 on B (a torchrun job's ranks).
    workers = [
        cluster.start("a", "publish", "--run", "job", "--workers", "2", "--rate", "40",
                      env=nodes["a"].env),
        cluster.start("b", "publish", "--run", "job", "--workers", "2", "--worker-offset", "2",
                      "--rate", "40", env=nodes["b"].env),
        cluster.start("b", "publish", "--run", "rogue", "--rate", "40", env=rogue_node.env),
    ]

    def observed(run: str) -> set[int]:
        return {e["worker"] for e in watch.updates(run)}

    wait_for(lambda: observed("job") == {0, 1, 2, 3}, 20, message="all four workers at the hub")
    monitor = cluster.start("observer", "monitor", "--once", "--wait", "1.5", "--width", "160",
                            env=observer_env)
    assert monitor.wait(30) == 0, monitor.stderr.text()
    frame = monitor.stdout.text()
    assert "job" in frame and "4/4 live" in frame, frame
    assert "rogue" not in frame, frame

    # The hub counted the rogue node's refused key (its bus_stats reach the observer).
    wait_for(lambda: any(e.get("type") == "bus_stats" and e.get("auth_denied", 0) >= 1
                         for e in watch.events()), 15, message="the hub to count a refused key")

    # ---- the hub goes away: nodes carry on locally, then reconnect by themselves.
    os.killpg(hub.proc.popen.pid, signal.SIGKILL)
    hub.proc.wait(10)
    at_kill = local_a.last_seq("job", 0)
    # Node A's local consumer keeps receiving while the hub is down: wait until worker 0
    # has sent well over the 20 events node A keeps for the hub.
    wait_for(lambda: local_a.last_seq("job", 0) >= at_kill + 60, 20,
             message="node A's local consumer to keep receiving while the hub is down")
    hub = cluster.daemon("hub", *hub_args, "--publish", f"tcp://0.0.0.0:{port['publish']}",
                         "--subscribe", f"tcp://0.0.0.0:{port['subscribe']}",
                         "--snapshot", f"tcp://0.0.0.0:{port['snapshot']}")
    for node in nodes.values():
        node.proc.stderr.wait_for_line(r"upstream \S+: reconnected", 15)
    # Sent after the restart (the namespaces share one clock): each worker's events are
    # through both hops again, more than the hub caches per stream.
    restarted_at = time.time()

    def since_restart() -> dict[int, int]:
        counts: dict[int, int] = defaultdict(int)
        for event in watch.updates("job"):
            if event["ts"] > restarted_at:
                counts[event["worker"]] += 1
        return counts

    wait_for(lambda: len(since_restart()) == 4 and min(since_restart().values()) >= 12, 20,
             message="all four workers at the observer again after the hub's restart")
    for proc in workers:
        proc.signal(signal.SIGTERM)
    for proc in workers:
        assert proc.wait(15) == 0, proc.stderr.text()
    watch.proc.signal(signal.SIGTERM)
    assert watch.proc.wait(15) == 0, watch.proc.stderr.text()

    events = watch.events()
    assert not [e for e in events if e.get("run") == "rogue"], "a node with a wrong key forwarded"
    stats_runs = {e["session"] for e in events if e["type"] == "bus_stats"}
    assert len(stats_runs) == 2, f"bus_stats sessions: the hub's, before and after its restart: {stats_runs}"
    lost = seq_gaps(events)
    assert lost > 0, "the outage lost nothing at the observer, so the test proved nothing"
    # ...and the observer's own accounting counted exactly that loss.
    watch.proc.stderr.wait_for_line(rf"trainbus tail: {lost} event\(s\) lost upstream \(seq gaps\)", 5)
    assert local_a.proc.popen.poll() is None
    assert seq_gaps(local_a.events()) == 0, "node A's local consumer lost events"

    # ---- a late joiner at the (restarted) hub gets the whole cluster's recent history.
    late = JsonLines(cluster.start("observer", "tail", "--history", "--json", "--timeout", "3",
                                   env=observer_env))
    late.proc.wait(20)
    history = late.updates("job")
    assert {e["worker"] for e in history} == {0, 1, 2, 3}, late.proc.stderr.text()
    for worker in range(4):
        seqs = [e["seq"] for e in history if e["worker"] == worker]
        seen = sorted(e["seq"] for e in watch.updates("job") if e["worker"] == worker)
        assert seqs == seen[-10:], (worker, seqs, seen[-10:])
