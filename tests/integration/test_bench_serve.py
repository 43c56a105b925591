"""``pdmesh bench serve`` end to end: against a real local pdmesh stack, and against a scripted
OpenAI-compatible server (FastAPI on a loopback port) that also fails in every way a server can."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pdmesh.bench.serve import BenchConfig, main, run_benchmark
from tests.integration.http_harness import serve_in_thread

pytestmark = pytest.mark.timeout(300)

METRIC_FIELDS = [
    "completed",
    "failed",
    "errors",
    "duration_s",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "input_throughput",
    "total_token_throughput",
    *[
        f"{stat}_{name}_ms"
        for name in ("ttft", "tpot", "itl", "e2el")
        for stat in ("mean", "median", "p90", "p99")
    ],
    "base_url",
    "endpoint",
    "model",
    "dataset",
    "num_prompts",
    "request_rate",
    "max_concurrency",
    "input_len",
    "output_len",
    "ignore_eos",
    "seed",
]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# -- against a real pdmesh stack ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from pdmesh.launcher import LocalStack, StackSpec

    spec = StackSpec(
        model_dir=tiny_qwen3,
        http_port=0,
        log_dir=tmp_path_factory.mktemp("stack-logs"),
        worker_args={"kv-cache-memory-mib": "16"},
    )
    stack = LocalStack(spec)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def test_cli_against_a_local_stack(stack, tiny_qwen3: Path, tmp_path: Path, capsys):
    out_json, out_png = tmp_path / "result.json", tmp_path / "plot.png"
    argv = [
        "--base-url", stack.base_url,
        "--tokenizer", str(tiny_qwen3),
        "--dataset", "random",
        "--num-prompts", "8",
        "--input-len", "16",
        "--output-len", "8",
        "--ignore-eos",
        "--request-rate", "inf",
        "--max-concurrency", "4",
        "--warmup", "1",
        "--goodput", "ttft:600000", "e2el:600000",
        "--timeout", "120",
        "--json", str(out_json),
        "--plot", str(out_png),
        "--disable-tqdm",
    ]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "Mean TTFT (ms):" in table
    data = json.loads(out_json.read_text())
    assert [name for name in METRIC_FIELDS if name not in data] == []
    assert data["errors"] == [] and data["failed"] == 0, data["errors"]
    assert data["completed"] == 8
    assert data["total_output_tokens"] == 64
    assert data["per_request"]["output_lens"] == [8] * 8
    assert data["total_input_tokens"] == 8 * 16
    assert data["request_goodput"] == pytest.approx(data["request_throughput"])
    assert data["model"] and data["request_rate"] == "inf" and data["max_concurrency"] == 4
    assert 0 < data["mean_ttft_ms"] <= data["mean_e2el_ms"]
    assert data["mean_tpot_ms"] > 0 and data["mean_itl_ms"] > 0
    assert data["output_throughput"] > 0
    assert data["cpu"]["torch"] and set(data["cpu"]["flags"]) >= {"avx2", "avx512f", "amx_tile"}
    assert_png(out_png)


def test_api_chat_against_a_local_stack(stack):
    config = BenchConfig(
        base_url=stack.base_url,
        endpoint="/v1/chat/completions",
        num_prompts=4,
        input_len=8,
        output_len=6,
        ignore_eos=True,
        max_concurrency=2,
        timeout_s=120,
        show_progress=False,
    )
    result = asyncio.run(run_benchmark(config))
    assert result.metrics.errors == []
    assert result.metrics.completed == 4
    assert result.metrics.total_output_tokens == 24
    assert result.metrics.total_input_tokens > 4 * 8  # the chat template's tokens count too


# -- against a scripted OpenAI-compatible server ------------------------------------------------------


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class ScriptedServer:
    """An OpenAI-compatible streaming server; ``modes`` says how each request (in arrival order) goes."""

    def __init__(self) -> None:
        self.modes = ["ok"]
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.app = FastAPI()
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/completions")(self.generate)
        self.app.post("/v1/chat/completions")(self.generate)

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": "scripted-model", "object": "model"}]}

    async def generate(self, request: Request):
        body = await request.json()
        mode = self.modes[len(self.bodies) % len(self.modes)]
        self.bodies.append(body)
        if mode == "http500":
            error = {"error": {"message": "scripted failure", "type": "internal_error", "code": 500}}
            return JSONResponse(error, status_code=500)
        return StreamingResponse(self.events(body, mode), media_type="text/event-stream")

    async def events(self, body: dict, mode: str):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            chat = "messages" in body
            if chat:
                yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            if mode == "slow":
                await asyncio.sleep(5)
            for i in range(body["max_tokens"]):
                await asyncio.sleep(0.005)
                text = f"t{i} "
                part = {"delta": {"content": text}} if chat else {"text": text}
                yield sse({"choices": [{"index": 0, **part, "finish_reason": None}]})
                if i == 1 and mode == "error_event":
                    yield sse({"error": {"message": "worker died", "type": "internal_error", "code": 502}})
                    yield sse("[DONE]")
                    return
                if i == 1 and mode == "broken":
                    return
            last = {"delta": {}} if chat else {"text": ""}
            yield sse({"choices": [{"index": 0, **last, "finish_reason": "length"}]})
            if mode != "no_usage" and body.get("stream_options", {}).get("include_usage"):
                usage = {"prompt_tokens": 5, "completion_tokens": body["max_tokens"], "total_tokens": 0}
                yield sse({"choices": [], "usage": usage})
            yield sse("[DONE]")
        finally:
            self.in_flight -= 1


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedServer, str]]:
    fake = ScriptedServer()
    with serve_in_thread(fake.app) as url:
        yield fake, url


def test_cli_against_a_scripted_server(scripted, tmp_path: Path):
    fake, url = scripted
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    argv = [
        "--base-url", url, "--num-prompts", "8", "--input-len", "16", "--output-len", "8", "--ignore-eos",
        "--max-concurrency", "4", "--warmup", "2", "--json", str(out_json), "--plot", str(out_png),
        "--goodput", "ttft:60000", "--disable-tqdm",
    ]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out_json.read_text())
    assert [name for name in METRIC_FIELDS if name not in data] == []
    assert (data["completed"], data["failed"], data["errors"]) == (8, 0, [])
    assert data["total_output_tokens"] == 64 and data["total_input_tokens"] == 40  # from usage
    assert data["request_goodput"] == pytest.approx(data["request_throughput"])
    assert data["model"] == "scripted-model"
    assert len(fake.bodies) == 10  # warm-up requests are sent but not measured
    assert fake.max_in_flight <= 4
    body = fake.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["model"], body["max_tokens"], body["ignore_eos"], body["temperature"]) == (
        "scripted-model",
        8,
        True,
        0,
    )
    assert len(body["prompt"].split()) == 16
    # 8 chunks a request: ITL and TPOT are measured (their size is timing, not checked here)
    assert data["median_itl_ms"] > 0 and data["median_tpot_ms"] > 0
    assert_png(out_png)


def test_failures_are_counted_not_raised(scripted, capsys):
    fake, url = scripted
    fake.modes = ["ok", "http500", "error_event", "broken", "slow"]
    config = BenchConfig(base_url=url, num_prompts=10, output_len=4, timeout_s=1.0, show_progress=False)
    result = asyncio.run(run_benchmark(config))
    m = result.metrics
    assert (m.completed, m.failed) == (2, 8)
    assert m.total_output_tokens == 8
    kinds = sorted((e["status"] or 0, e["message"].split(":")[0]) for e in m.errors)
    assert kinds == sorted(
        [(500, "scripted failure")] * 2
        + [(502, "error event")] * 2
        + [(0, "the stream ended before [DONE]")] * 2
        + [(0, "timed out after 1 s")] * 2
    )


def test_chat_without_usage_counts_content_chunks(scripted):
    fake, url = scripted
    fake.modes = ["no_usage"]
    config = BenchConfig(
        base_url=url,
        endpoint="/v1/chat/completions",
        model="given",
        num_prompts=3,
        output_len=5,
        show_progress=False,
    )
    result = asyncio.run(run_benchmark(config))
    assert result.model == "given" and fake.bodies[0]["model"] == "given"
    assert fake.bodies[0]["messages"][0]["role"] == "user"
    assert result.metrics.completed == 3
    assert result.metrics.total_output_tokens == 15  # 5 content chunks each; the role chunk is not one
    assert all(len(out.itl) == 4 and out.generated_text == "t0 t1 t2 t3 t4 " for out in result.outputs)


def test_request_rate_spreads_arrivals(scripted):
    _, url = scripted
    config = BenchConfig(
        base_url=url, num_prompts=10, output_len=2, request_rate=40.0, seed=1, show_progress=False
    )
    result = asyncio.run(run_benchmark(config))
    starts = sorted(out.start_time for out in result.outputs)
    assert result.metrics.completed == 10
    assert starts[-1] - starts[0] > 0.05  # Poisson gaps delay later arrivals (sleeps are never shorter)


def test_unreachable_server(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    assert main(["--base-url", url, "--num-prompts", "2", "--disable-tqdm"]) == 2  # no model list
    assert "pdmesh bench serve:" in capsys.readouterr().err
    argv = ["--base-url", url, "--model", "m", "--num-prompts", "3", "--input-len", "4", "--disable-tqdm"]
    assert main(argv) == 1  # every request failed, each counted
    out = capsys.readouterr().out
    assert "Failed requests:                         3" in out and "ConnectError" in out
