"""The dp replicas' bookkeeping: global block ids, which replica takes a request or an allocation."""

from __future__ import annotations

import pytest

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.replicas import ReplicaSet
from pdmesh.engine.sequence import Sequence
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import RequestMode, SamplingParams

pytestmark = pytest.mark.timeout(30)

CONFIG = EngineConfig(model_dir="/unused", block_size=4)


def request(prompt: list[int], **kw) -> EngineRequest:
    return EngineRequest("r", prompt, SamplingParams(max_tokens=4), **kw)


def test_global_ids_name_the_replica() -> None:
    reps = ReplicaSet(3, CONFIG, num_blocks=10)
    assert reps.to_global(2, [0, 7]) == [20, 27]
    assert reps.split([21, 3, 25]) == {2: [1, 5], 0: [3]}
    assert reps.one_replica([12, 14]) == (1, [2, 4])
    with pytest.raises(ValueError, match="do not lie in one replica"):
        reps.one_replica([12, 3])
    with pytest.raises(ValueError, match="do not lie in one replica"):
        reps.one_replica([30])  # past the last replica


def test_requests_go_to_the_least_loaded_then_the_cached_prefix_then_round() -> None:
    reps = ReplicaSet(2, CONFIG, num_blocks=10)
    prompt = list(range(9))
    assert [reps.pick(request(prompt)) for _ in range(3)] == [0, 1, 0]  # idle: they take turns
    seq = Sequence(request(prompt), 0, None)
    reps[1].scheduler.add(seq)
    assert reps.pick(request(prompt)) == 0  # replica 1 has a waiting request
    reps[1].scheduler.remove(seq)
    table, _ = reps[1].blocks.allocate_prompt(prompt)
    reps[1].blocks.cache_full_blocks(table, prompt, [])
    reps[1].blocks.free(table)
    assert reps.pick(request(prompt)) == 1  # its prefix cache holds the prompt's first two blocks
    decode = request(prompt, mode=RequestMode.DECODE, first_token=1, kv_block_ids=[13, 14, 15])
    assert reps.pick(decode) == 1  # a DECODE request's blocks decide


def test_allocations_go_where_most_blocks_are_free() -> None:
    reps = ReplicaSet(2, CONFIG, num_blocks=4)
    first = reps.for_allocation(8)  # two blocks
    first.blocks.allocate(8)
    assert reps.for_allocation(4).index != first.index
    reps[1 - first.index].blocks.allocate(16)  # the other replica is full now
    assert reps.for_allocation(4).index == first.index
    assert reps.for_allocation(12) is None
