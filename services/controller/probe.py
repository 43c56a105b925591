"""Active health checks: the controller asks each instance's standard gRPC health service.

Heartbeats say the instance's membership loop runs; the probe says its gRPC server answers and
reports SERVING. A probe that fails (unreachable, timeout, NOT_SERVING) for ``suspect_after_s`` makes
the instance suspect, for ``dead_after_s`` dead (``Membership.sweep``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from pdmesh.rpc.client import check_health, open_channel
from services.controller.membership import Membership

log = logging.getLogger(__name__)


class HealthProber:
    """Probes every member once per ``interval_s`` over cached channels."""

    def __init__(self, membership: Membership, interval_s: float, timeout_s: float | None = None) -> None:
        self.membership = membership
        self.interval_s = interval_s
        self.timeout_s = timeout_s if timeout_s is not None else max(0.5, min(2.0, interval_s))
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def probe_once(self) -> dict[str, bool]:
        """Probes every member concurrently; returns id -> SERVING."""
        members = self.membership.instances()
        results = await asyncio.gather(*(self._probe(i.address) for i in members))
        outcome = {}
        for info, ok in zip(members, results, strict=True):
            self.membership.probe_result(info.instance_id, ok)
            outcome[info.instance_id] = ok
            if not ok:
                log.debug("health probe of %s at %s failed", info.instance_id, info.address)
        await self._close_unused({i.address for i in members})
        return outcome

    async def _probe(self, address: str) -> bool:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address)
        return await check_health(channel, timeout_s=self.timeout_s)

    async def _close_unused(self, addresses: set[str]) -> None:
        for address in set(self._channels) - addresses:
            await self._channels.pop(address).close()

    async def run_forever(self, is_active: Callable[[], bool]) -> None:
        """Probes while this controller is active."""
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                if not is_active():
                    continue
                try:
                    await self.probe_once()
                except Exception:  # noqa: BLE001 - the loop must outlive any one bad round
                    log.exception("health probes failed")
        finally:
            await self.close()

    async def close(self) -> None:
        """Closes the probe channels (a failure to close one is logged, not raised: we are stopping)."""
        channels, self._channels = dict(self._channels), {}
        for address, channel in channels.items():
            try:
                await channel.close()
            except Exception as exc:  # noqa: BLE001 - stopping: the rest must still close
                log.debug("closing the probe channel to %s failed: %r", address, exc)
