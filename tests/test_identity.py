"""Emitter identity from arguments or the launcher's environment (emitter/identity.py),
sanitised run names, heartbeats' node, and a real torchrun job of two ranks."""

from __future__ import annotations

import logging
import re
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from bus import protocol
from consumers.runtime import Subscriber
from emitter import identity
from emitter.identity import RunNameWarning, resolve_identity, sanitize_run_name
from emitter.telemetry import TelemetryEmitter
from tests.conftest import ppo_fields, wait_for

GENERATED = re.compile(r"run-\d{8}-\d{6}-[0-9a-f]{4}")
LAUNCHER_VARS = ("RANK", "TRAINBUS_RUN", "TORCHELASTIC_RUN_ID", "GROUP_RANK", "NODE_RANK")


@pytest.fixture(autouse=True)
def clean_launcher_env(monkeypatch):
    """Tests start as a plain process would: no launcher variables, no generated name yet."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(identity, "_generated", None)


@pytest.fixture
def no_warnings():
    """Inside it, any warning fails the test (a valid name must pass silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------------------ env combinations


def test_plain_process_is_worker_0_of_a_generated_run_logged_once(caplog, no_warnings):
    caplog.set_level(logging.WARNING, logger="emitter.identity")
    first = resolve_identity(env={})
    second = resolve_identity(env={})
    assert GENERATED.fullmatch(first.run) and protocol.RUN_PATTERN.fullmatch(first.run)
    assert (first.worker, first.node, first.run_source, first.worker_source) == \
        (0, None, "generated", "default")
    assert second.run == first.run  # one name per process, so its emitters agree
    logged = [r.getMessage() for r in caplog.records if first.run in r.getMessage()]
    assert len(logged) == 1 and "TRAINBUS_RUN" in logged[0]


def test_torchrun_env_gives_rank_shared_run_id_and_node(no_warnings):
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "GROUP_RANK": "2",
           "TORCHELASTIC_RUN_ID": "3f2a9c1e-77aa-4b1c-9d7e-0a1b2c3d4e5f"}
    who = resolve_identity(env=env)
    assert (who.run, who.worker, who.node) == ("3f2a9c1e-77aa-4b1c-9d7e-0a1b2c3d4e5f", 5, 2)
    assert (who.run_source, who.worker_source) == ("TORCHELASTIC_RUN_ID", "RANK")


def test_ray_train_env_gives_rank_and_node_rank(no_warnings):
    who = resolve_identity(env={"RANK": "3", "LOCAL_RANK": "0", "WORLD_SIZE": "4",
                                "NODE_RANK": "1", "TRAINBUS_RUN": "ray-job"})
    assert (who.run, who.worker, who.node) == ("ray-job", 3, 1)


def test_trainbus_run_wins_over_torchelastic_run_id(no_warnings):
    who = resolve_identity(env={"TRAINBUS_RUN": "mine", "TORCHELASTIC_RUN_ID": "abc"})
    assert (who.run, who.run_source) == ("mine", "TRAINBUS_RUN")


def test_empty_trainbus_run_counts_as_unset(no_warnings):
    assert resolve_identity(env={"TRAINBUS_RUN": "", "TORCHELASTIC_RUN_ID": "abc"}).run == "abc"


def test_group_rank_wins_over_node_rank(no_warnings):
    assert resolve_identity(env={"GROUP_RANK": "0", "NODE_RANK": "7"}).node == 0


def test_explicit_arguments_win_over_the_environment(no_warnings):
    env = {"RANK": "5", "TRAINBUS_RUN": "from-env", "TORCHELASTIC_RUN_ID": "x", "GROUP_RANK": "1"}
    who = resolve_identity("given", 2, env=env)
    assert (who.run, who.worker, who.node) == ("given", 2, 1)
    assert (who.run_source, who.worker_source) == ("argument", "argument")
    # worker=0 is an argument, not "unset".
    assert resolve_identity("given", 0, env=env).worker == 0


@pytest.mark.parametrize("rank", ["abc", "-1", "", "1.5", "٣"])
def test_a_rank_that_is_not_a_non_negative_int_is_a_clear_error(rank):
    with pytest.raises(ValueError, match=r"RANK=.*not a non-negative integer.*worker=N"):
        resolve_identity("r", env={"RANK": rank})


