"""Mutual TLS on gRPC against a real controller process: real handshakes on loopback.

Refused: a plaintext client, a certificate from another CA, a revoked certificate; identities: only
``worker`` registers, only ``admin`` administers; certificates and CA rotate without a restart;
``pdmesh ctl`` with --tls-*; bad TLS files fail startup with one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.membership import InstanceInfoData, Role
from pdmesh.ports import free_port
from pdmesh.rpc.client import open_channel, wait_healthy
from pdmesh.rpc.convert_cluster import instance_to_proto
from pdmesh.security import tls
from pdmesh.security.certs import IDENTITIES, revoke, write_certs
from pdmesh.v1 import controller_pb2, controller_pb2_grpc

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]


def files(pki: Path, identity: str, crl: bool = False) -> tls.TlsFiles:
    return tls.TlsFiles(
        str(pki / "ca.pem"),
        str(pki / f"{identity}.pem"),
        str(pki / f"{identity}.key"),
        str(pki / "crl.pem") if crl else None,
    )


def tls_flags(pki: Path, identity: str, crl: bool) -> list[str]:
    f = files(pki, identity, crl)
    flags = ["--tls-ca", f.ca, "--tls-cert", f.cert, "--tls-key", f.key]
    return [*flags, "--tls-crl", f.crl] if crl else flags


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, the identities, and a CRL that already lists a retired certificate."""
    out = tmp_path / "pki"
    write_certs(out, identities=(*IDENTITIES, "retired"))
    revoke(out, "retired")
    return out


