"""The dp replicas of an engine: each its own block manager and scheduler over its own KV pool.

A data-parallel instance runs ``dp`` replicas of the model (each over ``tp`` ranks) in lockstep;
each replica has its own KV pool of ``num_blocks`` blocks, so the leader keeps one block manager
and one scheduler per replica. Outside the engine a block is named by one global id,
``replica * num_blocks + local id``, so that ``allocate_kv``/``free_kv`` and the block ids of
PREFILL outputs and DECODE requests keep their meaning whatever the replica; with one replica the
global and local ids are the same.
"""

from __future__ import annotations

from pdmesh.engine.block_manager import BlockManager
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.scheduler import Scheduler
from pdmesh.engine.sequence import Sequence
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import RequestMode


class Replica:
    """One dp replica's blocks and queue."""

    def __init__(self, index: int, config: EngineConfig, num_blocks: int) -> None:
        self.index = index
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks)

    def load(self) -> int:
        s = self.scheduler
        return len(s.running) + len(s.waiting) + (1 if s.chunking is not None else 0)


class ReplicaSet:
    """The replicas and the mapping between global and per-replica block ids."""

    def __init__(self, dp: int, config: EngineConfig, num_blocks: int) -> None:
        self.num_blocks = num_blocks  # per replica
        self.replicas = [Replica(d, config, num_blocks) for d in range(dp)]
        self._next = 0  # ties go round: short requests on an idle instance spread over the replicas

    def _turn(self, replica: Replica) -> int:
        """0 for the replica whose turn it is, then 1, 2, ... going round."""
        return (replica.index - self._next) % len(self.replicas)

    def _chosen(self, replica: Replica) -> Replica:
        self._next = (replica.index + 1) % len(self.replicas)
        return replica

    def __len__(self) -> int:
        return len(self.replicas)

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]

    def __iter__(self):
        return iter(self.replicas)

    def to_global(self, replica: int, local_ids: list[int]) -> list[int]:
        base = replica * self.num_blocks
        return [base + b for b in local_ids]

    def split(self, global_ids: list[int]) -> dict[int, list[int]]:
        """Global ids grouped by replica, as local ids (order kept within each replica)."""
        out: dict[int, list[int]] = {}
        for b in global_ids:
            out.setdefault(b // self.num_blocks, []).append(b % self.num_blocks)
        return out

    def one_replica(self, global_ids: list[int]) -> tuple[int, list[int]]:
        """``(replica, local ids)`` of blocks that must all lie in one replica (ValueError if not)."""
        parts = self.split(global_ids)
        if len(parts) != 1 or not 0 <= next(iter(parts)) < len(self.replicas):
            raise ValueError(f"kv_block_ids {global_ids[:4]} do not lie in one replica's blocks")
        return next(iter(parts.items()))

    def pick(self, request: EngineRequest) -> int:
        """The replica for a new request: a DECODE request's blocks decide; otherwise the least
        loaded, then the one whose prefix cache holds most of the prompt, then whose turn it is."""
        if len(self.replicas) == 1:
            return 0
        if request.mode == RequestMode.DECODE and request.kv_block_ids:
            return self.one_replica(request.kv_block_ids)[0]
        return self._chosen(
            min(
                self.replicas,
                key=lambda r: (r.load(), -r.blocks.cached_prefix_blocks(request.prompt_ids), self._turn(r)),
            )
        ).index

    def for_allocation(self, num_tokens: int) -> Replica | None:
        """The replica with the most free blocks that can hold ``num_tokens`` tokens, ties going
        round (None: none can)."""
        fits = [r for r in self.replicas if r.blocks.can_allocate(num_tokens)]
        if not fits:
            return None
        return self._chosen(max(fits, key=lambda r: (r.blocks.num_free_blocks, -self._turn(r))))

    def of(self, seq: Sequence) -> Replica:
        return self.replicas[seq.replica]