@pytest.mark.parametrize("worker", [-1, True, "3", 1.0])
def test_an_explicit_bad_worker_is_still_a_protocol_error(worker):
    with pytest.raises(protocol.ProtocolError, match="worker"):
        resolve_identity("r", worker, env={})


def test_a_bad_node_rank_only_drops_the_node(caplog, no_warnings):
    caplog.set_level(logging.WARNING, logger="emitter.identity")
    who = resolve_identity("r", env={"RANK": "1", "GROUP_RANK": "node-a"})
    assert (who.worker, who.node) == (1, None)
    assert any("GROUP_RANK" in r.getMessage() for r in caplog.records)


def test_torchruns_default_run_id_is_used_with_a_warning():
    with pytest.warns(RunNameWarning, match="rdzv-id") as caught:
        who = resolve_identity(env={"TORCHELASTIC_RUN_ID": "none", "RANK": "0"})
    assert who.run == "none" and len(caught) == 1


# ------------------------------------------------------------------ sanitising


@pytest.mark.parametrize("name, expected", [
    ("ALE/Breakout-v5", "ALE-Breakout-v5"),
    ("my run: lr=3e-4", "my-run--lr-3e-4"),
    ("CartPole-v1 ü", "CartPole-v1--"),
    ("x" * 100, "x" * 64),
    ("a/" * 40, ("a-" * 40)[:64]),
])
def test_names_are_sanitised_into_the_alphabet_with_one_warning(name, expected):
    with pytest.warns(RunNameWarning) as caught:
        fixed = sanitize_run_name(name)
    assert fixed == expected and protocol.RUN_PATTERN.fullmatch(fixed)
    assert len(caught) == 1 and repr(expected) in str(caught[0].message)


def test_an_empty_name_becomes_the_generated_one():
    with pytest.warns(RunNameWarning) as caught:
        fixed = sanitize_run_name("")
    assert GENERATED.fullmatch(fixed) and fixed == identity.generated_run_name()
    assert len(caught) == 1


@pytest.mark.parametrize("name", ["cartpole-3f2a", "a", "A.b_c-9", "x" * 64])
def test_valid_names_pass_unchanged_and_silently(name, no_warnings):
    assert sanitize_run_name(name) == name


def test_env_run_names_are_sanitised_too():
    with pytest.warns(RunNameWarning, match="TRAINBUS_RUN") as caught:
        who = resolve_identity(env={"TRAINBUS_RUN": "ALE/Pong-v5"})
    assert who.run == "ALE-Pong-v5" and len(caught) == 1


def test_a_non_string_run_is_a_type_error():
    with pytest.raises(TypeError, match="str"):
        resolve_identity(42, 0, env={})  # type: ignore[arg-type]


# ------------------------------------------------------------------ the emitter


def test_emitter_sanitises_its_run_and_warns_at_the_callers_line(tmp_path):
    with pytest.warns(RunNameWarning) as caught:
        emitter = TelemetryEmitter("ALE/Breakout-v5", 0, f"ipc://{tmp_path}/x",
                                   heartbeat_interval=None)
    emitter.close()
    assert emitter.run == "ALE-Breakout-v5"
    assert len(caught) == 1 and Path(caught[0].filename).resolve() == Path(__file__).resolve()


def test_emitter_with_no_arguments_and_a_bad_rank_fails_at_construction(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "worker-3")
    with pytest.raises(ValueError, match="RANK"):
        TelemetryEmitter(publish=f"ipc://{tmp_path}/x")


def _ready(daemon, **kwargs) -> Subscriber:
    sub = Subscriber(daemon.subscribe, daemon.snapshot, **kwargs)
    wait_for(lambda: sub.poll(20) is not None and sub.stats.snapshots >= 1, 10,
             message="subscriber connected")
    return sub


def test_emitter_from_the_environment_over_a_real_daemon(daemon, monkeypatch):
    """No run/worker arguments: RANK, TRAINBUS_RUN (sanitised) and NODE_RANK set the
    topics and the heartbeat's node, as a consumer sees them."""
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("TRAINBUS_RUN", "ALE/Pong-v5")
    with _ready(daemon, types=["ppo_update", "heartbeat"], run="ALE-Pong-v5") as sub:
        with pytest.warns(RunNameWarning):
            emitter = TelemetryEmitter(publish=daemon.publish, heartbeat_interval=0.05)
        try:
            assert emitter.wait_for_bus(10)
            emitter.emit_ppo_update(**ppo_fields(1))
            got: list[protocol.Event] = []
            wait_for(lambda: got.extend(sub.poll(50)) or
                     {e.type for e in got} >= {"ppo_update", "heartbeat"}, 10,
                     message="an update and a heartbeat")
        finally:
            emitter.close()
    assert {(e.run, e.worker) for e in got} == {("ALE-Pong-v5", 2)}
    beats = [e for e in got if e.type == protocol.HEARTBEAT]
    assert all(e.get("node") == 1 for e in beats)


