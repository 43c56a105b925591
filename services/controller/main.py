"""`python -m services.controller` / `pdmesh controller`: run the controller."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from pdmesh.config import ControllerConfig
from pdmesh.kv.redis_client import check_redis
from pdmesh.kv.registry import KVError, RedisKVRegistry
from pdmesh.logs import setup_logging
from pdmesh.observability import tracing
from pdmesh.rpc.server import serve_until_signal
from pdmesh.security import tls
from pdmesh.settings_cli import add_config_flags, config_from_flags
from services.controller.server import DeadHook, create_controller

log = logging.getLogger(__name__)


def dead_hook(config: ControllerConfig) -> DeadHook | None:
    """When an instance dies, invalidate its KV handles so that decode workers fail fast."""
    if not config.redis_url:
        return None
    registry = RedisKVRegistry(config.redis_url)

    async def invalidate(instance_id: str) -> None:
        try:
            count = await registry.invalidate_instance(instance_id)
        except KVError as exc:
            log.warning("could not invalidate the KV handles of dead instance %s: %s", instance_id, exc)
            return
        log.info("invalidated %d KV handles of dead instance %s", count, instance_id)

    return invalidate


async def _serve(config: ControllerConfig) -> None:
    tls.configure(tls.files_from(config))
    tracing.configure("pdmesh-controller", config.otlp_traces_endpoint, config.trace_sample_ratio)
    try:
        if config.redis_url:  # a wrong password or TLS setting stops the start with one line
            await check_redis(config.redis_url)
        service = await create_controller(config, on_instance_dead=dead_hook(config))
        await serve_until_signal(service.server, on_stop=service.stop)
    finally:
        await asyncio.to_thread(tracing.shutdown)


def parse_args(argv: list[str] | None) -> ControllerConfig:
    """Flags over the environment (PDMESH_CONTROLLER_*); exits 2 with a one-line error on bad values."""
    parser = argparse.ArgumentParser(prog="pdmesh controller", description="the pdmesh controller")
    add_config_flags(parser, ControllerConfig)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    return config_from_flags(parser, ControllerConfig, args)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        asyncio.run(_serve(config))
    except (OSError, ValueError) as exc:
        print(f"pdmesh controller: {exc}", file=sys.stderr)
        return 1
    return 0
