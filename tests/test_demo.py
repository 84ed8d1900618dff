"""`trainbus demo` end to end: everything starts, the monitor shows the run, and nothing
outlives the demo (each child's process group is gone afterwards)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading

import pytest

from tests.conftest import EPHEMERAL, trainbus_cmd, wait_for

# The demo binds the default ports unless told otherwise; tests never use fixed ports.
EPHEMERAL_BUS = ("--publish", EPHEMERAL, "--subscribe", EPHEMERAL, "--snapshot", EPHEMERAL)


def child_pids(stderr: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", stderr)}


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_no_orphans(demo_pid: int, pids: dict[str, int]) -> None:
    # Children run in their own sessions, so pid == pgid; the demo's own group too.
    for name, pid in {"demo": demo_pid, **pids}.items():
        assert group_gone(pid), f"process group of {name} (pid {pid}) still exists"


def test_demo_runs_for_its_duration_and_leaves_no_process(procs, tmp_path):
    demo = procs.start(trainbus_cmd("demo", *EPHEMERAL_BUS, "--workers", "2", "--duration", "4", "--source", "publish",
                                    "--run", "demo-test", "--log-dir", str(tmp_path)),
                       env={"COLUMNS": "100"})
    assert demo.wait(40) == 0, demo.stderr.text()
    stderr = demo.stderr.text()
    pids = child_pids(stderr)
    assert {"daemon", "publish", "aggregate", "web", "monitor"} <= set(pids), stderr
    assert_no_orphans(demo.popen.pid, pids)
    assert f"logs in {tmp_path}" in stderr
    assert re.search(r"web view at http://127\.0\.0\.1:\d+/", stderr), stderr
    # The monitor's final frame (stdout is not a terminal: Live prints the last frame).
    out = demo.stdout.text()
    assert "Σ demo-test" in out and "2/2 live" in out, out
    assert (tmp_path / "daemon.log").exists() and (tmp_path / "monitor.log").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "hangup"])
def test_demo_stops_everything_on_ctrl_c_or_hangup(procs, tmp_path, signum):
    """SIGINT to the group is what a terminal's Ctrl-C does; SIGHUP to the group what
    closing a terminal does to its foreground job. Either way the demo and each child stop,
    rather than the children living on."""
    demo = procs.start(trainbus_cmd("demo", *EPHEMERAL_BUS, "--workers", "1", "--source", "publish",
                                    "--log-dir", str(tmp_path)))
    demo.stderr.wait_for_line(r"started monitor \(pid \d+\)", 20)
    monitor_log = tmp_path / "monitor.log"
    wait_for(lambda: monitor_log.exists() and "connected to" in monitor_log.read_text(), 20,
             message="the monitor to connect")
    os.killpg(demo.popen.pid, signum)
    assert demo.wait(30) == 0, demo.stderr.text()
    pids = child_pids(demo.stderr.text())
    assert len(pids) >= 4
    assert_no_orphans(demo.popen.pid, pids)


def test_demo_with_training_workers(procs, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("emitter.train")
    demo = procs.start(trainbus_cmd("demo", *EPHEMERAL_BUS, "--workers", "1", "--envs", "2", "--source", "train",
                                    "--run", "demo-train", "--log-dir", str(tmp_path)),
                       env={"COLUMNS": "100"})
    demo.stderr.wait_for_line(r"started train \(pid \d+\)", 20)
    monitor_ok = tmp_path / "train.log"
    # Wait until a PPO worker has reported progress (first updates made), then stop.
    wait_for(lambda: monitor_ok.exists() and "update" in monitor_ok.read_text(), 30,
             message="the PPO worker to make updates")
    os.killpg(demo.popen.pid, signal.SIGINT)
    assert demo.wait(30) == 0, demo.stderr.text()
    pids = child_pids(demo.stderr.text())
    assert "train" in pids
    assert_no_orphans(demo.popen.pid, pids)
    assert "Σ demo-train" in demo.stdout.text()


def test_demo_falls_back_to_ephemeral_ports_when_its_endpoints_are_taken(procs, daemon, tmp_path):
    demo = procs.start(trainbus_cmd("demo", "--publish", daemon.publish, "--subscribe", daemon.subscribe,
                                    "--snapshot", daemon.snapshot, "--workers", "1", "--duration", "3",
                                    "--source", "publish", "--log-dir", str(tmp_path)),
                       env={"COLUMNS": "100"})
    assert demo.wait(40) == 0, demo.stderr.text()
    stderr = demo.stderr.text()
    assert "cannot bind" in stderr and "OS-chosen loopback ports" in stderr
    assert daemon.proc.popen.poll() is None  # the daemon already there is left alone


@pytest.mark.timeout(60)
def test_demo_stops_when_its_terminal_hangs_up_without_a_signal(tmp_path):
    """Under `make demo`, closing the terminal signals only make (the session leader), which
    waits for the demo instead of passing SIGHUP on: the demo must notice the hang-up itself.
    Here the demo runs on a pty that is not its controlling terminal (so no signal at all)
    and the pty's master is closed, as a terminal window does when it closes."""
    master, slave = os.openpty()
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="100")
    for name in ("TRAINBUS_PUBLISH", "TRAINBUS_SUBSCRIBE", "TRAINBUS_SNAPSHOT"):
        env.pop(name, None)
    popen = subprocess.Popen(
        trainbus_cmd("demo", *EPHEMERAL_BUS, "--workers", "1", "--source", "publish",
                     "--log-dir", str(tmp_path)),
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    seen = bytearray()

    def drain() -> None:  # the monitor draws to the pty: keep its buffer from filling
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        wait_for(lambda: b"started monitor" in seen, 30, message="the demo to start its monitor")
        wait_for(lambda: re.search(rb"\d+ live", seen), 30, message="the monitor to show the run")
        pids = child_pids(seen.decode(errors="replace"))
        os.close(master)  # the window closes
        master = -1
        assert popen.wait(timeout=30) == 0
        assert len(pids) >= 4
        assert_no_orphans(popen.pid, pids)
    finally:
        if master >= 0:
            os.close(master)
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(timeout=10)
