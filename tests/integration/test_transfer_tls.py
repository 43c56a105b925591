"""The KV transfer under mutual TLS: real sockets, real handshakes, real tensors, certificates
written by ``pdmesh.security.certs.write_certs``.

A worker pulls bit-exact over ``tcp`` and through the TLS control channels of ``shm`` and ``device``
(gloo); everyone else is refused with a message saying why: a certificate from another CA, a
plaintext puller, a non-worker identity (the coordinator's certificate), and a TLS puller against a
plaintext server. The servers run in this process (threads), which keeps the module fast.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import torch

from pdmesh.kv.transfer import secure
from pdmesh.kv.transfer.base import allocate_pool, make_transfer_client, make_transfer_server
from pdmesh.kv.transfer.errors import TransferError
from pdmesh.kv.types import KVHandle, KVLayout
from pdmesh.security.certs import CertPaths, write_certs
from pdmesh.security.tls import TlsFiles

pytestmark = pytest.mark.timeout(60)

NUM_BLOCKS = 24
LAYOUT = KVLayout("tiny", "mha", 2, 2, 8, 16, "float32", (2, 2, 16, 2, 8))
SRC_IDS = [5, 6, 7, 20, 3]
DST_IDS = [10, 2, 11, 12, 0]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertPaths:
    return write_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> CertPaths:
    return write_certs(tmp_path_factory.mktemp("other-ca"))


def files(paths: CertPaths, identity: str = "worker", ca: Path | None = None) -> TlsFiles:
    return TlsFiles(ca=str(ca or paths.ca), cert=str(paths.cert(identity)), key=str(paths.key(identity)))


def seeded() -> torch.Tensor:
    return torch.randn((NUM_BLOCKS, *LAYOUT.block_shape), generator=torch.Generator().manual_seed(3))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


class Serving:
    """A started server of ``backend`` over the seeded pool, exposing ``h`` as ``SRC_IDS``."""

    def __init__(self, backend: str, tls: TlsFiles | None) -> None:
        # kept: a shm segment lives as long as its pool tensor
        self.pool = allocate_pool(backend, NUM_BLOCKS, LAYOUT, name=f"tls-{uuid.uuid4().hex[:12]}")
        self.pool.copy_(seeded())
        server_ctx = secure.contexts(tls)[0]
        self.server = make_transfer_server(backend, self.pool, LAYOUT, "127.0.0.1", 0, server_ctx)
        self.server.start()
        self.server.expose("h", SRC_IDS)
        self.handle = KVHandle("h", "h", "p0", self.server.endpoint, SRC_IDS, 16, LAYOUT, time.time() + 60)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def serve():
    started: list[Serving] = []

    def start(backend: str, tls: TlsFiles | None) -> Serving:
        started.append(Serving(backend, tls))
        return started[-1]

    try:
        yield start
    finally:
        for serving in started:
            serving.stop()


def puller(backend: str, tls: TlsFiles | None):
    pool = torch.zeros((NUM_BLOCKS, *LAYOUT.block_shape))
    return pool, make_transfer_client(backend, pool, LAYOUT, secure.contexts(tls)[1])


@pytest.mark.parametrize("backend", ["tcp", "shm", "device"])
def test_worker_pulls_bit_exact_over_tls(certs, serve, backend: str) -> None:
    serving = serve(backend, files(certs))
    pool, client = puller(backend, files(certs))
    try:
        for _ in range(2):  # the second pull reuses the TLS connection, mapping or pair
            pool.zero_()
            client.pull(serving.handle, DST_IDS, timeout_s=30)
            assert torch.equal(bits(pool[DST_IDS]), bits(seeded()[SRC_IDS]))
            assert torch.count_nonzero(pool[[b for b in range(NUM_BLOCKS) if b not in DST_IDS]]) == 0
    finally:
        getattr(client, "close", lambda: None)()


def test_certificate_from_another_ca_is_refused_by_the_server(certs, other_ca, serve) -> None:
    serving = serve("tcp", files(certs))
    # trusts the server's CA, but presents a worker certificate the server's CA never signed
    pool, client = puller("tcp", files(other_ca, ca=certs.ca))
    with pytest.raises(TransferError, match="does not trust this worker's certificate"):
        client.pull(serving.handle, DST_IDS, timeout_s=30)
    assert torch.count_nonzero(pool) == 0


def test_server_from_another_ca_is_not_trusted_by_the_puller(certs, other_ca, serve) -> None:
    serving = serve("tcp", files(other_ca))
    _, client = puller("tcp", files(certs))
    with pytest.raises(TransferError, match="certificate is not trusted here"):
        client.pull(serving.handle, DST_IDS, timeout_s=30)


@pytest.mark.parametrize("backend", ["tcp", "shm", "device"])
def test_plaintext_puller_is_refused(certs, serve, backend: str) -> None:
    serving = serve(backend, files(certs))
    pool, client = puller(backend, None)
    with pytest.raises(TransferError, match="requires mutual TLS"):
        client.pull(serving.handle, DST_IDS, timeout_s=30)
    assert torch.count_nonzero(pool) == 0


@pytest.mark.parametrize("identity", ["coordinator", "admin"])
def test_non_worker_identity_is_refused(certs, serve, identity: str) -> None:
    serving = serve("tcp", files(certs))
    pool, client = puller("tcp", files(certs, identity))
    with pytest.raises(TransferError, match=f"identity '{identity}' may not pull KV; only 'worker' may"):
        client.pull(serving.handle, DST_IDS, timeout_s=30)
    assert torch.count_nonzero(pool) == 0


@pytest.mark.parametrize("backend", ["tcp", "shm"])
def test_tls_puller_against_a_plaintext_server_fails_with_the_reason(certs, serve, backend: str) -> None:
    serving = serve(backend, None)
    _, client = puller(backend, files(certs))
    with pytest.raises(TransferError, match="may run without TLS"):
        client.pull(serving.handle, DST_IDS, timeout_s=30)


def test_bench_reports_plain_and_tls(capsys) -> None:
    from pdmesh.bench.transfer import main

    assert main(["--backend", "tcp", "--mib", "2", "--reps", "2", "--tls", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert result["gbytes_per_s"] > 0 and result["tls"]["gbytes_per_s"] > 0
    assert result["tls"]["ratio_to_plain"] > 0
    assert set(result["cpu"]["flags"]) >= {"avx2", "avx512f", "amx_tile"}
