"""A whole local PD stack with mutual TLS on every link (gRPC, KV transfer, HTTPS) answers a
request with the same text as the same stack in plaintext, and so does one that sends the KV in
clear on handle secrets; its gRPC servers refuse plaintext and check identities; no key material
reaches the logs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import grpc
import httpx
import psutil
import pytest
import redis

from pdmesh.launcher import LocalStack
from pdmesh.launcher_tls import tls_files
from pdmesh.rpc.client import open_channel
from pdmesh.v1 import (
    common_pb2,
    controller_pb2,
    controller_pb2_grpc,
    coordinator_pb2,
    coordinator_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.e2e.conftest import start_stack

pytestmark = pytest.mark.timeout(240)

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def stacks(tiny_qwen3, tmp_path_factory) -> Iterator[tuple[LocalStack, LocalStack]]:
    """(plaintext, TLS) PD stacks of one prefill and one decode worker each."""
    plain = start_stack(tiny_qwen3, tmp_path_factory, prefill=1, decode=1, mode="pd")
    try:
        tls_dir = tmp_path_factory.mktemp("tls")
        secure = start_stack(tiny_qwen3, tmp_path_factory, prefill=1, decode=1, mode="pd", tls_dir=tls_dir)
        try:
            yield plain, secure
        finally:
            secure.stop()
    finally:
        plain.stop()


def chat(stack: LocalStack, model: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 12,
        "temperature": 0,
    }
    verify = str(stack.spec.tls_dir / "ca.pem") if stack.spec.tls_dir else True
    reply = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60, verify=verify)
    assert reply.status_code == 200, reply.text
    text = reply.json()["choices"][0]["message"]["content"]
    assert text
    return text


async def generate(stack: LocalStack) -> list[int]:
    files = tls_files(stack.spec.tls_dir, "admin") if stack.spec.tls_dir else None
    async with open_channel(stack.coordinator_grpc, files) as channel:
        request = coordinator_pb2.GenerateRequest(
            prompt=PROMPT, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        )
        replies = [
            r async for r in coordinator_pb2_grpc.CoordinatorStub(channel).Generate(request, timeout=60)
        ]
    return [t for r in replies for t in r.token_ids]


def test_pd_request_gives_the_same_text_with_tls(stacks, tiny_qwen3):
    plain, secure = stacks
    assert secure.base_url.startswith("https://")
    assert chat(secure, tiny_qwen3.name) == chat(plain, tiny_qwen3.name)
    tokens = asyncio.run(generate(secure))
    assert len(tokens) == 8 and tokens == asyncio.run(generate(plain))


def test_kv_in_clear_on_handle_secrets_gives_the_same_text(stacks, tiny_qwen3, tmp_path_factory):
    """``kv_transfer_security: secret``: TLS everywhere but the KV bytes, each pull authenticated by
    its handle's secret from the registry."""
    plain, _ = stacks
    tls_dir = tmp_path_factory.mktemp("tls-secret")
    args = {"kv-transfer-security": "secret"}
    stack = start_stack(tiny_qwen3, tmp_path_factory, args, prefill=1, decode=1, mode="pd", tls_dir=tls_dir)
    try:
        assert chat(stack, tiny_qwen3.name) == chat(plain, tiny_qwen3.name)
        prefill_log = (stack.log_dir / "prefill-0.log").read_text()
        assert "KV tcp transfer server on tcp://" in prefill_log and "(TLS)" not in prefill_log
    finally:
        stack.stop()


async def status_of(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def check_links(stack: LocalStack) -> None:
    tls_dir = stack.spec.tls_dir
    async with open_channel(stack.controller_address, tls_files(tls_dir, "admin")) as channel:
        reply = await controller_pb2_grpc.ControllerStub(channel).ListInstances(
            controller_pb2.ListInstancesRequest(), timeout=5
        )
    workers = [i.address for i in reply.instances]
    assert len(workers) == 2
    for address in [stack.controller_address, stack.coordinator_grpc, *workers]:
        async with grpc.aio.insecure_channel(address) as channel:
            listing = controller_pb2_grpc.ControllerStub(channel).ListInstances(
                controller_pb2.ListInstancesRequest(), timeout=5
            )
            assert await status_of(listing) == grpc.StatusCode.UNAVAILABLE, address
    async with open_channel(stack.controller_address, tls_files(tls_dir, "worker")) as channel:
        set_ratio = controller_pb2_grpc.ControllerStub(channel).SetRatio(
            controller_pb2.SetRatioRequest(ratio="1:1"), timeout=5
        )
        assert await status_of(set_ratio) == grpc.StatusCode.PERMISSION_DENIED
    async with open_channel(workers[0], tls_files(tls_dir, "admin")) as channel:
        release = worker_pb2_grpc.WorkerStub(channel).Release(worker_pb2.ReleaseRequest(), timeout=5)
        assert await status_of(release) == grpc.StatusCode.PERMISSION_DENIED


def test_tls_stack_refuses_plaintext_and_checks_identities(stacks):
    _, secure = stacks
    asyncio.run(check_links(secure))
    log_dir = secure.log_dir
    logs = "".join((log_dir / name).read_text(errors="replace") for name in os.listdir(log_dir))
    assert "PRIVATE KEY" not in logs and "mutual TLS" in logs


def test_the_stacks_own_redis_wants_its_password_over_tls(stacks):
    _, secure = stacks
    url = secure.redis_url
    parts = urlsplit(url)
    assert parts.scheme == "rediss" and parts.username == "pdmesh" and parts.password
    assert redis.Redis.from_url(url, socket_timeout=5).ping()
    no_password = url.replace(f":{parts.password}@", "@", 1)
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(no_password, socket_timeout=5).ping()
    plaintext = f"redis://{parts.username}:{parts.password}@{parts.hostname}:{parts.port}/0"
    with pytest.raises(redis.exceptions.RedisError):  # the TLS port speaks no plaintext
        redis.Redis.from_url(plaintext, socket_timeout=2, socket_connect_timeout=2).ping()
    password = unquote(parts.password)
    for name, proc in secure.processes.items():  # it travels in the environment, never on a command line
        assert all(password not in arg for arg in psutil.Process(proc.pid).cmdline()), name
