"""Picking a TCP port for a server that another process binds a moment later.

A port found with ``bind(0)`` comes from the kernel's ephemeral range, the range every outgoing
connection on the machine also draws from: between our pick and the server's own bind, any
``connect()`` may take it (CI saw a worker fail to bind a port picked this way). So we pick below
that range, where only explicit binds land, and above the band (15000–17000 by default) where
Mooncake's transfer engine picks its RPC ports. We never hand the same port out twice in one
process, and each pick must bind when picked.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

_LOWEST = 20000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_MIN_SPAN = 1000  # fewer candidates than this and bind(0) is the better bet
_TRIES = 200

_lock = threading.Lock()
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (Linux's default when it cannot be read)."""
    try:
        low, high = _EPHEMERAL_RANGE.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _binds(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))  # no SO_REUSEADDR: a port still in TIME_WAIT counts as taken
        except OSError:
            return False
    return True


def _kernel_pick(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that binds now, that no outgoing connection will take, and that this
    process has not handed out before."""
    high = ephemeral_range()[0] - 1
    if high - _LOWEST < _MIN_SPAN:
        return _kernel_pick(host)
    with _lock:
        if len(_handed_out) > (high - _LOWEST) // 2:
            _handed_out.clear()  # a long-lived process: the oldest picks are long since bound or gone
        for _ in range(_TRIES):
            port = random.randint(_LOWEST, high)
            if port not in _handed_out and _binds(host, port):
                _handed_out.add(port)
                return port
    return _kernel_pick(host)
