"""The coordinator's mesh backend against scripted workers over real gRPC on loopback: one request
attempt routes on one cluster view however often the view changes meanwhile, and the channels of
instances that left the view are closed once no call uses them (a stream in flight keeps its own)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from pdmesh.config import CoordinatorConfig
from pdmesh.generation import SamplingParams
from pdmesh.membership import ClusterViewData, InstanceInfoData, Role
from pdmesh.rpc.server import RunningServer, start_server
from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from services.coordinator.mesh import MeshBackend
from services.coordinator.routing import Router

pytestmark = pytest.mark.timeout(60)

CONFIG = CoordinatorConfig(controller="unused:1", model_dir="unused", max_retry=0)
SAMPLING = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


class ScriptedWorker(worker_pb2_grpc.WorkerServicer):
    """Prefill answers token 1; Decode streams 2 then (once ``gate`` opens) 3, and finishes."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.decoding = asyncio.Event()

    async def Prefill(self, request, context):  # noqa: N802
        reply = worker_pb2.PrefillResponse(first_token=1)
        reply.handle.handle_id = f"h-{request.request_id}"
        return reply

    async def Decode(self, request, context):  # noqa: N802
        start = 1 if request.prefill_locally else 2
        yield worker_pb2.DecodeChunk(token_ids=list(range(start, 3)))
        self.decoding.set()
        await self.gate.wait()
        yield worker_pb2.DecodeChunk(token_ids=[3], finished=True, finish_reason="length")


async def start_workers(count: int) -> tuple[list[ScriptedWorker], list[RunningServer]]:
    workers, servers = [], []
    for _ in range(count):
        worker = ScriptedWorker()
        register = lambda s, w=worker: worker_pb2_grpc.add_WorkerServicer_to_server(w, s)  # noqa: E731
        servers.append(await start_server(register, ["pdmesh.v1.Worker"]))
        workers.append(worker)
    return workers, servers


def view_of(version: int, *members: tuple[str, Role, RunningServer]) -> ClusterViewData:
    instances = [InstanceInfoData(i, role, f"127.0.0.1:{s.port}") for i, role, s in members]
    return ClusterViewData(version, tuple(instances))


async def tokens_of(backend: MeshBackend, request_id: str) -> list[int]:
    return [t async for chunk in backend.generate(request_id, [5, 6, 7], SAMPLING) for t in chunk.token_ids]


def test_an_attempt_routes_on_one_view_while_views_alternate():
    """A role flip seen mid-request: the view alternates between prefill+decode and one mixed
    instance on every read. Each attempt must still route on one of them, whole."""

    async def main() -> None:
        _, servers = await start_workers(3)
        disaggregated = view_of(1, ("p0", Role.PREFILL, servers[0]), ("d0", Role.DECODE, servers[1]))
        mixed = view_of(2, ("m0", Role.MIXED, servers[2]))
        views = itertools.cycle([disaggregated, mixed])
        backend = MeshBackend(Router(lambda: next(views)), CONFIG)
        try:
            for n in range(6):
                if n % 2:
                    next(views)  # the next request starts on the other phase of the alternation
                assert await tokens_of(backend, f"r{n}") == [1, 2, 3]
        finally:
            await backend.close()
            for server in servers:
                await server.stop(0)

    asyncio.run(main())


def test_channels_of_departed_instances_close_when_no_call_uses_them():
    async def main() -> None:
        workers, servers = await start_workers(4)
        old = view_of(1, ("p0", Role.PREFILL, servers[0]), ("d0", Role.DECODE, servers[1]))
        new = view_of(2, ("p1", Role.PREFILL, servers[2]), ("d1", Role.DECODE, servers[3]))
        current = [old]
        backend = MeshBackend(Router(lambda: current[0]), CONFIG)
        address = [f"127.0.0.1:{s.port}" for s in servers]
        try:
            workers[1].gate.clear()  # d0's stream stays open until told
            first = asyncio.ensure_future(tokens_of(backend, "first"))
            await workers[1].decoding.wait()
            current[0] = new  # p0 and d0 leave the cluster while d0 still streams "first"
            assert await tokens_of(backend, "second") == [1, 2, 3]
            assert set(backend._channels) == {address[1], address[2], address[3]}  # p0's closed
            workers[1].gate.set()
            assert await first == [1, 2, 3]  # the departed instance's stream finished undisturbed
            assert set(backend._channels) == {address[2], address[3]}  # and then its channel closed
        finally:
            await backend.close()
            for server in servers:
                await server.stop(0)

    asyncio.run(main())
