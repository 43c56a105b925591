"""The EPLB balancer: replicas of hot experts and their packing even the ep ranks' loads."""

from __future__ import annotations

import random

import pytest
import torch

from pdmesh.parallel.eplb import ReplicaPlacement, balance, imbalance, pick
from pdmesh.parallel.layout import LayoutError

pytestmark = pytest.mark.timeout(30)


def zipf(num_experts: int, s: float, seed: int) -> list[float]:
    """Skewed loads: expert ranks shuffled, load ~ 1 / rank**s."""
    order = list(range(num_experts))
    random.Random(seed).shuffle(order)
    return [1000.0 / (order[e] + 1) ** s for e in range(num_experts)]


def test_initial_is_contiguous_without_spares() -> None:
    p = ReplicaPlacement.initial(8, 2)
    assert p.table == ((0, 1, 2, 3), (4, 5, 6, 7))


@pytest.mark.parametrize(("experts", "ranks", "spares"), [(16, 2, 2), (16, 4, 4), (64, 8, 8), (256, 32, 32)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skewed_loads_balanced(experts, ranks, spares, seed) -> None:
    loads = zipf(experts, 1.2, seed)
    before = imbalance(ReplicaPlacement.initial(experts, ranks), loads)
    after = balance(loads, ranks, spares)
    after.check()
    assert after.num_physical == experts + spares
    assert imbalance(after, loads) <= 1.15, (before, imbalance(after, loads))
    assert imbalance(after, loads) < before


def test_every_expert_kept_and_replicas_apart() -> None:
    p = balance(zipf(16, 1.5, 3), 4, 4)
    for row in p.table:
        assert len(set(row)) == len(row)
    assert sorted({e for row in p.table for e in row}) == list(range(16))


def test_staying_experts_keep_their_slots() -> None:
    loads = zipf(16, 1.2, 0)
    first = balance(loads, 2, 2)
    again = balance(loads, 2, 2, previous=first)
    assert again.table == first.table


def test_pick_spreads_over_replicas() -> None:
    p = ReplicaPlacement.from_lists([[0, 1, 2], [0, 3, 0]], 4)  # expert 0 twice on rank 1: allowed
    table, counts = p.replica_table(torch.device("cpu"))
    ids = torch.zeros((6, 1), dtype=torch.long)
    chosen = pick(ids, table, counts).reshape(-1).tolist()
    assert sorted(set(chosen)) == p.physical_of(0) == [0, 3, 5]
    assert chosen == [0, 3, 5, 0, 3, 5]


def test_bad_tables_refused() -> None:
    with pytest.raises(LayoutError, match="do not divide"):
        ReplicaPlacement.initial(8, 2, redundant=1)
    with pytest.raises(LayoutError, match="each of the 4 experts"):
        ReplicaPlacement.from_lists([[0, 1], [1, 2]], 4)
    with pytest.raises(LayoutError, match="same number"):
        ReplicaPlacement.from_lists([[0, 1, 2], [3]], 4)
