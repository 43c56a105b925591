"""`pdmesh ctl top`: the live view of the mesh in a terminal, as the coordinator's /dashboard shows it.

Each frame holds the controller's ListInstances (every instance with role, state, running and
waiting requests, free and total KV blocks; the ratio and the measured demand) and, given the
coordinator's HTTP URL, the latency percentiles and request rate of its ``GET /dashboard/data``.
A source that fails after the first frame is shown as failing in the frame and asked again at the
next refresh: the view is most useful while instances die, flip or take over.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import httpx

from pdmesh.rpc.convert_cluster import instance_from_proto

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: each frame replaces the last on a terminal
LATENCY_KEYS = (
    ("TTFT", ("ttft_p50", "ttft_p90", "ttft_p99")),
    ("ITL", ("itl_p50", "itl_p99")),
    ("E2E", ("e2e_p50", "e2e_p99")),
)
MAX_INTERVAL_S = 3600.0


class TopError(Exception):
    """A one-line error for the user, with the exit code (2: bad input, 1: a source failed)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def parse_interval(text: str) -> float:
    """``--interval-s``: seconds between frames, > 0 and at most an hour."""
    try:
        value = float(text)
    except ValueError:
        raise TopError(f"--interval-s: not a number: {text!r}", 2) from None
    if not math.isfinite(value) or value <= 0 or value > MAX_INTERVAL_S:
        raise TopError(f"--interval-s: {text} is out of range (want > 0 and <= {MAX_INTERVAL_S:g})", 2)
    return value


def check_coordinator_url(url: str) -> str:
    """``--coordinator``: the coordinator's HTTP base URL (http:// or https://), no trailing slash."""
    parsed = httpx.URL(url) if url.startswith(("http://", "https://")) else None
    if parsed is None or not parsed.host:
        raise TopError(f"--coordinator: {url!r} is not an http:// or https:// URL", 2)
    return url.rstrip("/")


async def fetch_dashboard(client: httpx.AsyncClient, base_url: str) -> dict[str, Any]:
    """The coordinator's ``GET /dashboard/data``; TopError names the URL and what went wrong."""
    url = f"{base_url}/dashboard/data"
    try:
        response = await client.get(url)
    except httpx.HTTPError as exc:
        raise TopError(f"GET {url}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise TopError(f"GET {url}: HTTP {response.status_code}")
    try:
        data = response.json()
    except ValueError:
        raise TopError(f"GET {url}: not JSON") from None
    if not isinstance(data, dict):
        raise TopError(f"GET {url}: not a JSON object")
    return data


def _seconds(value: Any) -> str:
    """Milliseconds, a tenth of one below 10 ms (a tiny model's inter-token gaps)."""
    if not isinstance(value, int | float):
        return "-"
    ms = value * 1000
    return f"{ms:.1f}ms" if ms < 10 else f"{ms:.0f}ms"


def coordinator_lines(data: dict[str, Any]) -> list[str]:
    """The coordinator's part of a frame: request rate and latency percentiles (over its last 60 s)."""
    latency = data.get("latency") or {}
    rate = data.get("requests_per_s")
    parts = [f"requests/s {rate:.2f}" if isinstance(rate, int | float) else "requests/s -"]
    for label, keys in LATENCY_KEYS:
        figures = " ".join(f"{k.rsplit('_', 1)[1]} {_seconds(latency.get(k))}" for k in keys)
        parts.append(f"{label} {figures}")
    return ["   ".join(parts)]


def instance_lines(reply) -> list[str]:
    """The controller's part: the header, the ratio and demand, one line per instance."""
    lines = [
        f"controller {reply.active or '-'} (fencing token {reply.fencing_token})   ratio {reply.ratio or '-'}",
    ]
    if reply.demand:
        lines.append(f"demand: {reply.demand}")
    counts: dict[str, int] = {}
    rows = [
        f"{'ID':<24} {'ROLE':<8} {'STATE':<9} {'RUN':>4} {'WAIT':>5} {'KV FREE/TOTAL':>15} {'KV USED':>7}"
    ]
    for msg in sorted(reply.instances, key=lambda m: (m.instance_id,)):
        i = instance_from_proto(msg)
        counts[f"{i.role.value} {i.state.value}"] = counts.get(f"{i.role.value} {i.state.value}", 0) + 1
        load = i.load
        if load.unknown:
            figures = f"{'?':>4} {'?':>5} {'?':>15} {'?':>7}"
        else:
            used = 1 - load.free_blocks / load.total_blocks if load.total_blocks else 0.0
            kv = f"{load.free_blocks}/{load.total_blocks}"
            figures = f"{load.running:>4} {load.waiting:>5} {kv:>15} {used:>7.0%}"
        rows.append(f"{i.instance_id:<24} {i.role.value:<8} {i.state.value:<9} {figures}")
    summary = ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "no instances"
    return [*lines, f"instances: {summary}", *rows]


def render_frame(reply, dashboard: dict[str, Any] | None, errors: list[str], now: float) -> str:
    """One frame; ``reply`` is a ListInstancesResponse (None when the controller failed)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    lines = [f"pdmesh top   {stamp}"]
    if dashboard is not None:
        lines += coordinator_lines(dashboard)
    if reply is not None:
        lines += instance_lines(reply)
    lines += [f"error: {e}" for e in errors]
    return "\n".join(lines)


async def run_top(
    list_instances: Callable[[], Awaitable[Any]],
    coordinator: str | None,
    interval_s: float,
    once: bool,
    out: TextIO = sys.stdout,
) -> int:
    """Prints frames every ``interval_s`` (one with ``once``); TopError when the first frame fails."""
    clear = CLEAR if out.isatty() and not once else ""
    first = True
    async with httpx.AsyncClient(timeout=max(interval_s, 5.0)) as client:
        while True:
            reply, dashboard, errors = None, None, []
            try:
                reply = await list_instances()
            except Exception as exc:  # the controller's own error, one line (ctl's CtlError)
                if first:
                    raise TopError(str(exc), getattr(exc, "code", 1)) from None
                errors.append(str(exc))
            if coordinator:
                try:
                    dashboard = await fetch_dashboard(client, coordinator)
                except TopError as exc:
                    if first:
                        raise
                    errors.append(str(exc))
            out.write(clear + render_frame(reply, dashboard, errors, time.time()) + "\n")
            out.flush()
            if once:
                return 0
            first = False
            await asyncio.sleep(interval_s)
