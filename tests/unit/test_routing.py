"""Routing policies and admission control of the coordinator."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from pdmesh.membership import ClusterViewData, InstanceInfoData, InstanceState, LoadData, Role
from services.coordinator.admission import AdmissionGate
from services.coordinator.backend import GenerationError
from services.coordinator.http_errors import HTTP_STATUS
from services.coordinator.routing import (
    CacheAwarePolicy,
    LeastLoadPolicy,
    PickContext,
    PowerOfTwoPolicy,
    Router,
    make_policy,
    prompt_block_hashes,
)

pytestmark = pytest.mark.timeout(30)


def instance(name: str, role: Role = Role.PREFILL, running: int = 0, state=InstanceState.HEALTHY):
    return InstanceInfoData(
        name, role, f"127.0.0.1:{hash(name) % 1000 + 1}", state=state, load=LoadData(running=running)
    )


def test_least_load_counts_own_inflight_and_reported_load():
    a, b = instance("a", running=3), instance("b", running=1)
    ctx = PickContext(Counter({"b": 5}))
    assert LeastLoadPolicy().pick([a, b], ctx) is a


def test_power_of_two_never_picks_the_busier_of_two():
    a, b = instance("a", running=9), instance("b")
    policy = PowerOfTwoPolicy(seed=1)
    assert all(policy.pick([a, b], PickContext(Counter())) is b for _ in range(20))


def test_cache_aware_follows_the_prefix_until_imbalance():
    a, b = instance("a"), instance("b")
    policy = CacheAwarePolicy(imbalance=2)
    prompt = list(range(64))
    hashes = prompt_block_hashes(prompt, 16)
    first = policy.pick([a, b], PickContext(Counter(), hashes))
    busy = Counter({first.instance_id: 2})
    assert policy.pick([a, b], PickContext(busy, hashes)) is first  # within the threshold
    too_busy = Counter({first.instance_id: 3})
    other = policy.pick([a, b], PickContext(too_busy, hashes))
    assert other is not first
    assert policy.matched_blocks(other.instance_id, hashes) == len(hashes)  # it now holds it too


def test_prompt_block_hashes_chain_full_blocks_only():
    assert prompt_block_hashes(list(range(15)), 16) == []
    a = prompt_block_hashes(list(range(40)), 16)
    b = prompt_block_hashes(list(range(32)) + [99] * 8, 16)
    assert len(a) == 2 and a == b
    assert prompt_block_hashes([1] * 16 + [2] * 16, 16)[1] != prompt_block_hashes([3] * 16 + [2] * 16, 16)[1]


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="nope"):
        make_policy("nope")


def test_router_skips_unhealthy_and_tried_instances():
    view = ClusterViewData(
        1,
        (
            instance("p0"),
            instance("p1"),
            instance("p2", state=InstanceState.SUSPECT),
            instance("d0", Role.DECODE),
        ),
    )
    router = Router(lambda: view, prefill_policy="round_robin")
    assert router.ready() and router.can_disaggregate()
    picks = {router.pick(Role.PREFILL, exclude={"p0"}).instance_id for _ in range(4)}
    assert picks == {"p1"}
    assert router.pick(Role.PREFILL, exclude={"p0", "p1"}).instance_id in {"p0", "p1"}  # all tried: any
    assert router.pick(Role.MIXED) is None


def test_a_preferred_instance_wins_while_it_can_serve():
    """A shared prompt's group (n > 1) goes where the prompt's KV is, whatever the policy says."""
    view = ClusterViewData(
        1,
        (
            instance("m0", Role.MIXED),
            instance("m1", Role.MIXED),
            instance("m2", Role.MIXED, state=InstanceState.SUSPECT),
        ),
    )
    snapshot = Router(lambda: view, decode_policy="round_robin").snapshot()
    assert {snapshot.pick(Role.MIXED, prefer="m1").instance_id for _ in range(4)} == {"m1"}
    assert snapshot.pick(Role.MIXED, exclude={"m1"}, prefer="m1").instance_id == "m0"  # tried: not again
    assert snapshot.pick(Role.MIXED, prefer="m2").instance_id in {"m0", "m1"}  # unhealthy: the policy picks


async def until(condition, timeout_s: float = 5.0) -> None:
    """Yields to the event loop until ``condition()`` holds (the gate's tasks run meanwhile)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0)


def test_admission_queues_then_refuses_with_retry_after():
    async def scenario():
        gate = AdmissionGate(max_inflight=1, max_queue=1, queue_timeout_s=5)
        release = asyncio.Event()

        async def hold():
            async with gate.admit():
                await release.wait()

        first = asyncio.create_task(hold())
        await until(lambda: gate.inflight == 1)  # first holds the only slot
        second = asyncio.create_task(hold())
        await until(lambda: gate.waiting == 1)  # second waits in the queue
        with pytest.raises(GenerationError) as refused:
            async with gate.admit():
                pass
        assert HTTP_STATUS[refused.value.kind] == 429 and refused.value.retry_after_s
        release.set()
        await asyncio.gather(first, second)
        assert gate.inflight == 0 and gate.waiting == 0

    asyncio.run(scenario())


def test_admission_queue_timeout_is_429():
    async def scenario():
        gate = AdmissionGate(max_inflight=1, max_queue=5, queue_timeout_s=0.05)
        async with gate.admit():
            with pytest.raises(GenerationError, match="waited"):
                async with gate.admit():
                    pass

    asyncio.run(scenario())
