"""A bare ``zmq.proxy(XSUB, XPUB)`` process: the baseline of the daemon CPU row.

``python -m bench.bare_proxy`` binds both ends on ephemeral loopback ports with the
daemon's queue bounds, subscribes to everything (as the daemon does, so publishers send
the same traffic to both) and prints the daemon's ready line, so the bench drives it
exactly like ``trainbus daemon``. No cache, no checks, no stats: libzmq's floor.
"""

from __future__ import annotations

import signal
import sys

import zmq

from bus.daemon import XPUB_SNDHWM, XSUB_RCVHWM


def main() -> int:
    ctx = zmq.Context.instance()
    xsub = ctx.socket(zmq.XSUB)
    xpub = ctx.socket(zmq.XPUB)
    for sock in (xsub, xpub):
        sock.linger = 0
    xsub.rcvhwm = XSUB_RCVHWM
    xpub.sndhwm = XPUB_SNDHWM
    xsub.bind("tcp://127.0.0.1:*")
    xpub.bind("tcp://127.0.0.1:*")
    xsub.send(b"\x01")
    # SIGTERM ends the process (default action); the proxy itself never returns.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(f"bare proxy ready publish={xsub.getsockopt_string(zmq.LAST_ENDPOINT)} "
          f"subscribe={xpub.getsockopt_string(zmq.LAST_ENDPOINT)} snapshot=none", flush=True)
    zmq.proxy(xsub, xpub)
    return 0


if __name__ == "__main__":
    sys.exit(main())
