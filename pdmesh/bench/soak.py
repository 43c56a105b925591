"""``pdmesh bench soak``: a PD stack under steady load while a random worker is killed every N seconds.

It starts its own stack (``LocalStack`` with worker restarts on, as ``pdmesh up`` runs it), sends real
OpenAI requests (chat and text completions, half of them streamed) as a Poisson process at ``--rate``
for ``--duration`` seconds, SIGKILLs a random worker every ``--kill-every`` seconds, then lets the
stack settle and prints ONE JSON object. It exits 1 when an invariant fails, 2 on bad flags or a stack
that does not start. The invariants:

* every request completes, or gets a clear 503 while some role had no serving instance (a "gap",
  see ``soak_monitor.HealthMonitor``; a request is justified when its lifetime overlaps a gap widened by
  two controller polls). A stream that breaks without an error event is judged the same way; any other
  5xx (HTTP status or a mid-stream error event), unjustified 503 or other error is a failure;
* the RSS of every service process (Redis included) grows by at most ``--rss-limit`` (10%) over its
  value at the end of its warm-up, judged per process lifetime (a restarted worker starts a lifetime of
  its own with its own warm-up; one too short to sample for another warm-up's length is not judged);
* after the load stops and every worker is back, within ``idle_bound_s`` (the longest a KV handle key
  can live after its last write, max(KV lease, released-handle TTL), plus the prefill reaper's period,
  two heartbeats and two polls) every worker reports all KV blocks free and no ``pdmesh:kv:*`` key is
  left in Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import httpx

from pdmesh.bench.args import key_value
from pdmesh.bench.host import host_info
from pdmesh.bench.soak_load import LoadSpec, load, summarize
from pdmesh.bench.soak_monitor import (
    HealthMonitor,
    RssMonitor,
    kv_index_entries,
    kv_leftovers,
    redis_pid,
)
from pdmesh.config import ControllerConfig
from pdmesh.kv.registry import RELEASED_TTL_S
from pdmesh.logs import setup_logging

log = logging.getLogger(__name__)

REAPER_INTERVAL_S = 0.5  # the prefill worker's KV reaper period (PrefillHandler.reap_forever)
HEARTBEAT_S = ControllerConfig.model_fields["heartbeat_interval_s"].default
DEFAULT_MODEL_DIR = Path(".pdmesh/models/qwen3-small")


@dataclass
class SoakConfig:
    """One soak run; ``warmup_s`` None: a fifth of the duration, at least 10 s and at most 60 s."""

    model: Path | None = None
    prefill: int = 2
    decode: int = 2
    duration_s: float = 60.0
    rate: float = 2.0
    kill_every_s: float = 15.0
    seed: int = 0
    warmup_s: float | None = None
    kv_lease_s: float = 10.0
    timeout_s: float = 60.0
    rss_limit: float = 0.10
    poll_s: float = 0.2
    max_tokens: int = 32
    log_dir: Path = Path(".pdmesh/logs/soak")
    worker_args: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        checks = [
            (self.prefill >= 1 and self.decode >= 1, "--prefill and --decode must be >= 1"),
            (self.duration_s > 0, "--duration must be positive"),
            (self.rate > 0, "--rate must be positive"),
            (self.kill_every_s >= 0, "--kill-every must be >= 0 (0: no kills)"),
            (self.kv_lease_s > 0, "--kv-lease-s must be positive"),
            (self.timeout_s > 0, "--timeout must be positive"),
            (0 < self.rss_limit, "--rss-limit must be positive"),
            (self.max_tokens >= 1, "--max-tokens must be >= 1"),
            (
                self.warmup_s is None or 0 <= self.warmup_s < self.duration_s,
                "--warmup must be in [0, duration)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(60.0, max(10.0, self.duration_s / 5))

    @property
    def idle_bound_s(self) -> float:
        return max(self.kv_lease_s, RELEASED_TTL_S) + REAPER_INTERVAL_S + 2 * HEARTBEAT_S + 2 * self.poll_s

    def load_spec(self) -> LoadSpec:
        return LoadSpec(self.rate, self.duration_s, self.seed, self.max_tokens, self.timeout_s)

    def params(self) -> dict[str, Any]:
        """The run's parameters for the JSON report."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out.update(model=str(self.model) if self.model else None, log_dir=str(self.log_dir))
        out.update(warmup_s=self.warmup, idle_bound_s=round(self.idle_bound_s, 2))
        return out


# -------------------------------------------------------------------------------------------- the run


