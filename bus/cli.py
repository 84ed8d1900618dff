"""The one ``trainbus`` command.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their command runs, so ``trainbus
tail`` on a laptop never imports torch, and ``bus/`` stays free of emitter/consumer imports
at module level (the registry names them as strings).

Misuse prints one line, ``trainbus <cmd>: error: <reason>``, and exits 2; runtime failures
that a user can fix (a bad endpoint, a missing key file) print one line and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
from collections.abc import Sequence

from bus import endpoints

COMMANDS: dict[str, tuple[str, str]] = {
    "daemon": ("bus.daemon", "run the bus daemon: XSUB publish side, XPUB subscribe side, snapshot port"),
    "publish": ("bus.synthetic", "publish synthetic ppo_update events (demos, smoke tests, no torch)"),
    "keys": ("bus.keys", "create CURVE key pairs for remote use"),
    "demo": ("bus.demo", "daemon + training workers + aggregator + alerting + monitor on loopback"),
    "replay": ("bus.replay", "republish a recording into the bus, keeping relative timing"),
    "train": ("emitter.train", "run reference vectorized PPO workers (CartPole) publishing telemetry"),
    "tail": ("consumers.tail", "print events as they arrive (rich lines or strict JSON)"),
    "monitor": ("consumers.monitor", "live console: sparklines, trends, health, alerts"),
    "aggregate": ("consumers.aggregate", "per-run rollups across workers, published as ppo_summary"),
    "alert": ("consumers.alerting.process", "Prometheus-style alerting on gradient and PPO health"),
    "record": ("consumers.record", "append every event to a crash-safe recording"),
    "prometheus": ("consumers.prometheus_exporter", "serve /metrics for Prometheus scrapes"),
    "web": ("consumers.web", "live view in a browser: pushed (SSE), loopback by default"),
}


class UsageError(Exception):
    """Raised by a command for misuse found after parsing; printed as one line, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports misuse in a single line (plus where to look), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------ argument types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def run_name(text: str) -> str:
    from bus.protocol import RUN_PATTERN

    if not RUN_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"run names match [A-Za-z0-9._-]{{1,64}}, got {text!r}")
    return text


def worker_id(text: str) -> int | str:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"worker is an integer >= 0 or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"worker is an integer >= 0 or 'all', got {text!r}")
    return value


# ------------------------------------------------------------------ shared flag groups


def add_publisher_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of every process that publishes into the daemon."""
    parser.add_argument("--publish", metavar="EP",
                        help=f"daemon publish side (env {endpoints.ENV_PUBLISH}, default {endpoints.DEFAULT_PUBLISH})")
    _add_curve_client(parser)


def _add_curve_client(parser: argparse.ArgumentParser) -> None:
    """--curve-client once, whether a process publishes, subscribes or both."""
    if "--curve-client" in parser._option_string_actions:
        return
    parser.add_argument("--curve-client", metavar="DIR",
                        help=f"directory with client.key_secret and server.key (env {endpoints.ENV_CURVE_CLIENT})")


def add_subscriber_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of every consumer process."""
    parser.add_argument("--subscribe", metavar="EP",
                        help=f"daemon subscribe side (env {endpoints.ENV_SUBSCRIBE}, default {endpoints.DEFAULT_SUBSCRIBE})")
    parser.add_argument("--snapshot", metavar="EP",
                        help=f"daemon snapshot port for late joiners (env {endpoints.ENV_SNAPSHOT}, default {endpoints.DEFAULT_SNAPSHOT})")
    _add_curve_client(parser)


def build_parser(command: str | None = None) -> OneLineParser:
    parser = OneLineParser(prog="trainbus", description="A ZeroMQ telemetry bus for PPO training.")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module_name, help_text) in COMMANDS.items():
        cmd_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(cmd_parser)
    return parser


def _command_from_argv(argv: Sequence[str]) -> str | None:
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg == "--log-level":
            skip_next = True
            continue
        if arg.startswith("-"):
            continue
        return arg if arg in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_from_argv(argv)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s trainbus {args.command} %(levelname)s %(message)s")
    module = importlib.import_module(COMMANDS[args.command][0])
    prog = f"trainbus {args.command}"
    try:
        return int(module.run(args) or 0)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (endpoints.EndpointError, FileNotFoundError, PermissionError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy, so that exception classes
    # raised by subcommands (which import bus.cli) are the ones caught here.
    from bus.cli import main as _main

    sys.exit(_main())
