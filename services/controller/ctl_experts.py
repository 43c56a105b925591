"""``pdmesh ctl experts METRICS``: a parallel MoE worker's expert loads, read from its ``/metrics``.

Per MoE layer: the ep ranks' imbalance (max / mean) and loads over the EPLB window, then the
hottest experts with their window tokens, total tokens and replicas (``services.worker.expert_metrics``).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

FETCH_TIMEOUT_S = 10.0
HOTTEST = 8


class ExpertsError(Exception):
    """The metrics could not be read or hold no expert series; the message says which."""


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