async def kill_loop(stack, cfg: SoakConfig, health: HealthMonitor, kills: list[dict], t0: float) -> None:
    """SIGKILLs a random worker every ``cfg.kill_every_s`` seconds of the load."""
    rng = random.Random(cfg.seed + 1)
    workers = _workers(stack)
    for k in range(1, int(cfg.duration_s / cfg.kill_every_s) + 1):
        due = k * cfg.kill_every_s
        if due >= cfg.duration_s:
            return  # the kills belong to the load: none while the last requests finish
        await asyncio.sleep(max(0.0, t0 + due - time.monotonic()))
        name = rng.choice(workers)
        pid = stack.pid(name)
        stack.kill(name, signal.SIGKILL)
        health.kills[name] = time.time()  # after the kill: a later heartbeat is the new process's
        kills.append({"at_s": round(time.monotonic() - t0, 2), "worker": name, "pid": pid})
        log.warning("killed %s (pid %d) at %.1fs", name, pid, time.monotonic() - t0)


async def settle(stack, cfg: SoakConfig, health: HealthMonitor) -> dict[str, Any]:
    """After the load: waits for every worker to serve again, then for KV to be idle within the bound."""
    workers = set(_workers(stack))
    load_end = time.monotonic()
    back_limit = stack.spec.startup_timeout_s + stack.spec.restart_backoff_max_s
    while not workers <= {i.instance_id for i in health.latest if health.serving(i)}:
        if time.monotonic() - load_end > back_limit:
            return {
                "workers_back": False,
                "kv_idle": False,
                "why": f"workers not all back in {back_limit:.0f}s",
            }
        await asyncio.sleep(cfg.poll_s)
    back = time.monotonic()
    keys, shown, busy = 0, [], []
    while True:
        keys, shown = await kv_leftovers(stack.redis_url)
        busy = [
            {
                "worker": i.instance_id,
                "free": i.load.free_blocks,
                "total": i.load.total_blocks,
                "running": i.load.running,
            }
            for i in health.latest
            if i.load.total_blocks == 0 or i.load.free_blocks < i.load.total_blocks or i.load.running
        ]
        waited = time.monotonic() - back
        if (not keys and not busy) or waited > cfg.idle_bound_s:
            break
        await asyncio.sleep(cfg.poll_s)
    return {
        "workers_back": True,
        "workers_back_s": round(back - load_end, 2),
        "kv_idle": not keys and not busy,
        "idle_after_s": round(waited, 2),
        "idle_bound_s": round(cfg.idle_bound_s, 2),
        "kv_keys_left": keys,
        "kv_keys_shown": shown,
        "busy_workers": busy,
        "kv_index_entries": await kv_index_entries(stack.redis_url),  # informational: pruned lazily
    }


def invariants(requests: dict, rss: dict, end: dict) -> list[str]:
    """The names of the invariants that failed (empty: the soak passed)."""
    failed = [
        name
        for name, ok in (
            ("some requests completed", requests["completed"] > 0),
            ("no unjustified 503", requests["unavailable_unjustified"] == 0),
            ("no other 5xx", requests["other_5xx"] == 0),
            ("no unjustified broken stream", requests["broken_streams_unjustified"] == 0),
            ("no other error", requests["other_errors"] == 0),
            ("RSS flat after warm-up", rss["ok"]),
            ("every worker back", end["workers_back"]),
            ("KV idle and no pdmesh:kv:* key left within the bound", end["kv_idle"]),
        )
        if not ok
    ]
    return failed


def _workers(stack) -> list[str]:
    return [name for name in stack.processes if name.startswith(("prefill-", "decode-"))]


