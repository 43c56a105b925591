"""``ChannelCache``: one gRPC channel per peer address, reused across calls and forgotten when the
peer goes away.

Opening a channel per call costs a TCP (and later TLS) handshake each time; a cache that never
forgets grows with every instance that ever lived. Callers ``retain`` the addresses still in use
(say, the instances of the latest cluster view) and ``discard`` a peer whose call found it gone;
the least recently used channel is closed when more than ``max_size`` are open.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable

import grpc

from pdmesh.rpc.client import open_channel

log = logging.getLogger(__name__)


class ChannelCache:
    """Channels by ``host:port``; closing is deferred by ``close_grace_s`` so calls in flight finish."""

    def __init__(self, max_size: int = 256, close_grace_s: float = 30.0) -> None:
        self.max_size = max_size
        self.close_grace_s = close_grace_s
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._retiring: dict[asyncio.Task, grpc.aio.Channel] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def __contains__(self, address: str) -> bool:
        return address in self._channels

    def get(self, address: str) -> grpc.aio.Channel:
        """The channel to ``address`` (opened on first use)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address)
            while len(self._channels) > self.max_size:
                self._retire(*self._channels.popitem(last=False))
        else:
            self._channels.move_to_end(address)
        return channel

    def discard(self, address: str) -> None:
        """Forgets ``address`` (its peer left or its channel failed); the next call opens a new one."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            self._retire(address, channel)

    def retain(self, addresses: Iterable[str]) -> list[str]:
        """Forgets every address not in ``addresses``; returns those forgotten."""
        keep = set(addresses)
        gone = [a for a in self._channels if a not in keep]
        for address in gone:
            self.discard(address)
        return gone

    def _retire(self, address: str, channel: grpc.aio.Channel) -> None:
        log.debug("closing the channel to %s in %.0fs", address, self.close_grace_s)
        task = asyncio.ensure_future(self._close_later(channel))
        self._retiring[task] = channel
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def _close_later(self, channel: grpc.aio.Channel) -> None:
        await asyncio.sleep(self.close_grace_s)
        await channel.close()

    async def close(self) -> None:
        """Closes every channel now (shutdown)."""
        retiring, self._retiring = self._retiring, {}
        for task in retiring:
            task.cancel()
        channels, self._channels = [*self._channels.values(), *retiring.values()], OrderedDict()
        for channel in channels:
            try:
                await channel.close()
            except Exception as exc:  # noqa: BLE001 - shutting down: the others must close too
                log.debug("closing a channel failed: %r", exc)
