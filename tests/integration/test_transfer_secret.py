"""Per-handle secrets on the KV transfer: a handle exposed with a secret is served only to a pull
that presents it, on every backend and with or without TLS; real sockets and tensors, servers in
this process (threads).

This is what guards a pull when the KV goes in clear (``kv_transfer_security: secret``): the
prefill worker draws the secret and publishes it only in the registry.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import pytest
import torch

from pdmesh.kv.transfer import secure
from pdmesh.kv.transfer.base import allocate_pool, make_transfer_client, make_transfer_server
from pdmesh.kv.transfer.errors import TransferError
from pdmesh.kv.types import KVHandle, KVLayout
from pdmesh.security.certs import write_certs
from pdmesh.security.tls import TlsFiles

pytestmark = pytest.mark.timeout(60)

NUM_BLOCKS = 16
LAYOUT = KVLayout("tiny", "mha", 2, 2, 8, 16, "float32", (2, 2, 16, 2, 8))
SRC_IDS, DST_IDS = [4, 5, 9], [1, 7, 8]
SECRET = "s3cret-from-the-registry"


def seeded() -> torch.Tensor:
    return torch.randn((NUM_BLOCKS, *LAYOUT.block_shape), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def serve():
    servers = []

    def start(backend: str, tls: TlsFiles | None = None) -> KVHandle:
        pool = allocate_pool(backend, NUM_BLOCKS, LAYOUT, name=f"secret-{uuid.uuid4().hex[:12]}")
        pool.copy_(seeded())
        server = make_transfer_server(backend, pool, LAYOUT, "127.0.0.1", 0, secure.contexts(tls)[0])
        server.start()
        servers.append((server, pool))  # a shm segment lives as long as its pool
        server.expose("h", SRC_IDS, SECRET)
        return KVHandle("h", "h", "p0", server.endpoint, SRC_IDS, 48, LAYOUT, time.time() + 60, secret=SECRET)

    try:
        yield start
    finally:
        for server, _ in servers:
            server.stop()


def pull(backend: str, handle: KVHandle, tls: TlsFiles | None = None) -> torch.Tensor:
    pool = torch.zeros((NUM_BLOCKS, *LAYOUT.block_shape))
    client = make_transfer_client(backend, pool, LAYOUT, secure.contexts(tls)[1])
    try:
        client.pull(handle, DST_IDS, timeout_s=30)
    finally:
        getattr(client, "close", lambda: None)()
    return pool


@pytest.mark.parametrize("backend", ["tcp", "shm", "device", "mooncake"])
def test_only_a_pull_presenting_the_secret_gets_the_blocks(serve, backend: str) -> None:
    handle = serve(backend)
    for secret, reason in (("", "presented no secret"), ("guessed", "wrong secret")):
        with pytest.raises(TransferError, match=reason):
            pull(backend, dataclasses.replace(handle, secret=secret))
    pool = pull(backend, handle)
    assert torch.equal(pool[DST_IDS].view(torch.int32), seeded()[SRC_IDS].view(torch.int32))


def test_the_secret_is_checked_under_tls_too(serve, tmp_path) -> None:
    paths = write_certs(tmp_path)
    worker = TlsFiles(ca=str(paths.ca), cert=str(paths.cert("worker")), key=str(paths.key("worker")))
    handle = serve("tcp", worker)
    with pytest.raises(TransferError, match="wrong secret"):
        pull("tcp", dataclasses.replace(handle, secret="guessed"), worker)
    assert torch.equal(pull("tcp", handle, worker)[DST_IDS], seeded()[SRC_IDS])


def test_the_secret_never_shows_in_a_handles_repr() -> None:
    handle = KVHandle("h", "r", "p0", "tcp://x:1", [1], 16, LAYOUT, 0.0, secret=SECRET)
    assert SECRET not in repr(handle) and handle.to_dict()["secret"] == SECRET