@contextlib.asynccontextmanager
async def tls_controller(pki: Path):
    """A controller process with mutual TLS (and the CRL) on a free port; stopped however the test ends."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.controller",
            "--port",
            str(port),
            *tls_flags(pki, "controller", True),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    address = f"127.0.0.1:{port}"
    try:
        await wait_healthy(address, timeout_s=30, tls_files=files(pki, "admin"))
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


async def health(address: str, tls_files: tls.TlsFiles | None) -> grpc.StatusCode:
    """The status of one health check over a fresh channel (plaintext without ``tls_files``)."""
    channel = open_channel(address, tls_files) if tls_files else grpc.aio.insecure_channel(address)
    async with channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def call(address: str, tls_files: tls.TlsFiles, method: str, request) -> tuple[grpc.StatusCode, str]:
    async with open_channel(address, tls_files) as channel:
        try:
            await getattr(controller_pb2_grpc.ControllerStub(channel), method)(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def register_request() -> controller_pb2.RegisterRequest:
    info = InstanceInfoData("prefill-0", Role.PREFILL, "127.0.0.1:6001", "tcp://127.0.0.1:7001", "tiny")
    return controller_pb2.RegisterRequest(instance=instance_to_proto(info))


def test_handshake_refuses_plaintext_and_another_ca(pki, tmp_path):
    other = tmp_path / "other"
    write_certs(other)

    async def main() -> None:
        async with tls_controller(pki) as address:
            assert await health(address, files(pki, "coordinator")) == grpc.StatusCode.OK
            assert await health(address, None) == grpc.StatusCode.UNAVAILABLE
            assert await health(address, files(other, "admin")) == grpc.StatusCode.UNAVAILABLE
            # The retired certificate was revoked before the controller started.
            code, details = await call(
                address, files(pki, "retired"), "ListInstances", controller_pb2.ListInstancesRequest()
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details

    asyncio.run(main())


def test_identities_decide_who_registers_and_who_administers(pki):
    async def main() -> None:
        async with tls_controller(pki) as address:
            set_ratio = controller_pb2.SetRatioRequest(ratio="2:1")
            code, details = await call(address, files(pki, "worker"), "SetRatio", set_ratio)
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert "'worker'" in details and "/pdmesh.v1.Controller/SetRatio" in details
            assert (await call(address, files(pki, "admin"), "SetRatio", set_ratio))[0] == grpc.StatusCode.OK
            code, details = await call(address, files(pki, "coordinator"), "Register", register_request())
            assert code == grpc.StatusCode.PERMISSION_DENIED and "'coordinator'" in details
            assert (await call(address, files(pki, "worker"), "Register", register_request()))[
                0
            ] == grpc.StatusCode.OK
            listing = controller_pb2.ListInstancesRequest()
            for identity in ("coordinator", "worker", "admin", "controller"):
                assert (await call(address, files(pki, identity), "ListInstances", listing))[
                    0
                ] == grpc.StatusCode.OK

    asyncio.run(main())


def test_a_certificate_revoked_while_running_is_refused(pki):
    async def main() -> None:
        async with tls_controller(pki) as address:
            listing = controller_pb2.ListInstancesRequest()
            assert (await call(address, files(pki, "coordinator"), "ListInstances", listing))[
                0
            ] == grpc.StatusCode.OK
            revoke(pki, "coordinator")
            code, details = await call(address, files(pki, "coordinator"), "ListInstances", listing)
            assert (
                code == grpc.StatusCode.UNAUTHENTICATED
                and "'coordinator'" in details
                and "revoked" in details
            )
            assert await health(address, files(pki, "coordinator")) == grpc.StatusCode.UNAUTHENTICATED
            assert (await call(address, files(pki, "admin"), "ListInstances", listing))[
                0
            ] == grpc.StatusCode.OK

    asyncio.run(main())


def test_certificates_and_ca_rotate_without_a_restart(pki, tmp_path):
    old = tmp_path / "old"

    async def main() -> None:
        async with tls_controller(pki) as address:
            shutil.copytree(pki, old)
            write_certs(pki)  # renewed certificates, same CA
            assert await health(address, files(pki, "admin")) == grpc.StatusCode.OK
            assert await health(address, files(old, "admin")) == grpc.StatusCode.OK
            write_certs(pki, new_ca=True)  # a new CA: the controller now trusts and presents only it
            assert await health(address, files(pki, "admin")) == grpc.StatusCode.OK
            assert await health(address, files(old, "admin")) == grpc.StatusCode.UNAVAILABLE
            listing = controller_pb2.ListInstancesRequest()
            assert (await call(address, files(pki, "worker"), "ListInstances", listing))[
                0
            ] == grpc.StatusCode.OK

    asyncio.run(main())


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pdmesh.cli", "ctl", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_ctl_presents_its_certificate(pki):
    async def main() -> None:
        async with tls_controller(pki) as address:
            admin = tls_flags(pki, "admin", False)
            done = await asyncio.to_thread(ctl, "--controller", address, *admin, "set-ratio", "1:1")
            assert done.returncode == 0 and done.stdout.strip() == "ratio 1:1", done.stderr
            worker = tls_flags(pki, "worker", False)
            done = await asyncio.to_thread(ctl, "--controller", address, *worker, "set-ratio", "1:1")
            assert done.returncode == 1 and "PERMISSION_DENIED" in done.stderr and "'worker'" in done.stderr
            done = await asyncio.to_thread(ctl, "--controller", address, "--timeout-s", "3", "list")
            assert done.returncode == 1 and "UNAVAILABLE" in done.stderr
            done = await asyncio.to_thread(ctl, "--controller", address, "--tls-ca", admin[1], "list")
            assert done.returncode == 2 and "missing --tls-cert, --tls-key" in done.stderr

    asyncio.run(main())


def run_controller(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.controller", "--port", "0", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_bad_tls_files_fail_startup_with_one_line(pki):
    os.chmod(pki / "controller.key", 0o644)
    done = run_controller(*tls_flags(pki, "controller", False))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"pdmesh controller: TLS key file {pki / 'controller.key'} has mode 0644, looser than 0600; "
        f"run `chmod 600 {pki / 'controller.key'}`"
    )
    done = run_controller("--tls-cert", str(pki / "controller.pem"))
    assert done.returncode == 2 and "tls_cert is set without tls_ca and tls_key" in done.stderr
