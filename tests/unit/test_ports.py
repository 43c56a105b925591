"""The port picker hands out ports no outgoing connection can take, each once per process."""

from __future__ import annotations

import socket

import pytest

from pdmesh.ports import ephemeral_range, free_port

pytestmark = pytest.mark.timeout(30)


def test_ports_lie_below_the_kernels_own_range_and_bind():
    low, _ = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50  # never the same port twice in one process
    for port in ports:
        assert 20000 <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_bound_port_is_never_handed_out():
    taken = []
    try:
        for _ in range(20):
            sock = socket.socket()
            sock.bind(("127.0.0.1", free_port()))
            taken.append(sock)
        bound = {sock.getsockname()[1] for sock in taken}
        assert not bound & {free_port() for _ in range(200)}
    finally:
        for sock in taken:
            sock.close()
