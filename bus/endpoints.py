"""Endpoints and their resolution: flag, then environment, then the loopback default.

Loopback is the default so that nothing is exposed by accident; binding anywhere else
needs CURVE (``--curve``) or an explicit, loudly logged ``--insecure``.
"""

from __future__ import annotations

import ipaddress
import os
import socket

DEFAULT_PUBLISH = "tcp://127.0.0.1:7751"
DEFAULT_SUBSCRIBE = "tcp://127.0.0.1:7752"
DEFAULT_SNAPSHOT = "tcp://127.0.0.1:7753"

ENV_PUBLISH = "TRAINBUS_PUBLISH"
ENV_SUBSCRIBE = "TRAINBUS_SUBSCRIBE"
ENV_SNAPSHOT = "TRAINBUS_SNAPSHOT"
ENV_CURVE_CLIENT = "TRAINBUS_CURVE_CLIENT"

_DEFAULTS = {
    "publish": (ENV_PUBLISH, DEFAULT_PUBLISH),
    "subscribe": (ENV_SUBSCRIBE, DEFAULT_SUBSCRIBE),
    "snapshot": (ENV_SNAPSHOT, DEFAULT_SNAPSHOT),
}


class EndpointError(ValueError):
    """A bad or forbidden endpoint; the message is one line, fit for a CLI error."""


def resolve(role: str, flag_value: str | None = None) -> str:
    """The endpoint for ``role`` ("publish", "subscribe", "snapshot")."""
    env_name, default = _DEFAULTS[role]
    endpoint = flag_value or os.environ.get(env_name) or default
    check_syntax(endpoint)
    return endpoint


def resolve_curve_client(flag_value: str | None = None) -> str | None:
    """Directory of client keys from ``--curve-client`` or TRAINBUS_CURVE_CLIENT."""
    return flag_value or os.environ.get(ENV_CURVE_CLIENT) or None


def check_syntax(endpoint: str) -> None:
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise EndpointError(f"bad endpoint {endpoint!r}: expected e.g. tcp://127.0.0.1:7751 or ipc:///tmp/x")
    transport = endpoint.split("://", 1)[0]
    if transport not in ("tcp", "ipc", "inproc"):
        raise EndpointError(f"bad endpoint {endpoint!r}: transport must be tcp, ipc or inproc")


def tcp_host(endpoint: str) -> str | None:
    """The host part of a tcp endpoint (brackets stripped), None for ipc/inproc."""
    if not endpoint.startswith("tcp://"):
        return None
    rest = endpoint[len("tcp://"):]
    if rest.startswith("["):
        return rest[1:rest.index("]")]
    host = rest.rsplit(":", 1)[0]
    # tcp://eth0;host:port style source binds: keep the part after ';'.
    return host.split(";")[-1]


def is_loopback(endpoint: str) -> bool:
    """True when binding ``endpoint`` exposes nothing beyond this machine."""
    host = tcp_host(endpoint)
    if host is None:
        return True  # ipc:// and inproc:// never leave the machine
    if host in ("localhost", "ip6-localhost"):
        return True
    if host in ("*", ""):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def check_bind_allowed(endpoint: str, *, curve: bool, insecure: bool) -> None:
    """Refuse a non-loopback bind without CURVE or ``--insecure`` (one-line reason)."""
    check_syntax(endpoint)
    if is_loopback(endpoint) or curve or insecure:
        return
    raise EndpointError(
        f"refusing to bind {endpoint}: not a loopback address; use --curve DIR to require "
        "keys, or --insecure to expose the bus unauthenticated")


def check_upstream(endpoint: str, *, curve: bool, insecure: bool) -> None:
    """Refuse an ``--upstream`` that cannot work or would send telemetry in clear text.

    Like binding: a hub beyond this machine needs CURVE (``--upstream-curve``) or an
    explicit ``--insecure``. It must name a host and port (connect, not bind)."""
    check_syntax(endpoint)
    if endpoint.startswith("inproc://"):
        raise EndpointError(f"--upstream {endpoint}: inproc:// never leaves this process; "
                            "give the hub's tcp:// (or ipc://) publish endpoint")
    host = tcp_host(endpoint)
    if host is not None:
        port = endpoint.rsplit(":", 1)[-1]
        if host in ("*", "", "0.0.0.0", "::") or not port.isdigit():
            raise EndpointError(f"--upstream {endpoint}: expected the hub's address and port, "
                                "e.g. tcp://hub:7751")
    if curve or insecure or is_loopback(endpoint):
        return
    raise EndpointError(
        f"refusing to forward to {endpoint} without CURVE: use --upstream-curve DIR (the hub's "
        "server.key and this node's client pair), or --insecure to send telemetry in clear text")


def _host_port(endpoint: str) -> tuple[str, str] | None:
    host = tcp_host(endpoint)
    if host is None:
        return None
    return host, endpoint.rsplit(":", 1)[-1]


def _is_local_address(address: str) -> bool:
    """True when ``address`` is assigned to this machine (a socket can be bound to it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def points_at(target: str, bound: str) -> bool:
    """Does connecting to ``target`` reach the socket bound at ``bound`` (a resolved
    endpoint, as ZeroMQ's LAST_ENDPOINT gives it)? Decides the obvious cases only: the
    same ipc path, or the same tcp port on an address of this machine that the bind
    covers (the same address, or any when it bound a wildcard). A name that does not
    resolve is not judged here (ZeroMQ keeps trying it)."""
    if target.split("://", 1)[0] != bound.split("://", 1)[0]:
        return False
    if target.startswith("ipc://"):
        return os.path.realpath(target[len("ipc://"):]) == os.path.realpath(bound[len("ipc://"):])
    if target.startswith("inproc://"):
        return target == bound
    target_hp, bound_hp = _host_port(target), _host_port(bound)
    if target_hp is None or bound_hp is None or target_hp[1] != bound_hp[1]:
        return False
    try:
        targets = {info[4][0] for info in socket.getaddrinfo(target_hp[0], None)}
    except (OSError, UnicodeError):
        return False
    bound_host = bound_hp[0]
    for address in targets:
        if not _is_local_address(address):
            continue
        if bound_host in ("0.0.0.0", "::", "*", ""):
            return True
        try:
            bound_ip = ipaddress.ip_address(bound_host)
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if ip == bound_ip:
            return True
    return False
