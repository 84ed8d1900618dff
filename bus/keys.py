"""``trainbus keys``: CURVE key pairs for using the bus across machines.

``keys init DIR`` writes the daemon's pair (``server.key`` / ``server.key_secret``), one
client pair (``client.key`` / ``client.key_secret``) and ``authorized/`` holding the public
keys the daemon admits (the generated client's to begin with; drop more ``*.key`` files in,
the daemon picks them up within one stats interval). ``keys client DIR NAME`` makes another
client pair and authorizes it.

Copy to a remote client machine: ``server.key`` plus that client's ``client.key`` and
``client.key_secret`` (renamed to those names), never ``server.key_secret``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import zmq.auth

from bus.cli import UsageError


def init_keys(directory: Path, force: bool = False) -> list[Path]:
    """Create the server pair, one client pair and authorized/ in ``directory``."""
    existing = [directory / name for name in ("server.key", "server.key_secret", "client.key",
                                              "client.key_secret") if (directory / name).exists()]
    if existing and not force:
        raise UsageError(f"{existing[0]} exists; pass --force to replace the keys in {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    zmq.auth.create_certificates(str(directory), "server")
    zmq.auth.create_certificates(str(directory), "client")
    authorized = directory / "authorized"
    authorized.mkdir(exist_ok=True)
    shutil.copyfile(directory / "client.key", authorized / "client.key")
    for secret in directory.glob("*.key_secret"):
        os.chmod(secret, 0o600)
    return [directory / "server.key", directory / "server.key_secret", directory / "client.key",
            directory / "client.key_secret", authorized / "client.key"]


def add_client(directory: Path, name: str) -> Path:
    """A further client pair in DIR/clients/NAME/ (with a copy of server.key), authorized."""
    if not (directory / "server.key").is_file() or not (directory / "authorized").is_dir():
        raise FileNotFoundError(f"no keys in {directory} (run: trainbus keys init {directory})")
    client_dir = directory / "clients" / name
    if client_dir.exists():
        raise UsageError(f"{client_dir} exists")
    client_dir.mkdir(parents=True)
    os.chmod(client_dir, 0o700)
    zmq.auth.create_certificates(str(client_dir), "client")
    os.chmod(client_dir / "client.key_secret", 0o600)
    shutil.copyfile(directory / "server.key", client_dir / "server.key")
    shutil.copyfile(client_dir / "client.key", directory / "authorized" / f"{name}.key")
    return client_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True,
                                parser_class=type(parser))
    init = sub.add_parser("init", help="create server and client key pairs in DIR")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--force", action="store_true", help="replace existing keys")
    client = sub.add_parser("client", help="create and authorize another client pair")
    client.add_argument("dir", metavar="DIR")
    client.add_argument("name", metavar="NAME")


def run(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if args.keys_command == "init":
        for path in init_keys(directory, args.force):
            print(path)
        print(f"daemon:  trainbus daemon --curve {directory} --publish tcp://0.0.0.0:7751 ...")
        print("clients: copy server.key, client.key, client.key_secret; then --curve-client DIR")
        return 0
    name = args.name
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"client name must be letters, digits, - or _, got {name!r}")
    client_dir = add_client(directory, name)
    print(client_dir)
    return 0