async def soak(stack, cfg: SoakConfig) -> dict[str, Any]:
    """Runs the load and the kills against a started stack, lets it settle, and returns the report."""
    t0 = time.monotonic()
    health = HealthMonitor(stack.controller_address, cfg.poll_s, t0)
    rpid = await redis_pid(stack.redis_url)

    def pids() -> dict[str, int]:
        current = {name: stack.pid(name) for name in list(stack.processes)}
        return current | ({"redis": rpid} if rpid else {})

    rss = RssMonitor(pids, t0)
    monitors = [asyncio.create_task(health.run()), asyncio.create_task(rss.run())]
    kills: list[dict] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    try:
        async with httpx.AsyncClient(timeout=cfg.timeout_s, limits=limits) as client:
            models = await client.get(f"{stack.base_url}/v1/models")
            model = models.raise_for_status().json()["data"][0]["id"]
            killer = (
                asyncio.create_task(kill_loop(stack, cfg, health, kills, t0)) if cfg.kill_every_s else None
            )
            records = await load(client, stack.base_url, model, cfg.load_spec(), t0)
            if killer is not None:
                await killer  # its last kill is due before the load's end: it is done or nearly
        load_end = time.monotonic() - t0
        end = await settle(stack, cfg, health)
        rss.sample()
    finally:
        for task in monitors:
            task.cancel()
        await asyncio.gather(*monitors, return_exceptions=True)
    requests = summarize(records, health, slack_s=2 * cfg.poll_s)
    rss_report = rss.report(cfg.warmup, cfg.rss_limit, until=load_end)
    failed = invariants(requests, rss_report, end)
    return {
        "ok": not failed,
        "failed_invariants": failed,
        "requests": requests,
        "kills": kills,
        "restarts": [
            {"worker": r.name, "old_pid": r.old_pid, "exit_code": r.exit_code, "new_pid": r.new_pid}
            for r in stack.restarts
        ],
        "no_serving_instance": {
            "gaps_s": {
                role: [[round(a, 2), round(b, 2)] for a, b in g]
                for role, g in health.closed_gaps(load_end).items()
            },
            "seconds": {
                role: round(sum(b - a for a, b in g), 2) for role, g in health.closed_gaps(load_end).items()
            },
            "controller_polls": health.polls,
            "controller_poll_errors": health.errors,
        },
        "rss": rss_report,
        "end": end,
        "load_s": round(load_end, 2),
    }


def run(cfg: SoakConfig) -> dict[str, Any]:
    """Starts the stack, soaks it and stops it (bounded, also on failure); returns the full report."""
    from pdmesh.bench.compare import resolve_model
    from pdmesh.launcher import LocalStack, StackSpec

    model_dir = resolve_model(cfg.model)
    workers = cfg.prefill + cfg.decode
    # every worker shares this machine's cores: one worker's math threads must not starve the others
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))
    spec = StackSpec(
        model_dir=model_dir,
        prefill=cfg.prefill,
        decode=cfg.decode,
        http_port=0,
        log_dir=cfg.log_dir,
        worker_args={"kv-lease-s": str(cfg.kv_lease_s), **cfg.worker_args},
        restart_workers=True,
    )
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    stack = LocalStack(spec)
    stack.start()
    try:
        report = asyncio.run(soak(stack, cfg))
    finally:
        stack.stop()
    return {
        "started_at": started_at,
        "model": str(model_dir),
        **host_info(),
        "params": cfg.params(),
        **report,
    }


# -------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pdmesh bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", type=Path, default=None, help=f"checkpoint (default: writes {DEFAULT_MODEL_DIR})"
    )
    p.add_argument("--prefill", type=int, default=2, help="prefill workers (default 2)")
    p.add_argument("--decode", type=int, default=2, help="decode workers (default 2)")
    p.add_argument("--duration", dest="duration_s", type=float, default=60.0, help="seconds of load (60)")
    p.add_argument("--rate", type=float, default=2.0, help="requests per second, Poisson (2)")
    p.add_argument(
        "--kill-every", dest="kill_every_s", type=float, default=15.0, help="s between kills (15; 0: none)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the requests and the choice of victims")
    p.add_argument(
        "--warmup", dest="warmup_s", type=float, default=None, help="RSS warm-up, s (duration/5, 10..60)"
    )
    p.add_argument("--kv-lease-s", type=float, default=10.0, help="the workers' KV lease (10)")
    p.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens of a request (32)")
    p.add_argument("--timeout", dest="timeout_s", type=float, default=60.0, help="a request's limit, s (60)")
    p.add_argument("--rss-limit", type=float, default=0.10, help="allowed RSS growth after warm-up (0.10)")
    p.add_argument("--worker-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--log-dir", type=Path, default=Path(".pdmesh/logs/soak"), help="the services' logs")
    p.add_argument("--json-out", type=Path, default=None, metavar="FILE", help="also write the JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when every invariant held, 1 when one failed, 2 on bad flags or a failed start."""
    setup_logging("WARNING")  # stdout is the JSON's alone; restarts and kills are logged on stderr
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    json_out = args.pop("json_out")
    args["worker_args"] = dict(args.pop("worker_arg"))
    cfg = SoakConfig(**args)
    try:
        cfg.validate()
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
        report = run(cfg)
    except (ValueError, RuntimeError, TimeoutError, OSError, httpx.HTTPError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if json_out is not None:
        try:
            json_out.write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"{parser.prog}: cannot write {json_out}: {exc}", file=sys.stderr)
            return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
