"""`python -m services.coordinator` / `pdmesh coordinator`: run the coordinator."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pdmesh.config import CoordinatorConfig
from pdmesh.logs import setup_logging
from pdmesh.observability import tracing
from pdmesh.rpc.server import serve_until_signal
from pdmesh.security import tls
from pdmesh.settings_cli import add_config_flags, config_from_flags
from services.coordinator.server import create_coordinator


async def _serve(config: CoordinatorConfig) -> None:
    tls.configure(tls.files_from(config))
    tracing.configure("pdmesh-coordinator", config.otlp_traces_endpoint, config.trace_sample_ratio)
    try:
        coordinator = await create_coordinator(config)
        await serve_until_signal(coordinator.grpc, on_stop=coordinator.stop)
    finally:
        await asyncio.to_thread(tracing.shutdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdmesh coordinator", description="the pdmesh coordinator")
    add_config_flags(parser, CoordinatorConfig)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    config = config_from_flags(parser, CoordinatorConfig, args)
    try:
        asyncio.run(_serve(config))
    except (OSError, ValueError) as exc:
        print(f"pdmesh coordinator: {exc}", file=sys.stderr)
        return 1
    return 0
