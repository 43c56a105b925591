"""The mesh backend carries logprobs from the workers' replies into its chunks, and a retry that
continues from the tokens already sent neither repeats nor loses any (fake workers, no network)."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest

from pdmesh.config import CoordinatorConfig
from pdmesh.generation import SamplingParams
from pdmesh.membership import ClusterViewData, InstanceInfoData, Role
from pdmesh.rpc.convert import logprobs_to_proto
from pdmesh.rpc.worker_client import WorkerClient
from pdmesh.v1 import worker_pb2
from services.coordinator.mesh import MeshBackend

pytestmark = pytest.mark.timeout(60)

PROMPT = [1, 2, 3]


def lp(token: int) -> tuple[float, dict[int, float]]:
    """A float32-exact entry that names its token."""
    return (-token / 4, {token: -token / 4, token + 100: -token / 4 - 1})


class _Call:
    """A Decode stream: ``chunks`` of token ids, then (unless None) the stream breaks with ``fail``."""

    def __init__(self, chunks: list[list[int]], fail: grpc.StatusCode | None, finish: bool) -> None:
        self.chunks, self.fail, self.finish = chunks, fail, finish

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for i, ids in enumerate(self.chunks):
            last = self.finish and i == len(self.chunks) - 1
            yield worker_pb2.DecodeChunk(
                token_ids=ids,
                finished=last,
                finish_reason="length" if last else "",
                logprobs=logprobs_to_proto([lp(t) for t in ids]),
            )
        if self.fail is not None:
            raise grpc.aio.AioRpcError(self.fail, grpc.aio.Metadata(), grpc.aio.Metadata(), "worker died")

    def cancel(self) -> None:
        pass


class _Worker:
    """Prefill answers ``first``; Decode streams ``plan`` (and breaks when told to)."""

    def __init__(
        self, first: int = 0, plan: list[list[int]] = (), fail: grpc.StatusCode | None = None
    ) -> None:
        self.first, self.plan, self.fail = first, list(plan), fail
        self.prompts: list[list[int]] = []

    async def Prefill(self, request, timeout):  # noqa: N802
        self.prompts.append(list(request.prompt_ids))
        reply = worker_pb2.PrefillResponse(
            first_token=self.first, logprobs=logprobs_to_proto([lp(self.first)])
        )
        reply.handle.handle_id = f"h{len(self.prompts)}"
        return reply

    def Decode(self, request, timeout):  # noqa: N802
        self.prompts.append(list(request.prompt_ids))
        return _Call(self.plan, self.fail, finish=self.fail is None)


class _Router:
    def __init__(self, instances: list[InstanceInfoData]) -> None:
        self.instances = instances
        self.inflight: Counter = Counter()
        self.view = ClusterViewData(1, tuple(instances))

    def snapshot(self) -> _Router:  # one fixed view: the router is its own snapshot
        return self

    def ready(self) -> bool:
        return True

    def can_disaggregate(self) -> bool:
        return True

    def pick(self, role: Role, exclude=(), prompt_ids=None, prefer=None):
        return next((i for i in self.instances if i.role == role and i.instance_id not in exclude), None)


def test_retry_after_decode_dies_keeps_one_logprob_per_token() -> None:
    instances = [
        InstanceInfoData("prefill-0", Role.PREFILL, "p0:1"),
        InstanceInfoData("decode-0", Role.DECODE, "d0:1"),
        InstanceInfoData("decode-1", Role.DECODE, "d1:1"),
    ]
    prefill = _Worker(first=10)  # answers 10 the first time; changed below for the retry
    workers = {
        "p0:1": prefill,
        "d0:1": _Worker(plan=[[11], [12]], fail=grpc.StatusCode.UNAVAILABLE),
        "d1:1": _Worker(plan=[[14], [15]]),
    }
    config = CoordinatorConfig(controller="unused:1", model_dir="unused", max_retry=2)
    backend = MeshBackend(_Router(instances), config)
    backend._client = lambda instance: WorkerClient(workers[instance.address])
    original = prefill.Prefill

    async def prefill_then_13(request, timeout):
        reply = await original(request, timeout)
        prefill.first = 13
        return reply

    prefill.Prefill = prefill_then_13

    async def run():
        sampling = SamplingParams(temperature=0, max_tokens=6, logprobs=2)
        return [c async for c in backend.generate("req", PROMPT, sampling)]

    chunks = asyncio.run(run())
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == [10, 11, 12, 13, 14, 15]
    assert [e for c in chunks for e in c.logprobs] == [lp(t) for t in tokens]
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    assert prefill.prompts == [PROMPT, PROMPT + [10, 11, 12]]  # the retry continues after what was sent
    assert chunks[-1].finished
