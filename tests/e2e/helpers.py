"""Small client helpers for the end-to-end tests: SSE parsing and cluster inspection."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx

from pdmesh.rpc.client import open_channel
from pdmesh.v1 import controller_pb2, controller_pb2_grpc


def sse_events(response: httpx.Response) -> list[str]:
    """The data payloads of a server-sent-event response, in order."""
    return [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]


def stream_chat(base_url: str, body: dict, timeout: float = 60.0) -> tuple[str, list[dict], list[str]]:
    """Streams a chat completion; returns the text, the JSON chunks and the raw payloads."""
    with httpx.Client(timeout=timeout) as client:
        response = client.post(f"{base_url}/v1/chat/completions", json={**body, "stream": True})
        assert response.status_code == 200, response.text
        payloads = sse_events(response)
    chunks = [json.loads(p) for p in payloads if p != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks, payloads


async def _instances(controller: str):
    async with open_channel(controller) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        reply = await stub.ListInstances(controller_pb2.ListInstancesRequest(), timeout=5)
    return list(reply.instances)


def list_instances(controller: str):
    return asyncio.run(_instances(controller))


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.1) -> float:
    """Polls ``condition`` every ``poll_s``; returns the seconds it took, fails naming ``what``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s}s"
        time.sleep(poll_s)
    return time.monotonic() - started


def instance_busy(controller: str, instance_id: str) -> bool:
    """Whether the controller's latest heartbeat from ``instance_id`` shows a running request."""
    return any(
        i.instance_id == instance_id and i.load.running > 0 and i.load.free_blocks < i.load.total_blocks
        for i in list_instances(controller)
    )


def wait_blocks_idle(controller: str, timeout_s: float = 15.0) -> list:
    """Waits until every worker reports all KV blocks free (heartbeats carry the load)."""
    deadline = time.monotonic() + timeout_s
    instances = []
    while time.monotonic() < deadline:
        try:
            instances = list_instances(controller)
        except grpc.aio.AioRpcError:  # e.g. a controller regaining its lease after a Redis restart
            time.sleep(0.3)
            continue
        if instances and all(
            i.load.total_blocks > 0 and i.load.free_blocks == i.load.total_blocks and i.load.running == 0
            for i in instances
        ):
            return instances
        time.sleep(0.3)
    raise AssertionError(f"KV blocks not all free: {[(i.instance_id, i.load) for i in instances]}")
