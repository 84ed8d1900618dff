"""CURVE for remote use: only clients whose public key is in ``authorized/`` get in.

Why real processes: the guarantee spans the key files written by ``trainbus keys``, the
daemon's ZAP authenticator thread and every client command's ``--curve-client``. A client
with no key, with the wrong server key, or with a key not in ``authorized/`` must neither
read anything (live or snapshot) nor publish anything; an authorized one works both ways,
and a key dropped into ``authorized/`` while the daemon runs is admitted.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from bus import protocol
from bus.publisher import EventPublisher
from consumers.runtime import Subscriber
from tests.conftest import ProcessGroup, ppo_fields, start_daemon, trainbus_cmd, wait_for


def keys_init(procs: ProcessGroup, directory: Path) -> Path:
    """``trainbus keys init DIR`` through the real CLI."""
    proc = procs.start(trainbus_cmd("keys", "init", str(directory)))
    assert proc.wait(timeout=20) == 0, proc.stderr.text()
    return directory


def client_dir(target: Path, client_from: Path, server_from: Path) -> Path:
    """A client key directory as a user would assemble it on a laptop."""
    target.mkdir(parents=True)
    shutil.copy(client_from / "client.key", target / "client.key")
    shutil.copy(client_from / "client.key_secret", target / "client.key_secret")
    shutil.copy(server_from / "server.key", target / "server.key")
    return target


@pytest.fixture
def keys(procs: ProcessGroup, tmp_path: Path) -> Path:
    return keys_init(procs, tmp_path / "keys")


def curve_daemon(procs: ProcessGroup, keys: Path, *extra: str, **endpoints: str):
    return start_daemon(procs, "--curve", str(keys), "--stats-interval", "0.2", *extra, **endpoints)


class StatsWatch:
    """An authorized bus_stats Subscriber, to see the daemon's counters."""

    def __init__(self, daemon, keys: Path) -> None:
        self.sub = Subscriber(daemon.subscribe, daemon.snapshot, curve_client=str(keys),
                              types=["bus_stats"], use_snapshot=False)
        self.latest: dict[str, Any] = {}
        self.ticks = 0

    def pump(self) -> dict[str, Any]:
        for event in self.sub.poll(20):
            self.latest = event.fields
            self.ticks += 1
        return self.latest

    def wait(self, predicate, timeout: float = 10, message: str = "bus_stats") -> dict[str, Any]:
        wait_for(lambda: predicate(self.pump()) if self.pump() else False, timeout, interval=0,
                 message=message)
        return self.latest

    def close(self) -> None:
        self.sub.close()


def test_keys_init_and_client_layout(procs: ProcessGroup, tmp_path: Path) -> None:
    """The key files a user copies around: secrets private, public keys authorized."""
    keys = keys_init(procs, tmp_path / "k")
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret"):
        assert (keys / name).is_file()
    for secret in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE(os.stat(keys / secret).st_mode) == 0o600
    assert (keys / "authorized" / "client.key").read_bytes() == (keys / "client.key").read_bytes()
    again = procs.start(trainbus_cmd("keys", "init", str(keys)))
    assert again.wait(timeout=20) == 2 and "--force" in again.stderr.text()
    laptop = procs.start(trainbus_cmd("keys", "client", str(keys), "laptop"))
    assert laptop.wait(timeout=20) == 0, laptop.stderr.text()
    assert sorted(p.name for p in (keys / "clients" / "laptop").iterdir()) == [
        "client.key", "client.key_secret", "server.key"]
    assert (keys / "authorized" / "laptop.key").is_file()


