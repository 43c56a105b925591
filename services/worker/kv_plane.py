"""The worker's KV plane: exposing prefilled blocks to pullers and pulling a handle's KV, on every
rank of the instance.

On one rank it is the worker's own transfer server (prefill and mixed roles) and a puller over its
pool. On a parallel instance the blocks of a request live on the ranks of one dp replica, each
holding its KV heads: the leader exposes them on every rank of that replica (its own server for
replica 0, the followers' through the control channel, acknowledged before the handle is
published) and lists them as the handle's parts; a pull runs on every rank of the replica that
allocated the blocks, each taking exactly its heads (``pdmesh.kv.transfer.sharded``). Whether a
handle can be mapped onto this instance's ranks is checked before the handle is claimed, so a
refusal moves no byte.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from pdmesh.kv.transfer.errors import TransferError
from pdmesh.kv.transfer.protocols import KVTransferServer
from pdmesh.kv.transfer.sharded import RankHeads, ShardedPuller, plan_pull, pull_nbytes
from pdmesh.kv.types import KVHandle, KVLayout, KVPart
from pdmesh.parallel.control import ControlError
from services.worker.metrics import transfer_failure_cause

log = logging.getLogger(__name__)


class KVPlane:
    """Expose, withdraw and pull for the whole instance (one rank, or a leader and its followers)."""

    def __init__(
        self,
        layout: KVLayout,
        puller: ShardedPuller,
        replica_of: Callable[[list[int]], tuple[int, list[int]]],
        leader=None,
    ) -> None:
        self.layout = layout
        self.puller = puller
        self.replica_of = replica_of
        self.leader = leader  # pdmesh.parallel.instance.Leader, None on a single rank
        self.server: KVTransferServer | None = None  # the leader's own, while it may prefill
        self._exposed: dict[str, list[int]] = {}  # handle id -> the follower ranks exposing it
        self.metrics = None  # services.worker.metrics.WorkerMetrics, set by the worker

    @property
    def endpoint(self) -> str:
        return self.server.endpoint if self.server is not None else ""

    def _ranks(self, replica: int) -> tuple[int, ...]:
        return self.leader.plan.layout.tp_groups[replica] if self.leader is not None else (0,)

    def _heads(self, rank: int) -> RankHeads:
        if self.leader is None:
            return RankHeads.whole(self.layout)
        layout = self.leader.plan.layout
        first, count = layout.kv_heads(rank)
        return RankHeads(first, count, layout.dims.num_kv_heads)

    def _part(self, rank: int, replica: int) -> KVPart:
        heads = self._heads(rank)
        tp = self.leader.plan.layout.tp
        endpoint = self.endpoint if rank == 0 else self.leader.endpoint(rank)
        return KVPart(rank, endpoint, replica, rank % tp, tp, heads.start, heads.count, heads.total)

    async def expose(self, handle_id: str, block_ids: list[int], secret: str = "") -> list[KVPart]:
        """Exposes the blocks on every rank that holds them, to pullers presenting ``secret``; the
        handle's parts ([] on one rank)."""
        replica, local = self.replica_of(block_ids)
        ranks = self._ranks(replica)
        if 0 in ranks:
            self.server.expose(handle_id, local, secret)
        if self.leader is None:
            return []
        followers = [r for r in ranks if r != 0]
        self._exposed[handle_id] = followers
        message = {"op": "expose", "handle_id": handle_id, "block_ids": local, "secret": secret}
        acks = [asyncio.wrap_future(self.leader.hub.request(r, message)) for r in followers]
        try:
            await asyncio.wait_for(asyncio.gather(*acks), self.leader.config.dist_timeout_s)
        except TimeoutError:
            raise ControlError(f"ranks {followers} did not expose {handle_id} in time") from None
        return [self._part(r, replica) for r in ranks]

    def withdraw(self, handle_id: str) -> None:
        if self.server is not None:
            self.server.withdraw(handle_id)
        for rank in self._exposed.pop(handle_id, []):
            try:
                self.leader.hub.send(rank, {"op": "withdraw", "handle_id": handle_id})
            except ControlError:
                pass  # that rank is gone, and its exposures with it

    def refusal(self, handle: KVHandle) -> str | None:
        """Why ``handle`` cannot be pulled into this instance (None: it can), before any claim."""
        try:
            for rank in self._ranks(0):  # every replica has the same heads per tp rank
                plan_pull(handle, self.layout, self._heads(rank), rank)
        except TransferError as exc:
            return str(exc)
        return None

    async def pull(self, handle: KVHandle, block_ids: list[int], timeout_s: float) -> None:
        """Pulls the handle's KV into ``block_ids`` on every rank of their replica (TransferError)."""
        replica, local = self.replica_of(block_ids)
        waits = []
        nbytes, started = 0, time.perf_counter()
        tp = self.leader.plan.layout.tp if self.leader is not None else 1
        for rank in self._ranks(replica):
            steps = plan_pull(handle, self.layout, self._heads(rank), rank % tp)
            nbytes += pull_nbytes(handle, steps, len(local))
            if rank == 0:
                waits.append(asyncio.to_thread(self.puller.pull, handle, steps, local, timeout_s))
            else:
                message = {"op": "pull", "handle": handle.to_dict(), "dst": local, "timeout_s": timeout_s}
                waits.append(self._follower_pull(rank, message))
        results = await asyncio.gather(*waits, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            if self.metrics is not None:
                self.metrics.kv_failed(transfer_failure_cause(failures[0]))
            raise TransferError("; ".join(str(f) for f in failures))
        if self.metrics is not None:
            self.metrics.kv_received(nbytes, time.perf_counter() - started)

    async def _follower_pull(self, rank: int, message: dict) -> None:
        bound = message["timeout_s"] + self.leader.config.dist_timeout_s  # its own pull is bounded too
        try:
            ack = await asyncio.wait_for(asyncio.wrap_future(self.leader.hub.request(rank, message)), bound)
        except ControlError as exc:
            raise TransferError(str(exc)) from exc
        except TimeoutError:
            raise TransferError(f"rank {rank} did not finish its pull within {bound:.0f}s") from None
        if not ack.get("ok"):
            raise TransferError(f"rank {rank}: {ack.get('error')}")

    def close(self) -> None:
        self.puller.close()
