"""What ``pdmesh bench soak`` watches while it runs: role health, process memory, KV leftovers, the CPU.

* ``HealthMonitor`` polls the controller's ListInstances and records, per role, the intervals when no
  instance of that role was serving. An instance serves when the controller lists it HEALTHY and, if
  the soak killed it, it has heartbeated since the kill: the controller only notices a death after
  ``suspect_after_s``, and requests sent to a dead instance in between are what this must explain.
* ``RssMonitor`` reads ``VmRSS`` from ``/proc/<pid>/status`` of every service process once a second,
  keyed by (service, pid), so that a restarted worker's samples form a lifetime of their own.
* ``kv_leftovers`` lists the ``pdmesh:kv:*`` handle keys still in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis

from pdmesh.rpc.client import open_channel
from pdmesh.v1 import common_pb2, controller_pb2, controller_pb2_grpc

log = logging.getLogger(__name__)

ROLES = {common_pb2.ROLE_PREFILL: "prefill", common_pb2.ROLE_DECODE: "decode"}


@dataclass
class HealthMonitor:
    """Polls the controller; ``gaps[role]`` lists [start, end] seconds (run clock) with no serving instance."""

    controller: str
    poll_s: float
    t0: float  # time.monotonic() of the run's start; intervals are seconds since then
    kills: dict[str, float] = field(default_factory=dict)  # instance id -> time.time() of its last kill
    gaps: dict[str, list[list[float]]] = field(default_factory=lambda: {r: [] for r in ROLES.values()})
    errors: int = 0  # polls the controller did not answer
    polls: int = 0
    latest: list = field(default_factory=list)  # the last answered ListInstances' instances

    def serving(self, instance) -> bool:
        killed = self.kills.get(instance.instance_id)
        fresh = killed is None or instance.last_heartbeat > killed
        return instance.state == common_pb2.INSTANCE_STATE_HEALTHY and fresh

    def _record(self, instances, now: float) -> None:
        for role_id, role in ROLES.items():
            up = any(i.role == role_id and self.serving(i) for i in instances)
            gaps = self.gaps[role]
            open_gap = bool(gaps) and gaps[-1][1] < 0
            if not up and not open_gap:
                gaps.append([now, -1.0])
            elif up and open_gap:
                gaps[-1][1] = now

    async def run(self) -> None:
        """Polls until cancelled."""
        async with open_channel(self.controller) as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            while True:
                self.polls += 1
                try:
                    reply = await stub.ListInstances(controller_pb2.ListInstancesRequest(), timeout=2.0)
                except grpc.aio.AioRpcError as exc:
                    self.errors += 1
                    log.warning("ListInstances failed: %s", exc.code().name)
                else:
                    self.latest = list(reply.instances)
                    self._record(self.latest, time.monotonic() - self.t0)
                await asyncio.sleep(self.poll_s)

    def closed_gaps(self, now: float) -> dict[str, list[list[float]]]:
        """The gaps with any still open ended at ``now``."""
        return {r: [[a, now if b < 0 else b] for a, b in g] for r, g in self.gaps.items()}

    def justifies(self, start: float, end: float, slack_s: float) -> bool:
        """Whether a request that ran over [start, end] overlapped a gap (widened by ``slack_s``)."""
        for gaps in self.closed_gaps(end).values():
            for a, b in gaps:
                if start <= b + slack_s and a - slack_s <= end:
                    return True
        return False


def read_rss_kib(pid: int) -> int | None:
    """VmRSS of a live process in KiB; None when it is gone (or a zombie, which has none)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class RssMonitor:
    """Samples every service's RSS; ``samples[(service, pid)]`` is a list of (seconds, KiB)."""

    pids: Any  # () -> {service: pid}
    t0: float
    period_s: float = 1.0
    samples: dict[tuple[str, int], list[tuple[float, int]]] = field(default_factory=dict)

    def sample(self) -> None:
        now = time.monotonic() - self.t0
        for service, pid in self.pids().items():
            rss = read_rss_kib(pid)
            if rss is not None:
                self.samples.setdefault((service, pid), []).append((now, rss))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.period_s)

    def report(self, warmup_s: float, limit: float, until: float) -> dict[str, Any]:
        """Per process lifetime: RSS at the end of its warm-up (the baseline), the highest and lowest after,
        and the growth max/baseline - 1. A lifetime is judged (growth <= ``limit``) when it was sampled
        for at least ``warmup_s`` after its warm-up, up to ``until`` (the end of the load)."""
        lifetimes = []
        for (service, pid), samples in self.samples.items():
            first = samples[0][0]
            after = [(t, kib) for t, kib in samples if first + warmup_s <= t <= until]
            judged = bool(after) and after[-1][0] - after[0][0] >= warmup_s
            entry: dict[str, Any] = {"service": service, "pid": pid, "from_s": round(first, 1)}
            entry["to_s"] = round(samples[-1][0], 1)
            entry["judged"] = judged
            if after:
                base, top, low = after[0][1], max(k for _, k in after), min(k for _, k in after)
                entry.update(
                    baseline_mib=round(base / 1024, 1),
                    max_mib=round(top / 1024, 1),
                    min_mib=round(low / 1024, 1),
                    growth=round(top / base - 1, 4),
                )
                entry["ok"] = not judged or top / base - 1 <= limit
            lifetimes.append(entry)
        judged = [e for e in lifetimes if e["judged"]]
        return {
            "warmup_s": warmup_s,
            "limit": limit,
            "judged": len(judged),
            "max_growth": max((e["growth"] for e in judged), default=None),
            "ok": all(e["ok"] for e in judged) and bool(judged),
            "lifetimes": sorted(lifetimes, key=lambda e: (e["service"], e["from_s"])),
        }


async def kv_leftovers(redis_url: str, limit: int = 20) -> tuple[int, list[dict[str, Any]]]:
    """How many ``pdmesh:kv:*`` keys Redis holds, and up to ``limit`` of them with their state and TTL."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = [key async for key in client.scan_iter("pdmesh:kv:*")]
        shown = []
        for key in keys[:limit]:
            fields = await client.hgetall(key) if await client.type(key) == "hash" else {}
            shown.append(
                {
                    "key": key,
                    "ttl_ms": await client.pttl(key),
                    "state": fields.get("state"),
                    "prefill_instance": fields.get("prefill_instance"),
                    "reason": fields.get("reason"),
                }
            )
        return len(keys), shown
    finally:
        await client.aclose()


async def kv_index_entries(redis_url: str) -> int:
    """Handle ids still listed in the prefill instances' ``pdmesh:kvidx:*`` indexes (pruned lazily)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        return sum([await client.zcard(key) async for key in client.scan_iter("pdmesh:kvidx:*")])
    finally:
        await client.aclose()


async def redis_pid(redis_url: str) -> int | None:
    """The Redis server's pid (``INFO server``), to sample its memory like the services'."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        return int((await client.info("server"))["process_id"])
    except Exception as exc:  # noqa: BLE001 - a missing Redis pid only leaves Redis unsampled
        log.warning("could not read the Redis pid: %s", exc)
        return None
    finally:
        await client.aclose()
