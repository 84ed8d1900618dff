"""Honest layering: bus/ names the emitter/ and consumers/ command modules only by strings
(bus.cli.COMMANDS, so a console-only install never imports torch and bus/ stays the
package the other two build on). Strings do not break when a module is renamed; these
tests do: every registered command imports and has its entry points, its ``--help`` works
as a real subprocess, bus/ imports neither package at module level, and the demo refuses
to start without one of its components instead of quietly running without it.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys

import pytest

from bus import cli, demo
from tests.conftest import EPHEMERAL, REPO, trainbus_cmd


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_registered_command_module_imports_with_its_entry_points(command):
    module = importlib.import_module(cli.COMMANDS[command][0])
    assert callable(getattr(module, "add_arguments", None)), f"{module.__name__}.add_arguments"
    assert callable(getattr(module, "run", None)), f"{module.__name__}.run"


def test_help_of_every_command_works_from_the_real_cli(procs):
    """All at once (each is a fresh interpreter; one by one they take ~10 s on 2 cores)."""
    started = {command: procs.start(trainbus_cmd(command, "--help")) for command in cli.COMMANDS}
    for command, proc in started.items():
        assert proc.wait(60) == 0, f"trainbus {command} --help:\n{proc.stderr.text()}"
        assert f"usage: trainbus {command}" in proc.stdout.text(), proc.stdout.text()
    # Every command the demo may start is a registered one.
    assert set(demo.demo_commands("auto")) <= set(cli.COMMANDS)


def test_bus_never_imports_emitter_or_consumers_at_module_level():
    offenders = []
    for path in sorted((REPO / "bus").glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.name}: {name}" for name in names
                          if name.split(".")[0] in ("emitter", "consumers")]
    assert not offenders


def test_missing_components_names_each_missing_module(monkeypatch):
    assert demo.missing_components(demo.demo_commands("auto")) == []
    monkeypatch.setitem(cli.COMMANDS, "aggregate", ("consumers.renamed_aggregate", "x"))
    monkeypatch.setitem(cli.COMMANDS, "alert", ("consumers.gone.process", "x"))
    assert demo.missing_components(demo.demo_commands("publish")) == [
        "aggregate (consumers.renamed_aggregate)", "alert (consumers.gone.process)"]
    monkeypatch.delitem(cli.COMMANDS, "monitor")
    assert demo.missing_components(["monitor"]) == ["monitor (<not registered>)"]


def test_demo_fails_loudly_when_a_component_module_is_missing(procs, tmp_path):
    """A real `trainbus demo` whose registry names a module that does not exist (as after
    a rename): exit 1, one line naming it, and nothing started."""
    script = ("import sys; from bus import cli; "
              "cli.COMMANDS['aggregate'] = ('consumers.renamed_aggregate', 'x'); "
              "sys.exit(cli.main(sys.argv[1:]))")
    log_dir = tmp_path / "logs"
    proc = procs.start([sys.executable, "-c", script, "demo", "--publish", EPHEMERAL,
                        "--subscribe", EPHEMERAL, "--snapshot", EPHEMERAL, "--duration", "5",
                        "--source", "publish", "--log-dir", str(log_dir)])
    try:
        assert proc.wait(30) == 1, proc.stderr.text()
    except subprocess.TimeoutExpired:
        pytest.fail(f"the demo ran on without its aggregator:\n{proc.stderr.text()}")
    lines = [line for line in proc.stderr.snapshot() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("trainbus demo: error: component module missing: "
                               "aggregate (consumers.renamed_aggregate)"), lines
    assert not log_dir.exists()  # nothing was started