def test_only_authorized_clients_read_or_publish(procs: ProcessGroup, keys: Path,
                                                 tmp_path: Path) -> None:
    other = keys_init(procs, tmp_path / "other")
    bad_clients: dict[str, str | None] = {
        "no-key": None,
        "wrong-server-key": str(client_dir(tmp_path / "wrong-server", keys, other)),
        "unlisted-client-key": str(client_dir(tmp_path / "unlisted", other, keys)),
    }
    daemon = curve_daemon(procs, keys)
    watch = StatsWatch(daemon, keys)
    subs: dict[str, Subscriber] = {}
    pubs: dict[str, EventPublisher] = {}
    try:
        for name, key_dir in bad_clients.items():
            subs[name] = Subscriber(daemon.subscribe, daemon.snapshot, curve_client=key_dir,
                                    types=None)
            pubs[name] = EventPublisher(daemon.publish, key_dir)
        good_sub = Subscriber(daemon.subscribe, daemon.snapshot, curve_client=str(keys))
        subs["authorized"] = good_sub
        good_pub = EventPublisher(daemon.publish, str(keys))
        pubs["authorized"] = good_pub
        assert good_pub.wait_for_bus(10)
        wait_for(lambda: good_sub.poll(20) is not None and good_sub.stats.snapshots >= 1, 10,
                 interval=0, message="authorized subscriber connected")
        # Intruders try to publish; none of them ever sees the daemon's subscription.
        for name in bad_clients:
            assert not pubs[name].wait_for_bus(0.3), f"{name} publisher was admitted"
            for seq in range(5):
                pubs[name].publish(protocol.PPO_UPDATE, f"intruder-{name}", 0, ppo_fields(seq))
        for seq in range(20):
            good_pub.publish(protocol.PPO_UPDATE, "legit", 0, ppo_fields(seq))

        got: dict[str, list] = {name: [] for name in subs}

        def pump_all() -> bool:
            for name, sub in subs.items():
                got[name].extend(sub.poll(10))
            return sum(1 for e in got["authorized"] if e.run == "legit") >= 20

        wait_for(pump_all, 10, interval=0, message="authorized events")
        # The intruders had the same time (and a few ticks of bus_stats) to receive anything.
        stats = watch.wait(lambda f: f.get("auth_denied", 0) >= 1 and watch.ticks >= 3)
        pump_all()
        tail = procs.start(trainbus_cmd("tail", "--subscribe", daemon.subscribe, "--snapshot",
                                        daemon.snapshot, "--curve-client", str(keys), "--history",
                                        "--json", "--count", "10", "--timeout", "15"))
        assert tail.wait(timeout=20) == 0, tail.stderr.text()
        snapshots = {name: _raw_snapshot(daemon.snapshot, key_dir)
                     for name, key_dir in bad_clients.items()}
        # An answer must come: its wait is a bound, not the 0.7 s an intruder is given.
        snapshots["authorized"] = _raw_snapshot(daemon.snapshot, str(keys), timeout_ms=10_000)
    finally:
        watch.close()
        for sub in subs.values():
            sub.close()
        for pub in pubs.values():
            pub.close()

    assert [e.get("update") for e in got["authorized"] if e.run == "legit"] == list(range(20))
    assert not [e for e in got["authorized"] if e.run.startswith("intruder")]
    for name in bad_clients:
        assert got[name] == [], f"{name} received events"
        assert not subs[name].ever_connected, f"{name} completed a handshake"
        assert snapshots[name] is None, f"{name} got a snapshot reply"
    assert snapshots["authorized"] is not None and snapshots["authorized"][0] == b"SNAPSHOT"
    assert [json.loads(x)["update"] for x in tail.stdout.snapshot()] == list(range(10, 20))
    assert stats["auth_denied"] >= 1  # the unlisted key reached ZAP and was refused
    assert "Traceback" not in daemon.proc.stderr.text()


def _raw_snapshot(endpoint: str, key_dir: str | None, timeout_ms: int = 700) -> list[bytes] | None:
    """A snapshot request with the given keys; None when no reply comes."""
    from bus import transport

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        if key_dir:
            transport.apply_curve_client(sock, key_dir)
        sock.connect(endpoint)
        sock.send_multipart([b"SNAPSHOT"])
        return sock.recv_multipart() if sock.poll(timeout_ms) else None
    finally:
        sock.close(linger=0)


