"""Both fronts refuse the same bad sampling values with the same words: the HTTP front (400) and the
gRPC ``Generate`` front (INVALID_ARGUMENT, over real gRPC on loopback), on one echoing backend."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdmesh.rpc.client import open_channel
from pdmesh.rpc.server import start_server
from pdmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from services.coordinator.grpc_front import CoordinatorServicer
from tests.integration.http_harness import MAX_MODEL_LEN, MODEL, assert_error, call

pytestmark = pytest.mark.timeout(60)

JSON = {"content-type": "application/json"}

# Values both fronts can carry (gRPC: float32 and int32 fields; unset means default there, so no 0s).
BAD = [
    ("temperature", -1.0, "temperature must be >= 0"),
    ("top_p", 1.5, "top_p must be <= 1"),
    ("top_k", -2, "top_k must be >= -1"),
    ("min_p", 2.0, "min_p must be <= 1"),
    ("presence_penalty", 3.0, "presence_penalty must be <= 2"),
    ("frequency_penalty", -3.0, "frequency_penalty must be >= -2"),
    ("repetition_penalty", -1.0, "repetition_penalty must be >= 1.401298464324817e-45"),
    ("logprobs", 21, "logprobs must be <= 20"),
    ("temperature", float("nan"), "temperature: Input should be a finite number"),
]


def grpc_refusals(
    backend, tok, requests: list[coordinator_pb2.GenerateRequest]
) -> list[grpc.aio.AioRpcError]:
    """The errors the Generate front answers to each request."""

    async def run() -> list[grpc.aio.AioRpcError]:
        servicer = CoordinatorServicer(backend, tok, MODEL, MAX_MODEL_LEN)
        server = await start_server(
            lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, s),
            ["pdmesh.v1.Coordinator"],
        )
        errors = []
        try:
            async with open_channel(f"127.0.0.1:{server.port}") as channel:
                stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                for request in requests:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        _ = [r async for r in stub.Generate(request, timeout=30)]
                    errors.append(refused.value)
        finally:
            await server.stop(0)
        return errors

    return asyncio.run(run())


def test_both_fronts_refuse_bad_sampling_alike(app, backend, tok) -> None:
    requests = [
        coordinator_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(**{field: value}))
        for field, value, _ in BAD
    ]
    for (field, value, message), refused in zip(BAD, grpc_refusals(backend, tok, requests), strict=True):
        body = {"prompt": "hi", field: value}
        if field == "temperature" and value != value:  # NaN: JSON has none, so send the text Python writes
            nan = b'{"prompt": "hi", "temperature": NaN}'
            response = call(app, "POST", "/v1/completions", content=nan, headers=JSON)
        else:
            response = call(app, "POST", "/v1/completions", json=body)
        http = assert_error(response, 400, message)["message"]
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, refused)
        assert refused.details() == http, (field, refused.details(), http)
    assert backend.calls == []


def test_both_fronts_refuse_stop_token_ids_beyond_the_vocabulary_alike(app, backend, tok) -> None:
    stops = [tok.vocab_size]
    request = coordinator_pb2.GenerateRequest(
        prompt="hi", sampling=common_pb2.SamplingParams(stop_token_ids=stops)
    )
    (refused,) = grpc_refusals(backend, tok, [request])
    response = call(app, "POST", "/v1/completions", json={"prompt": "hi", "stop_token_ids": stops})
    http = assert_error(response, 400, f"stop_token_ids must be in [0, {tok.vocab_size})")["message"]
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.details() == http
    assert backend.calls == []
