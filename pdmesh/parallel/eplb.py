"""Expert-parallel load balancing (EPLB): redundant experts, and where every replica lives.

A ``ReplicaPlacement`` puts ``E`` routed (logical) experts into ``E + R`` physical slots, ``slots``
per ep rank: ``table[r][s]`` is the logical expert in ep rank ``r``'s slot ``s``. A hot expert may
sit in several slots (its replicas); the router's choice of it is spread over them (``pick``).

``balance`` is the rebalancing algorithm, in the spirit of DeepSeek's EPLB but our own:

1. replicate: each of the ``R`` spare slots goes, one at a time, to the expert whose load per
   replica is highest (so a replica carries ``load / replicas``);
2. pack: replicas in decreasing load, each onto the ep rank with the least load so far that still
   has a free slot and does not hold that expert yet (longest-processing-time-first packing);
3. settle: an expert that stays on a rank keeps its slot there, so a rebalance moves only the
   weights it must.

For LPT the heaviest rank exceeds the mean by at most the largest single replica's load; with
enough spare slots the hottest experts are split until that is small (``tests/unit/test_eplb.py``
bounds the imbalance on skewed loads).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from pdmesh.parallel.layout import LayoutError


@dataclass(frozen=True)
class ReplicaPlacement:
    """``table[ep rank][slot]`` -> logical expert; every logical expert in at least one slot."""

    table: tuple[tuple[int, ...], ...]
    num_experts: int

    @property
    def moe_ep(self) -> int:
        return len(self.table)

    @property
    def slots(self) -> int:
        return len(self.table[0])

    @property
    def num_physical(self) -> int:
        return self.moe_ep * self.slots

    @classmethod
    def initial(cls, num_experts: int, moe_ep: int, redundant: int = 0) -> ReplicaPlacement:
        """Contiguous without spares (MindIE's default); with spares, ``balance`` of even loads."""
        if redundant < 0:
            raise LayoutError(f"the number of redundant experts must be >= 0, got {redundant}")
        if (num_experts + redundant) % moe_ep:
            raise LayoutError(
                f"{num_experts} routed experts + {redundant} redundant do not divide over moe_ep={moe_ep}"
            )
        if redundant == 0:
            per = num_experts // moe_ep
            return cls(tuple(tuple(range(r * per, (r + 1) * per)) for r in range(moe_ep)), num_experts)
        return balance([1.0] * num_experts, moe_ep, redundant)

    @classmethod
    def from_lists(cls, table: list[list[int]], num_experts: int) -> ReplicaPlacement:
        """A placement from its table (a control message); ``LayoutError`` if it is not one."""
        placement = cls(tuple(tuple(int(e) for e in row) for row in table), num_experts)
        placement.check()
        return placement

    def check(self) -> None:
        if not self.table or len({len(row) for row in self.table}) != 1:
            raise LayoutError("every ep rank must have the same number of expert slots")
        held = {e for row in self.table for e in row}
        if held != set(range(self.num_experts)):
            raise LayoutError(
                f"the placement must hold each of the {self.num_experts} experts, and only them"
            )

    def physical_of(self, expert: int) -> list[int]:
        """The physical ids (``rank * slots + slot``) of ``expert``'s replicas, in order."""
        return [
            r * self.slots + s for r, row in enumerate(self.table) for s, e in enumerate(row) if e == expert
        ]

    def slots_here(self, expert: int, ep_rank: int) -> list[int]:
        """This ep rank's slots holding ``expert`` (empty: another rank holds it)."""
        return [s for s, e in enumerate(self.table[ep_rank]) if e == expert]

    def replica_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``[E, max replicas]`` physical ids (padded by repeating) and ``[E]`` replica counts."""
        lists = [self.physical_of(e) for e in range(self.num_experts)]
        width = max(len(p) for p in lists)
        rows = [p + [p[i % len(p)] for i in range(width - len(p))] for p in lists]
        return (
            torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor([len(p) for p in lists], dtype=torch.long, device=device),
        )

    def to_lists(self) -> list[list[int]]:
        return [list(row) for row in self.table]


def pick(ids: torch.Tensor, table: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Physical ids for the logical ``ids [T, k]``: pair ``i`` (row-major) takes replica ``i mod n``.

    Every rank that sees the same pairs picks the same replicas; a replica holds identical weights,
    so the choice changes where a product runs, never its value."""
    flat = ids.reshape(-1)
    turn = torch.arange(flat.shape[0], device=ids.device) % counts[flat]
    return table[flat, turn].reshape(ids.shape)


def rank_loads(placement: ReplicaPlacement, loads: list[float]) -> list[float]:
    """Each ep rank's share of ``loads`` (per logical expert), a replica taking an even part."""
    copies = [0] * placement.num_experts
    for row in placement.table:
        for e in row:
            copies[e] += 1
    return [sum(loads[e] / copies[e] for e in row) for row in placement.table]


def imbalance(placement: ReplicaPlacement, loads: list[float]) -> float:
    """max / mean of the ep ranks' loads (1.0: even; 1.0 when nothing ran)."""
    per_rank = rank_loads(placement, loads)
    mean = sum(per_rank) / len(per_rank)
    return max(per_rank) / mean if mean > 0 else 1.0


def _replicate(loads: list[float], total: int, cap: int) -> list[int]:
    """Replicas per expert: each spare slot to the highest load per replica (at most ``cap`` each)."""
    copies = [1] * len(loads)
    heap = [(-load, e) for e, load in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(total - len(loads)):
        _, e = heapq.heappop(heap)
        copies[e] += 1
        if copies[e] < cap:
            heapq.heappush(heap, (-loads[e] / copies[e], e))
    return copies


def balance(
    loads: list[float], moe_ep: int, redundant: int, previous: ReplicaPlacement | None = None
) -> ReplicaPlacement:
    """A placement of ``len(loads)`` experts plus ``redundant`` replicas over ``moe_ep`` ranks that
    evens the ranks' loads; experts staying on a rank keep their slot in ``previous``."""
    num_experts = len(loads)
    total = num_experts + redundant
    if total % moe_ep:
        raise LayoutError(
            f"{num_experts} routed experts + {redundant} redundant do not divide over moe_ep={moe_ep}"
        )
    slots = total // moe_ep
    if redundant > num_experts * (moe_ep - 1):
        raise LayoutError(
            f"{redundant} redundant experts need more ep ranks than {moe_ep} to keep replicas apart"
        )
    loads = [max(float(x), 0.0) for x in loads]
    copies = _replicate(loads, total, moe_ep)
    replicas = sorted(
        ((loads[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
        key=lambda t: (-t[0], t[1]),
    )
    held: list[list[int]] = [[] for _ in range(moe_ep)]
    rank_load = [0.0] * moe_ep
    for load, e in replicas:
        free = [r for r in range(moe_ep) if len(held[r]) < slots and e not in held[r]]
        free = free or [r for r in range(moe_ep) if len(held[r]) < slots]  # rare: two on one rank
        r = min(free, key=lambda r: (rank_load[r], len(held[r]), r))
        held[r].append(e)
        rank_load[r] += load
    return ReplicaPlacement(tuple(_settle(held, previous, slots)), num_experts)


def _settle(held: list[list[int]], previous: ReplicaPlacement | None, slots: int) -> list[tuple[int, ...]]:
    """Orders each rank's experts into slots, keeping ``previous``'s slot for an expert that stays."""
    rows = []
    for r, experts in enumerate(held):
        row: list[int | None] = [None] * slots
        rest = list(experts)
        if previous is not None and previous.slots == slots and r < previous.moe_ep:
            for s, e in enumerate(previous.table[r]):
                if e in rest:
                    row[s] = e
                    rest.remove(e)
        for s in range(slots):
            if row[s] is None:
                row[s] = rest.pop(0)
        rows.append(tuple(row))
    return rows