def test_keys_dropped_into_authorized_are_admitted_and_removed_ones_refused(
        procs: ProcessGroup, keys: Path, tmp_path: Path) -> None:
    """A stray non-key ``*.key`` file does not lock anyone out; a key copied in while the
    daemon runs is admitted — even when the copy lands in two steps (empty file first,
    content a few ticks later); a removed key is refused to new connections."""
    (keys / "authorized" / "junk.key").write_text("not a certificate\n")
    late_keys = tmp_path / "late-src"
    late_keys.mkdir()
    public, _ = zmq.auth.create_certificates(str(late_keys), "client")
    late = client_dir(tmp_path / "late", late_keys, keys)
    daemon = curve_daemon(procs, keys)
    watch = StatsWatch(daemon, keys)  # works despite junk.key
    try:
        watch.wait(lambda f: True, message="authorized client admitted despite junk.key")
        late_sub = Subscriber(daemon.subscribe, daemon.snapshot, curve_client=str(late),
                              types=["bus_stats"])
        try:
            denied = watch.pump().get("auth_denied", 0)
            watch.wait(lambda f: f.get("auth_denied", 0) > denied, message="late key denied")
            assert late_sub.poll(10) == [] and not late_sub.ever_connected
            # The copy lands in two steps, several daemon ticks apart.
            target = keys / "authorized" / "late.key"
            target.touch()
            ticks = watch.ticks
            watch.wait(lambda f: watch.ticks >= ticks + 3, message="ticks after the empty file")
            target.write_bytes(Path(public).read_bytes())
            got: list = []
            started = time.monotonic()
            wait_for(lambda: got.extend(late_sub.poll(50)) or got, 10, interval=0,
                     message="late key admitted")
            admitted_after = time.monotonic() - started
        finally:
            late_sub.close()
        # Revocation: a new connection with the removed key is refused.
        target.unlink()
        ticks = watch.ticks
        watch.wait(lambda f: watch.ticks >= ticks + 3, message="ticks after removal")
        denied = watch.pump().get("auth_denied", 0)
        with Subscriber(daemon.subscribe, daemon.snapshot, curve_client=str(late),
                        types=["bus_stats"]) as again:
            watch.wait(lambda f: f.get("auth_denied", 0) > denied, message="removed key denied")
            assert again.poll(10) == [] and not again.ever_connected
    finally:
        watch.close()
    print(f"curve: key dropped into authorized/ admitted {admitted_after:.2f} s after its "
          f"content was written (stats interval 0.2 s)")


def test_non_loopback_bind_needs_curve_or_insecure(procs: ProcessGroup, keys: Path) -> None:
    anywhere = "tcp://0.0.0.0:*"
    refused = procs.start(trainbus_cmd("daemon", "--publish", anywhere, "--subscribe",
                                       "tcp://127.0.0.1:*", "--snapshot", "tcp://127.0.0.1:*"))
    assert refused.wait(timeout=15) == 1
    err = refused.stderr.text().strip()
    assert "refusing to bind tcp://0.0.0.0:*" in err and "--curve" in err and "--insecure" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err

    insecure = start_daemon(procs, "--insecure", subscribe=anywhere)
    insecure.proc.stderr.wait_for_line(r"WARNING INSECURE: binding tcp://0\.0\.0\.0:\* without CURVE", 5)
    insecure.proc.signal(15)
    assert insecure.proc.wait(timeout=5) == 0

    secure = curve_daemon(procs, keys, publish=anywhere, subscribe=anywhere)
    assert "INSECURE" not in secure.proc.stderr.text()
    port = secure.subscribe.rsplit(":", 1)[1]
    with Subscriber(f"tcp://127.0.0.1:{port}", secure.snapshot, curve_client=str(keys),
                    types=["bus_stats"]) as sub:
        got: list = []
        wait_for(lambda: got.extend(sub.poll(50)) or got, 10, interval=0,
                 message="authorized client over the non-loopback bind")


def test_client_with_missing_key_files_fails_in_one_line(procs: ProcessGroup, daemon,
                                                         tmp_path: Path) -> None:
    tail = procs.start(trainbus_cmd("tail", "--subscribe", daemon.subscribe, "--curve-client",
                                    str(tmp_path / "nowhere"), "--timeout", "2"))
    assert tail.wait(timeout=15) == 1
    err = tail.stderr.text().strip()
    assert "CURVE key file not found" in err and "trainbus keys init" in err
    assert len(err.splitlines()) == 1
