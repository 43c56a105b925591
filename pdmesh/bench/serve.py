"""``pdmesh bench serve``: load any OpenAI-compatible endpoint and measure TTFT, TPOT, ITL and throughput.

Works against pdmesh, vLLM, SGLang, MindIE or anything that streams OpenAI's server-sent events.
Every request streams (``stream: true`` with ``stream_options.include_usage``); requests arrive as a
Poisson process at ``--request-rate`` (``inf``: all at once), at most ``--max-concurrency`` in flight.
Failed requests (HTTP errors, error events, broken streams, timeouts) are counted with their errors.

Programmatic use::

    result = await run_benchmark(BenchConfig(base_url="http://127.0.0.1:8000", num_prompts=100))
    print(result.metrics.output_throughput)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from pdmesh.bench import report
from pdmesh.bench.datasets import DATASETS, SampleRequest, load_dataset, load_tokenizer
from pdmesh.bench.metrics import BenchMetrics, RequestOutput, compute_metrics, parse_goodput
from pdmesh.bench.mindie_flags import add_mindie_flags, apply_mindie_flags
from pdmesh.bench.request import RequestContext, error_message, send_request
from pdmesh.extras import MissingExtra

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class BenchConfig:
    """One benchmark run. ``goodput`` maps ``ttft``/``tpot``/``e2el`` to SLO limits in milliseconds."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None
    tokenizer: str | None = None
    dataset: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 1000
    request_rate: float = math.inf
    max_concurrency: int | None = None
    input_len: int | None = None
    output_len: int | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    warmup: int = 0
    goodput: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    timeout_s: float | None = 600.0
    api_key: str | None = None
    show_progress: bool = True

    def validate(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, not {self.endpoint!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, not {self.dataset!r}")
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be positive (or inf)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError("--timeout must be positive")

    def params(self) -> dict:
        """The run's parameters for the JSON report (no API key; ``inf`` as a string)."""
        params = asdict(self)
        params.pop("api_key")
        params.pop("show_progress")
        params["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return params


@dataclass
class BenchResult:
    """A finished run: its configuration, the model it used, the summary and every request's outputs."""

    config: BenchConfig
    model: str
    metrics: BenchMetrics
    outputs: list[RequestOutput]
    started_at: str

    def to_dict(self) -> dict:
        """The JSON report: every metric, the errors and the run's parameters."""
        return report.result_to_dict(self)


def build_payload(config: BenchConfig, model: str, sample: SampleRequest) -> dict:
    """The streaming request body for ``sample`` (completions or chat completions)."""
    body: dict = {
        "model": model,
        "max_tokens": sample.expected_output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": sample.prompt}]
    else:
        body["prompt"] = sample.prompt
    if config.ignore_eos:
        body["ignore_eos"] = True
    return body


async def fetch_model(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> str:
    """The first model id of ``GET /v1/models``."""
    response = await client.get(f"{base_url}/v1/models", headers=headers)
    if response.status_code != 200:
        raise RuntimeError(
            f"GET {base_url}/v1/models: {response.status_code} {error_message(response.content)}"
        )
    models = response.json().get("data") or []
    if not models:
        raise RuntimeError(f"GET {base_url}/v1/models lists no model; pass --model")
    return str(models[0]["id"])


def arrival_times(count: int, rate: float, seed: int) -> np.ndarray:
    """Send times (seconds from the start) of a Poisson process at ``rate``; all 0 for ``inf``."""
    if math.isinf(rate) or count == 0:
        return np.zeros(count)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=count)
    gaps[0] = 0.0
    return np.cumsum(gaps)


async def _run_all(
    client: httpx.AsyncClient,
    ctx: RequestContext,
    bodies: list[dict],
    samples: list[SampleRequest],
    times: np.ndarray,
    concurrency: int | None,
    progress: tqdm | None = None,
) -> list[RequestOutput]:
    semaphore = asyncio.Semaphore(concurrency) if concurrency else None

    async def one(index: int) -> RequestOutput:
        if semaphore is None:
            output = await send_request(client, ctx, bodies[index], samples[index])
        else:
            async with semaphore:
                output = await send_request(client, ctx, bodies[index], samples[index])
        if progress is not None:
            progress.update(1)
        return output

    loop = asyncio.get_running_loop()
    tasks = []
    for index, at in enumerate(times):
        delay = ctx.run_start + float(at) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(index)))
    return list(await asyncio.gather(*tasks))


async def _warm_up(
    client: httpx.AsyncClient, ctx: RequestContext, config: BenchConfig, model: str, samples
) -> None:
    picked = [samples[i % len(samples)] for i in range(config.warmup)]
    bodies = [build_payload(config, model, s) for s in picked]
    log.info("warming up with %d requests", len(picked))
    ctx.run_start = time.perf_counter()
    outputs = await _run_all(client, ctx, bodies, picked, np.zeros(len(picked)), config.max_concurrency)
    failed = [o for o in outputs if not o.success]
    if failed:
        log.warning("%d of %d warm-up requests failed; first: %s", len(failed), len(outputs), failed[0].error)


def _headers(config: BenchConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


async def run_benchmark(config: BenchConfig) -> BenchResult:
    """Runs the benchmark that ``config`` describes and returns its measurements.

    Raises ValueError/FileNotFoundError for a bad configuration or dataset, and RuntimeError or
    httpx.HTTPError when the model list cannot be fetched; failed benchmark requests never raise.
    """
    config.validate()
    tokenizer = load_tokenizer(config.tokenizer)
    samples = load_dataset(
        config.dataset,
        config.num_prompts,
        tokenizer,
        config.dataset_path,
        config.input_len,
        config.output_len,
        config.seed,
    )
    base_url = config.base_url.rstrip("/")
    headers = _headers(config)
    limits = httpx.Limits(
        max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency
    )
    timeout = httpx.Timeout(config.timeout_s, pool=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        model = config.model or await fetch_model(client, base_url, headers)
        chat = config.endpoint == "/v1/chat/completions"
        ctx = RequestContext(base_url + config.endpoint, headers, chat, tokenizer, config.timeout_s)
        if config.warmup:
            await _warm_up(client, ctx, config, model, samples)
        bodies = [build_payload(config, model, s) for s in samples]
        times = arrival_times(len(samples), config.request_rate, config.seed)
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        log.info("benchmarking %s (%s) with %d requests", ctx.url, model, len(samples))
        with tqdm(
            total=len(samples), file=sys.stderr, disable=not config.show_progress, desc="requests"
        ) as bar:
            ctx.run_start = time.perf_counter()
            outputs = await _run_all(client, ctx, bodies, samples, times, config.max_concurrency, bar)
            duration = time.perf_counter() - ctx.run_start
    metrics = compute_metrics(outputs, duration, config.goodput)
    return BenchResult(config, model, metrics, outputs, started_at)


def build_parser(prog: str = "pdmesh bench serve") -> argparse.ArgumentParser:
    """The command line, with vLLM ``bench serve``'s flag names."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument(
        "--base-url", metavar="URL", default="http://127.0.0.1:8000", help="server root (default %(default)s)"
    )
    p.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    p.add_argument(
        "--model", metavar="NAME", default=None, help="model name (default: the first id of GET /v1/models)"
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        default=None,
        help="Hugging Face directory with tokenizer.json to count tokens",
    )
    p.add_argument("--dataset", "--dataset-name", dest="dataset", default="random", choices=DATASETS)
    p.add_argument("--dataset-path", metavar="FILE", default=None, help="ShareGPT JSON or GSM8K JSONL file")
    p.add_argument(
        "--num-prompts", metavar="N", type=int, default=1000, help="requests to measure (default 1000)"
    )
    p.add_argument(
        "--request-rate",
        metavar="RPS",
        type=float,
        default=math.inf,
        help="requests/s, Poisson (default inf: at once)",
    )
    p.add_argument(
        "--max-concurrency",
        metavar="N",
        type=int,
        default=None,
        help="most requests in flight (default no limit)",
    )
    p.add_argument(
        "--input-len",
        "--random-input-len",
        dest="input_len",
        metavar="N",
        type=int,
        default=None,
        help="random prompts' tokens (default 1024)",
    )
    p.add_argument(
        "--output-len",
        "--random-output-len",
        dest="output_len",
        metavar="N",
        type=int,
        default=None,
        help="max_tokens (random: default 128; others: the dataset's reply length)",
    )
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --output-len tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    p.add_argument("--warmup", metavar="N", type=int, default=0, help="unmeasured requests sent first")
    p.add_argument(
        "--goodput", nargs="+", default=None, metavar="NAME:MS", help="SLOs: ttft:MS tpot:MS e2el:MS"
    )
    p.add_argument("--seed", type=int, default=0, help="dataset and arrival seed")
    p.add_argument(
        "--json",
        dest="json_path",
        metavar="FILE",
        type=Path,
        default=None,
        help="write the results as JSON here",
    )
    p.add_argument(
        "--plot",
        dest="plot_path",
        metavar="FILE.png",
        type=Path,
        default=None,
        help="write latency/throughput plots (PNG)",
    )
    p.add_argument(
        "--timeout",
        dest="timeout_s",
        metavar="S",
        type=float,
        default=600.0,
        help="per-request limit, s (default 600)",
    )
    p.add_argument("--api-key", metavar="KEY", default=None, help="sent as a bearer token")
    p.add_argument("--disable-tqdm", dest="show_progress", action="store_false", help="no progress bar")
    add_mindie_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig of parsed arguments (each flag's ``dest`` is the field's name)."""
    if hasattr(args, "m_http"):
        apply_mindie_flags(args)
    values = {f.name: getattr(args, f.name) for f in fields(BenchConfig) if hasattr(args, f.name)}
    return BenchConfig(**{**values, "goodput": parse_goodput(args.goodput)})


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; 0 when at least one request succeeded, 1 when none did, 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        result = asyncio.run(run_benchmark(config))
    except (ValueError, FileNotFoundError, RuntimeError, httpx.HTTPError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    print(report.format_table(result))
    try:
        if args.json_path is not None:
            report.write_json(result, args.json_path)
        if args.plot_path is not None:
            report.write_plot(result, args.plot_path)
    except (OSError, MissingExtra) as exc:
        print(f"{parser.prog}: cannot write the report: {exc}", file=sys.stderr)
        return 2
    return 0 if result.metrics.completed else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