def test_heartbeats_carry_no_node_without_a_launcher(daemon):
    with _ready(daemon, types=["heartbeat"], run="plain") as sub, \
            TelemetryEmitter("plain", 0, daemon.publish, heartbeat_interval=0.05):
        got: list[protocol.Event] = []
        wait_for(lambda: got.extend(sub.poll(50)) or got, 10, message="a heartbeat")
    assert "node" not in got[0].fields and got[0].get("host")


# ------------------------------------------------------------------ real torchrun

TORCHRUN_SCRIPT = textwrap.dedent("""
    import os
    import torch.distributed as dist
    from emitter.telemetry import TelemetryEmitter

    dist.init_process_group("gloo")  # what a DDP script does first
    fields = dict(env_steps=0, grad_norm=0.5, pre_clip_grad_norm=0.7, max_grad_norm=0.5,
                  policy_loss=0.0, value_loss=1.0, entropy=0.69, approx_kl=0.01,
                  clip_fraction=0.1, lr=3e-4)
    with TelemetryEmitter() as emitter:  # no arguments: identity from torchrun's env
        assert emitter.wait_for_bus(20), "daemon not reachable"
        for update in (1, 2):
            emitter.emit_ppo_update(update=update, **fields)
        # One write() per line: both ranks share torchrun's stdout pipe, and print() writes
        # the text and its newline separately (seen: two lines run together into one).
        os.write(1, (f"rank={os.environ['RANK']} worker={emitter.worker} run={emitter.run} "
                     f"run_id={os.environ['TORCHELASTIC_RUN_ID']}\\n").encode())
        dist.barrier()  # both ranks have emitted before either closes
    dist.destroy_process_group()
""")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("trainbus_run", ["", "ddp-job"], ids=["run-id", "TRAINBUS_RUN"])
def test_torchrun_two_ranks_arrive_as_workers_0_and_1_of_one_run(procs, daemon, tmp_path,
                                                                 trainbus_run):
    """torchrun --standalone --nproc-per-node 2 (gloo, CPU, its own free rendezvous port on
    loopback): ranks 0 and 1 publish with TelemetryEmitter() and a consumer sees workers 0
    and 1 of one run, torchrun's shared run id (or TRAINBUS_RUN when set), node 0."""
    script = tmp_path / "ddp_emit.py"
    script.write_text(TORCHRUN_SCRIPT)
    run_filter = trainbus_run or None
    with _ready(daemon, types=["ppo_update", "heartbeat"]) as sub:
        job = procs.start([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script)],
                          env={**daemon.env, "TRAINBUS_RUN": trainbus_run})
        got: list[protocol.Event] = []

        def both_closed() -> bool:
            got.extend(sub.poll(50))
            closing = {e.worker for e in got if e.type == protocol.HEARTBEAT and e.get("closing")}
            return closing == {0, 1} or job.popen.poll() not in (None, 0)

        wait_for(both_closed, 75, message="both ranks' closing heartbeats")
        assert job.wait(30) == 0, job.stderr.text()[-3000:]
    lines = [line for line in job.stdout.snapshot() if line.startswith("rank=")]
    assert len(lines) == 2, job.stdout.text()
    run_ids = {re.search(r"run_id=(\S+)", line).group(1) for line in lines}
    assert len(run_ids) == 1  # torchrun gave both ranks the same id
    expected_run = run_filter or run_ids.pop()
    updates = [e for e in got if e.type == protocol.PPO_UPDATE]
    assert {e.run for e in got} == {expected_run}
    assert sorted((e.worker, e.get("update")) for e in updates) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert {e.get("node") for e in got if e.type == protocol.HEARTBEAT} == {0}  # GROUP_RANK
    assert {f"rank={w} worker={w}" for w in (0, 1)} == {" ".join(line.split()[:2]) for line in lines}
