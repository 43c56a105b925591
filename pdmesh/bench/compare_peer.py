"""A peer of ``pdmesh bench compare --peer-url URL``: any OpenAI-compatible server (vLLM, SGLang, another
pdmesh) measured with the same ``bench serve`` workload after pdmesh's deployments.

The peer is checked before anything starts (``GET /v1/models``): an unreachable URL, an error answer
or a ``--model-name`` it does not serve is a one-line error. The workload's prompts are made with the
compared checkpoint's tokenizer, so the peer should serve the same checkpoint (under any name).
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

import httpx

from pdmesh.bench.request import error_message
from pdmesh.bench.serve import BenchConfig, BenchResult, run_benchmark

CHECK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Peer:
    """A server to compare with: its name in the report, base URL, model name and API key."""

    name: str
    url: str
    model: str
    api_key: str | None = None

    def deployment(self) -> dict[str, Any]:
        """What the report says of this side where pdmesh's sides describe their deployment."""
        return {"mode": "peer", "label": self.name, "url": self.url, "worker_cpus": None}


def _models(url: str, api_key: str | None) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=CHECK_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise ValueError(f"--peer-url {url}: cannot reach it ({type(exc).__name__}: {exc})") from None
    if response.status_code != 200:
        detail = error_message(response.content)
        raise ValueError(f"--peer-url {url}: GET /v1/models answered {response.status_code}: {detail}")
    try:
        return [str(m["id"]) for m in response.json().get("data") or []]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"--peer-url {url}: GET /v1/models did not answer a model list") from None


def check_peer(url: str, name: str | None, model: str | None, api_key: str | None) -> Peer:
    """The peer at ``url``, once it answers its model list (``model``: the name to ask for, by
    default the first it lists). Raises ValueError naming the problem."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--peer-url must be an http:// or https:// URL, not {url!r}")
    url = url.rstrip("/").removesuffix("/v1")
    if name is not None and (not name or name in ("pd", "colocated")):
        raise ValueError(f"--peer-name must be a non-empty name other than pd and colocated, not {name!r}")
    served = _models(url, api_key)
    if not served:
        raise ValueError(f"--peer-url {url}: GET /v1/models lists no model")
    if model is not None and model not in served:
        raise ValueError(f"--model-name {model!r} is not served at {url} (it serves {', '.join(served)})")
    return Peer(name or "peer", url, model or served[0], api_key)


def run_peer(peer: Peer, config: BenchConfig) -> BenchResult:
    """The workload of ``config`` against ``peer``."""
    config = dataclasses.replace(config, base_url=peer.url, model=peer.model, api_key=peer.api_key)
    return asyncio.run(run_benchmark(config))
