"""Free TCP ports for processes this one is about to start (`fluxmesh up`, `demo`, tests).

The usual trick, bind port 0 and close, hands out a port from the kernel's *ephemeral* range:
the range every outgoing connection and every other bind-to-0 draws from. Between picking the
port and the child binding it (seconds, while it imports torch) the kernel may hand the same
port to someone else, and the child dies with "address already in use". So ports are drawn at
random from below the ephemeral range, where the kernel never hands ports out by itself, checked
by binding them, and never handed out twice by this process.
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Collection

_FALLBACK_EPHEMERAL_START = 32768  # Linux's default start of ip_local_port_range
_LOWEST = 10000  # stay clear of well-known and commonly configured service ports
_handed_out: set[int] = set()
_lock = threading.Lock()
_random = random.SystemRandom()  # not the global generator: a test that seeds it must not pin our ports


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_START


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host.strip("[]"), port))  # no SO_REUSEADDR: a port in TIME_WAIT counts as taken
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", *, besides: Collection[int] = ()) -> int:
    """A port on `host` that is free now and outside the kernel's ephemeral range where possible.

    `besides`: ports already promised to a process that has not bound them yet (`fluxmesh up
    --port P` draws its stages' ports before the orchestrator binds P), so free now but taken."""
    top = _ephemeral_start()
    with _lock:
        if top - _LOWEST >= 1000:
            for _ in range(200):
                port = _random.randrange(_LOWEST, top)
                if port not in _handed_out and port not in besides and _bindable(host, port):
                    _handed_out.add(port)
                    return port
        # An unusual port range (or a crowded one): let the kernel choose.
        while True:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
                sock.bind((host.strip("[]"), 0))
                port = sock.getsockname()[1]
            if port not in _handed_out and port not in besides:
                _handed_out.add(port)
                return port
