"""``pdmesh ctl experts [METRICS] [--rebalance WORKER]``: a parallel MoE worker's expert loads, read
from its ``/metrics``, and a rebalance on demand.

Per MoE layer: the ep ranks' imbalance (max / mean) and loads over the EPLB window, then the
hottest experts with their window tokens, total tokens and replicas (``services.worker.expert_metrics``).
``--rebalance WORKER`` (the worker's gRPC address) calls its ``RebalanceExperts``: the leader rank
rebalances between two engine steps, and the imbalance before and after is printed (then the
loads, when METRICS is given too).
"""

from __future__ import annotations

import argparse
import asyncio
import urllib.error
import urllib.request
from collections import defaultdict

import grpc
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.rpc.client import open_channel
from pdmesh.security import tls
from pdmesh.v1 import worker_pb2, worker_pb2_grpc

FETCH_TIMEOUT_S = 10.0
HOTTEST = 8


class ExpertsError(Exception):
    """The metrics could not be read or hold no expert series, or the worker refused the rebalance;
    the message says which, ``code`` is the exit status (2: bad input)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_parser(sub) -> None:
    """The ``experts`` subcommand of ``pdmesh ctl``."""
    parser = sub.add_parser(
        "experts", help="a parallel MoE worker's expert loads (EPLB), rebalance on demand"
    )
    parser.add_argument(
        "metrics", nargs="?", help="the worker's metrics address (host:port or URL; --metrics-port)"
    )
    parser.add_argument(
        "--rebalance",
        metavar="WORKER",
        help="rebalance the worker's experts now; WORKER is its gRPC address (host:port)",
    )


def run(args: argparse.Namespace, tls_files: tls.TlsFiles | None, timeout_s: float) -> str:
    """What ``pdmesh ctl experts`` prints; ExpertsError for what went wrong."""
    if not args.metrics and not args.rebalance:
        raise ExpertsError("give the worker's metrics address, --rebalance WORKER, or both", 2)
    out = []
    if args.rebalance:
        reply = asyncio.run(rebalance(args.rebalance, tls_files, timeout_s))
        out.append(
            f"rebalanced {reply.layers} MoE layers ({reply.changed_layers} with experts moved): imbalance "
            f"{reply.imbalance_before:.3f} -> {reply.imbalance_after:.3f}"
        )
    if args.metrics:
        out.append(experts(args.metrics))
    return "\n".join(out)


async def rebalance(
    address: str, tls_files: tls.TlsFiles | None, timeout_s: float
) -> worker_pb2.RebalanceExpertsResponse:
    """Calls the worker's ``RebalanceExperts``; ExpertsError naming the worker's answer."""
    async with open_channel(address, tls_files) as channel:
        try:
            return await worker_pb2_grpc.WorkerStub(channel).RebalanceExperts(
                worker_pb2.RebalanceExpertsRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            code = 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
            raise ExpertsError(
                f"RebalanceExperts at {address}: {exc.code().name}: {exc.details()}", code
            ) from None


def fetch(address: str, timeout_s: float = FETCH_TIMEOUT_S) -> str:
    url = address if "://" in address else f"http://{address}"
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:  # noqa: S310 - an operator's URL
            return reply.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ExpertsError(f"cannot read {url}: {exc}") from None


def parse(text: str) -> dict[str, dict]:
    """``{instance: {layer: {"imbalance", "ranks": {r: load}, "experts": {e: {...}}}}}``."""
    out: dict[str, dict] = defaultdict(
        lambda: defaultdict(lambda: {"ranks": {}, "experts": defaultdict(dict)})
    )
    fields = {
        "pdmesh_worker_expert_tokens_total": "total",
        "pdmesh_worker_expert_window_tokens": "window",
        "pdmesh_worker_expert_replicas": "replicas",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if "layer" not in labels or "pdmesh_instance" not in labels:
                continue
            layer = out[labels["pdmesh_instance"]][int(labels["layer"])]
            if sample.name in fields:
                layer["experts"][int(labels["expert"])][fields[sample.name]] = sample.value
            elif sample.name == "pdmesh_worker_ep_rank_load":
                layer["ranks"][int(labels["ep_rank"])] = sample.value
            elif sample.name == "pdmesh_worker_ep_rank_imbalance":
                layer["imbalance"] = sample.value
    if not out:
        raise ExpertsError("no expert series there: is it a parallel MoE worker's metrics address?")
    return out


def render(parsed: dict[str, dict]) -> str:
    lines = []
    for instance, layers in sorted(parsed.items()):
        lines.append(f"instance {instance}")
        for index, layer in sorted(layers.items()):
            ranks = " ".join(f"{load:.0f}" for _, load in sorted(layer["ranks"].items()))
            lines.append(
                f"  layer {index}: imbalance {layer.get('imbalance', 1.0):.3f}  ep rank loads [{ranks}]"
            )
            hottest = sorted(layer["experts"].items(), key=lambda kv: -kv[1].get("window", 0))[:HOTTEST]
            for e, v in hottest:
                lines.append(
                    f"    expert {e:4d}  window {v.get('window', 0):8.0f}  total {v.get('total', 0):10.0f}"
                    f"  replicas {v.get('replicas', 1):.0f}"
                )
    return "\n".join(lines)


def experts(address: str) -> str:
    """The rendered view of the worker whose metrics server is at ``address``."""
    return render(parse(fetch(address)))
