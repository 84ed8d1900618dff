"""``trainbus demo``: the whole bus on one machine, with the monitor in the foreground.

Starts, as subprocesses::

    trainbus daemon     on the default loopback endpoints (tcp://127.0.0.1:7751-7753, or
                        TRAINBUS_* / the demo's own flags); if they are taken, on
                        OS-chosen ports instead, with a note
    trainbus train      --workers N  (or `trainbus publish --workers N --rate 20` without torch)
    trainbus aggregate  ppo_summary rollups, shown as the monitor's fleet row
    trainbus alert      notifications to a file in the log directory
    trainbus web        the same view in a browser, on http://127.0.0.1:8750/ (or, when
                        that port is taken, an OS-chosen one); its URL is printed
    trainbus monitor    in the foreground, on this terminal

Why the default endpoints: a newcomer runs ``make demo`` in one terminal and then plain
``trainbus tail`` or ``trainbus train --inject-nan-at 20`` in another, and those must land
on the demo's bus without any set-up. The aggregator, alerting process and monitor watch
every run on the bus, so such an extra run shows up at once. When another daemon already
holds the default ports the demo still runs, on ephemeral ports, and prints the
``TRAINBUS_*`` line to attach with.

Why a log directory: every child's stderr (and the alert notifications) go to files in
``--log-dir`` (default a fresh temp directory, printed at start and at exit), so nothing
but the monitor writes to the terminal.

Stopping, with no orphan: each child runs in its own session (its own process group, and
no controlling terminal, so Ctrl-C reaches only this process, which then stops the
children in reverse start order: monitor first so its final frame is printed, the daemon
last so no consumer sees the bus vanish). Each gets SIGTERM; whatever is still alive after
``STOP_GRACE_S`` gets SIGKILL, and every group is swept with SIGKILL once its leader has
exited (catching e.g. a training worker whose parent died). On Linux the children also get
SIGTERM from the kernel if this process dies without cleaning up (PR_SET_PDEATHSIG). The
demo ends on Ctrl-C/SIGTERM/SIGHUP, when its terminal hangs up (checked, as a signal may
never come: see the main loop), after ``--duration`` seconds, or when the monitor or the
daemon exits. The supervision itself is :mod:`bus.supervise`, shared with ``trainbus train``.

Missing parts fail loudly: the demo starts each component as ``trainbus <command>``, whose
module bus/ names only as a string (bus.cli.COMMANDS), so before starting anything it
checks that every such module exists and otherwise exits 1 with one line naming it, rather
than running on without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bus import endpoints, supervise
from bus.lifecycle import install_stop_handlers

log = logging.getLogger("trainbus.demo")

LOOPBACK_EPHEMERAL = "tcp://127.0.0.1:*"
#: SIGTERM → SIGKILL grace per shutdown (training workers finish their update first).
STOP_GRACE_S = 8.0
DAEMON_READY_TIMEOUT_S = 15.0
#: A `trainbus train` that exits this soon with an error is taken as "cannot train here".
TRAIN_STARTUP_S = 20.0
PUBLISH_RATE_HZ = 20.0
_READY = re.compile(r"ready publish=(\S+) subscribe=(\S+) snapshot=(\S+)")
_WEB_READY = re.compile(r"serving (http://\S+)")
WEB_READY_TIMEOUT_S = 15.0


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None
    files: list[IO[bytes]]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


class Supervisor:
    """Starts children in their own process groups and stops every one of them."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.env = dict(os.environ if env is None else env)
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], *, stdout_to_log: bool = True,
              stdout_path: Path | None = None) -> Child:
        """Start ``trainbus <argv>``; stderr (and stdout unless told otherwise) to
        ``<log_dir>/<name>.log``; ``stdout_path`` sends stdout to its own file."""
        log_path = self.log_dir / f"{name}.log"
        err = open(log_path, "ab")  # noqa: SIM115 (closed when the child is reaped)
        files: list[IO[bytes]] = [err]
        stdout: IO[bytes] | None = None
        if stdout_path is not None:
            stdout = open(stdout_path, "ab")  # noqa: SIM115
            files.append(stdout)
        elif stdout_to_log:
            stdout = err
        popen = subprocess.Popen(
            [sys.executable, "-m", "bus.cli", *argv], stdin=subprocess.DEVNULL, stdout=stdout,
            stderr=err, env=self.env, start_new_session=True,
            preexec_fn=supervise.set_parent_death_signal if sys.platform.startswith("linux") else None)
        child = Child(name, popen, log_path, files)
        self.children.append(child)
        print(f"trainbus demo: started {name} (pid {popen.pid}), log {log_path}", file=sys.stderr, flush=True)
        return child

    def stop_all(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop children in reverse start order (monitor first, daemon last, so consumers
        never see the bus vanish under them): SIGTERM, wait within one shared grace period
        (at least a second each), then SIGKILL whatever is left; then empty every child's
        process group (anything a child left behind in it) and reap all."""
        supervise.stop_all([supervise.PopenChild(c.name, c.popen) for c in reversed(self.children)],
                           grace_s, in_order=True, min_wait_s=1.0)
        for child in self.children:
            for f in child.files:
                f.close()
        left = supervise.kill_groups([c.pid for c in self.children])
        if left:
            names = {c.pid: c.name for c in self.children}
            log.error("process group(s) still present after SIGKILL: %s",
                      ", ".join(f"{names[pgid]} ({pgid})" for pgid in left))


def _wait_ready(child: Child, out_path: Path, stop: object, timeout: float) -> dict[str, str] | None:
    """The daemon's endpoints from its ready line, or None if it died or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():  # type: ignore[attr-defined]
        try:
            match = _READY.search(out_path.read_text(errors="replace"))
        except FileNotFoundError:
            match = None
        if match:
            return {"publish": match.group(1), "subscribe": match.group(2), "snapshot": match.group(3)}
        if not child.alive():
            return None
        stop.wait(0.05)  # type: ignore[attr-defined]
    return None


def _can_train() -> tuple[bool, str]:
    """Whether `trainbus train` can run here: torch importable (a console-only install has
    no torch, and then the synthetic publisher stands in, with a note)."""
    try:
        import torch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"import torch failed ({type(exc).__name__}: {exc})"
    return True, ""


def demo_commands(source: str) -> list[str]:
    """The trainbus commands the demo may start for ``--source`` (train may fall back to
    publish at any time, so both are needed unless publish was asked for)."""
    producers = ["publish"] if source == "publish" else ["train", "publish"]
    return ["daemon", *producers, "aggregate", "alert", "web", "monitor"]


def missing_components(commands: list[str]) -> list[str]:
    """Each command whose module (from the CLI registry, by name: bus/ imports no
    emitter/consumers module) cannot be found, as ``"<command> (<module>)"``.

    Why check before starting anything: every child is ``trainbus <command>`` in its own
    process, so a renamed or missing module would only show as one child dying into its log
    file while the demo ran on without it, looking healthy.
    """
    from bus.cli import COMMANDS

    missing = []
    for command in commands:
        module = COMMANDS.get(command, ("<not registered>", ""))[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing, or a bad name
            found = False
        if not found:
            missing.append(f"{command} ({module})")
    return missing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bus.cli import nonneg_float, positive_float, positive_int, run_name

    parser.add_argument("--publish", metavar="EP", help="daemon publish side (default: as trainbus daemon)")
    parser.add_argument("--subscribe", metavar="EP", help="daemon subscribe side (default: as trainbus daemon)")
    parser.add_argument("--snapshot", metavar="EP", help="daemon snapshot port (default: as trainbus daemon)")
    parser.add_argument("--workers", type=positive_int, default=2, metavar="N",
                        help="training workers (default 2)")
    parser.add_argument("--envs", type=positive_int, default=None, metavar="M",
                        help="CartPole environments per worker (passed to trainbus train)")
    parser.add_argument("--duration", type=nonneg_float, default=0.0, metavar="S",
                        help="stop everything after S seconds (default 0: until Ctrl-C)")
    parser.add_argument("--run", type=run_name, default=None, help="run name (default demo-<4 hex>)")
    parser.add_argument("--source", choices=("auto", "train", "publish"), default="auto",
                        help="auto: trainbus train if torch imports, else the synthetic publisher")
    parser.add_argument("--pattern", default="healthy",
                        help="with the synthetic publisher: healthy|rising|explode|nan (default healthy)")
    parser.add_argument("--train-args", default="", metavar="ARGS",
                        help="extra arguments for trainbus train, e.g. \"--max-grad-norm inf --explode-at 5\"")
    parser.add_argument("--refresh", type=positive_float, default=4.0, metavar="HZ",
                        help="monitor redraws per second (default 4)")
    parser.add_argument("--web-port", type=int, default=8750, metavar="PORT",
                        help="port of the web view (default 8750; taken: an OS-chosen one)")
    parser.add_argument("--log-dir", metavar="DIR", default=None,
                        help="where the children's logs go (default: a new temp directory)")


def run(args: argparse.Namespace) -> int:
    missing = missing_components(demo_commands(args.source))
    if missing:
        print(f"trainbus demo: error: component module missing: {', '.join(missing)} "
              "(a broken install or a renamed module; reinstall with pip install -e .)",
              file=sys.stderr)
        return 1
    stop = install_stop_handlers()
    supervise.become_subreaper()
    if args.log_dir:
        log_dir = Path(args.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
    else:
        log_dir = Path(tempfile.mkdtemp(prefix="trainbus-demo-"))
    run_id = args.run or f"demo-{secrets.token_hex(2)}"
    env = {k: v for k, v in os.environ.items()
           if k not in (endpoints.ENV_PUBLISH, endpoints.ENV_SUBSCRIBE, endpoints.ENV_SNAPSHOT)}
    env.setdefault("PYTHONUNBUFFERED", "1")
    sup = Supervisor(log_dir, env)
    print(f"trainbus demo: logs in {log_dir}", file=sys.stderr, flush=True)
    status = 0
    try:
        wanted = [endpoints.resolve(role, getattr(args, role, None))
                  for role in ("publish", "subscribe", "snapshot")]
        eps = None
        for attempt, bind in enumerate((wanted, [LOOPBACK_EPHEMERAL] * 3)):
            daemon_out = log_dir / f"daemon{attempt or ''}.out"
            daemon = sup.start("daemon", ["daemon", "--publish", bind[0], "--subscribe", bind[1],
                                          "--snapshot", bind[2], "--stats-interval", "2"],
                               stdout_path=daemon_out)
            eps = _wait_ready(daemon, daemon_out, stop, DAEMON_READY_TIMEOUT_S)
            if eps is not None or stop.is_set() or attempt:
                break
            print(f"trainbus demo: note: cannot bind {' '.join(wanted)} (another daemon?); "
                  "using OS-chosen loopback ports instead", file=sys.stderr, flush=True)
        if eps is None:
            if stop.is_set():
                return 0
            print(f"trainbus demo: error: the daemon did not start; see {daemon.log_path}", file=sys.stderr)
            return 1
        sup.env.update({endpoints.ENV_PUBLISH: eps["publish"], endpoints.ENV_SUBSCRIBE: eps["subscribe"],
                        endpoints.ENV_SNAPSHOT: eps["snapshot"]})
        print(f"trainbus demo: bus publish={eps['publish']} subscribe={eps['subscribe']} "
              f"snapshot={eps['snapshot']}  (attach: TRAINBUS_SUBSCRIBE={eps['subscribe']} "
              f"TRAINBUS_SNAPSHOT={eps['snapshot']} trainbus tail)", file=sys.stderr, flush=True)

        use_train = args.source == "train"
        if args.source == "auto":
            use_train, why = _can_train()
            if not use_train:
                print(f"trainbus demo: note: {why}; using the synthetic publisher "
                      "(trainbus publish) instead of PPO workers", file=sys.stderr, flush=True)
        producer = _start_producer(sup, args, run_id, use_train)
        producer_started = time.monotonic()
        sup.start("aggregate", ["aggregate"])
        sup.start("alert", ["alert", "--log", str(log_dir / "alerts.jsonl")])
        _start_web(sup, log_dir, stop, args.web_port)
        monitor = sup.start("monitor", ["monitor", "--refresh", f"{args.refresh:g}"],
                            stdout_to_log=False)

        deadline = time.monotonic() + args.duration if args.duration else None
        terminal = _terminal_fd()
        while not stop.is_set():
            if not monitor.alive():
                break
            if terminal is not None and not os.isatty(terminal):
                # The terminal hung up (window closed, tmux kill-session) and no SIGHUP
                # reached us: under `make demo`, make is the session leader the kernel
                # signals, and make waits for its children instead of passing it on.
                break
            if not daemon.alive():
                print(f"trainbus demo: the daemon exited; see {daemon.log_path}", file=sys.stderr)
                status = 1
                break
            if use_train and not producer.alive() and producer.popen.returncode != 0 \
                    and time.monotonic() - producer_started < TRAIN_STARTUP_S:
                # Training could not start here after all: keep the demo alive with the
                # synthetic publisher, and say so.
                print(f"trainbus demo: note: trainbus train exited ({producer.popen.returncode}); "
                      f"see {producer.log_path}; switching to the synthetic publisher",
                      file=sys.stderr, flush=True)
                use_train = False
                producer = _start_producer(sup, args, run_id, use_train=False)
            wait_s = 0.1
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                wait_s = min(wait_s, remaining)
            stop.wait(wait_s)
    finally:
        sup.stop_all()
        try:
            print(f"trainbus demo: stopped {len(sup.children)} process(es); logs in {log_dir}",
                  file=sys.stderr, flush=True)
        except OSError:  # the terminal is gone (EIO): nobody to tell
            pass
    return status


def _terminal_fd() -> int | None:
    """The terminal the demo was started on (stdout, else stderr), or None without one.

    A hung-up terminal answers isatty() with False (its ioctls fail with EIO), which the
    main loop checks: closing the window then stops the demo even where no SIGHUP
    arrives."""
    for fd in (1, 2):
        if os.isatty(fd):
            return fd
    return None


def _start_web(sup: Supervisor, log_dir: Path, stop: object, port: int) -> Child | None:
    """``trainbus web`` on ``port`` (or, when that is taken, on an OS-chosen one); prints
    its URL. A web view that cannot start is a note, not the end of the demo."""
    for attempt, try_port in enumerate(dict.fromkeys((port, 0))):
        out_path = log_dir / f"web{attempt or ''}.out"
        child = sup.start("web", ["web", "--port", str(try_port)], stdout_path=out_path)
        deadline = time.monotonic() + WEB_READY_TIMEOUT_S
        while time.monotonic() < deadline and not stop.is_set():  # type: ignore[attr-defined]
            try:
                match = _WEB_READY.search(out_path.read_text(errors="replace"))
            except FileNotFoundError:
                match = None
            if match:
                print(f"trainbus demo: web view at {match.group(1)}", file=sys.stderr, flush=True)
                return child
            if not child.alive():
                break
            stop.wait(0.05)  # type: ignore[attr-defined]
        if stop.is_set():  # type: ignore[attr-defined]
            return None
    print(f"trainbus demo: note: the web view did not start; see {log_dir / 'web.log'}",
          file=sys.stderr, flush=True)
    return None


def _start_producer(sup: Supervisor, args: argparse.Namespace, run_id: str, use_train: bool) -> Child:
    if use_train:
        argv = ["train", "--workers", str(args.workers), "--run", run_id]
        if args.envs is not None:
            argv += ["--envs", str(args.envs)]
        argv += shlex.split(args.train_args)
        return sup.start("train", argv)
    return sup.start("publish", ["publish", "--workers", str(args.workers), "--rate",
                                 f"{PUBLISH_RATE_HZ:g}", "--run", run_id, "--pattern", args.pattern])
