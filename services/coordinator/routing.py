"""Instance selection: which prefill and which decode instance serves a request.

Policies, chosen separately for prefill and decode: ``round_robin``, ``least_load``,
``power_of_two`` (two random candidates, the less loaded wins) and, for prefill, ``cache_aware``
(the instance that already holds the longest prefix of the prompt's KV blocks, unless it is more
than ``imbalance`` requests busier than the least loaded one).

Load is what the coordinator itself has in flight at the instance plus what the instance last
reported (running and waiting requests): the first reacts at once, the second sees other coordinators.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from pdmesh.membership import ClusterViewData, InstanceInfoData, Role
from pdmesh.observability import tracing

POLICIES = ("round_robin", "least_load", "power_of_two", "cache_aware")


@dataclass
class PickContext:
    """What a policy may look at besides the candidates."""

    inflight: Counter
    block_hashes: list[int] = field(default_factory=list)

    def load(self, instance: InstanceInfoData) -> int:
        return self.inflight[instance.instance_id] + instance.load.running + instance.load.waiting


class RoundRobinPolicy:
    """Takes instances in turn."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: list[InstanceInfoData], ctx: PickContext) -> InstanceInfoData:
        return candidates[next(self._counter) % len(candidates)]


class LeastLoadPolicy:
    """The least loaded instance (ties: the first by id)."""

    def pick(self, candidates: list[InstanceInfoData], ctx: PickContext) -> InstanceInfoData:
        return min(candidates, key=ctx.load)


class PowerOfTwoPolicy:
    """Two random candidates; the less loaded one wins (cheap, and avoids herding on stale loads)."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def pick(self, candidates: list[InstanceInfoData], ctx: PickContext) -> InstanceInfoData:
        if len(candidates) == 1:
            return candidates[0]
        return min(self._rng.sample(candidates, 2), key=ctx.load)


class CacheAwarePolicy:
    """Prefix affinity by block hashes, bounded by a load-imbalance threshold."""

    def __init__(self, imbalance: int = 4, capacity: int = 100_000) -> None:
        self.imbalance = imbalance
        self.capacity = capacity
        self._holders: OrderedDict[int, set[str]] = OrderedDict()  # block hash -> instances, LRU

    def matched_blocks(self, instance_id: str, block_hashes: list[int]) -> int:
        count = 0
        for h in block_hashes:
            if instance_id not in self._holders.get(h, ()):
                break
            count += 1
        return count

    def pick(self, candidates: list[InstanceInfoData], ctx: PickContext) -> InstanceInfoData:
        least = min(candidates, key=ctx.load)
        best = max(
            candidates, key=lambda c: (self.matched_blocks(c.instance_id, ctx.block_hashes), -ctx.load(c))
        )
        matched = self.matched_blocks(best.instance_id, ctx.block_hashes)
        chosen = best if matched and ctx.load(best) <= ctx.load(least) + self.imbalance else least
        self._remember(chosen.instance_id, ctx.block_hashes)
        return chosen

    def _remember(self, instance_id: str, block_hashes: list[int]) -> None:
        for h in block_hashes:
            self._holders.setdefault(h, set()).add(instance_id)
            self._holders.move_to_end(h)
        while len(self._holders) > self.capacity:
            self._holders.popitem(last=False)


def make_policy(name: str, imbalance: int = 4):
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "least_load":
        return LeastLoadPolicy()
    if name == "power_of_two":
        return PowerOfTwoPolicy()
    if name == "cache_aware":
        return CacheAwarePolicy(imbalance)
    raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")


def prompt_block_hashes(prompt_ids: list[int], block_size: int) -> list[int]:
    """A hash chain over the prompt's full blocks (as the engine's prefix cache keys them)."""
    hashes, previous = [], 0
    for start in range(0, len(prompt_ids) - block_size + 1, block_size):
        previous = hash((previous, tuple(prompt_ids[start : start + block_size])))
        hashes.append(previous)
    return hashes


class Router:
    """Chooses instances from the controller's latest cluster view and tracks what it sent where.

    ``snapshot()`` fixes one view: a request attempt asks it whether it can be served, how, and where,
    so that a view arriving meanwhile cannot answer one question and not the next.
    """

    def __init__(
        self,
        view_fn: Callable[[], ClusterViewData],
        prefill_policy: str = "round_robin",
        decode_policy: str = "round_robin",
        block_size: int = 16,
        imbalance: int = 4,
    ) -> None:
        self._view_fn = view_fn
        self.block_size = block_size
        self.policies = {
            Role.PREFILL: make_policy(prefill_policy, imbalance),
            Role.DECODE: make_policy(decode_policy, imbalance),
            Role.MIXED: make_policy(decode_policy, imbalance),
        }
        self.inflight: Counter = Counter()

    @property
    def view(self) -> ClusterViewData:
        return self._view_fn()

    def snapshot(self) -> RoutingSnapshot:
        """The latest view, fixed for one request attempt."""
        return RoutingSnapshot(self, self._view_fn())

    def can_disaggregate(self) -> bool:
        return self.snapshot().can_disaggregate()

    def ready(self) -> bool:
        """True while a request can be served: one prefill and one decode instance, or a mixed one."""
        return self.snapshot().ready()

    def pick(
        self, role: Role, exclude: Collection[str] = (), prompt_ids: list[int] | None = None
    ) -> InstanceInfoData | None:
        """A healthy instance of ``role``, avoiding ``exclude`` while others exist; None if none."""
        return self.snapshot().pick(role, exclude, prompt_ids)


class RoutingSnapshot:
    """One cluster view and the router's policies: every answer comes from the same instances."""

    def __init__(self, router: Router, view: ClusterViewData) -> None:
        self.router = router
        self.view = view
        self._healthy = {
            role: sorted(view.healthy(role), key=lambda i: i.instance_id)
            for role in (Role.PREFILL, Role.DECODE, Role.MIXED)
        }

    def can_disaggregate(self) -> bool:
        return bool(self._healthy[Role.PREFILL]) and bool(self._healthy[Role.DECODE])

    def ready(self) -> bool:
        """True when this view can serve a request: one prefill and one decode instance, or a mixed one."""
        return self.can_disaggregate() or bool(self._healthy[Role.MIXED])

    def _candidates(self, role: Role, exclude: Collection[str]) -> list[InstanceInfoData]:
        """The healthy instances of ``role`` not in ``exclude``, or all of them when none is left."""
        healthy = self._healthy[role]
        return [c for c in healthy if c.instance_id not in exclude] or healthy

    def prefill_busy(self, exclude: Collection[str] = ()) -> bool:
        """True when every healthy prefill instance (avoiding ``exclude`` while others exist) has a
        prompt of this coordinator's in flight or reports prompts waiting: a new one would queue."""
        candidates = self._candidates(Role.PREFILL, exclude)
        inflight = self.router.inflight
        return bool(candidates) and all(inflight[c.instance_id] + c.load.waiting > 0 for c in candidates)

    def pick(
        self,
        role: Role,
        exclude: Collection[str] = (),
        prompt_ids: list[int] | None = None,
        prefer: str | None = None,
    ) -> InstanceInfoData | None:
        """A healthy instance of ``role``, avoiding ``exclude`` while others exist; None if none.
        ``prefer``: an instance id taken over the policy's choice while it is a candidate (the one
        holding a shared prompt's KV, ``backend.Affinity``)."""
        candidates = self._candidates(role, exclude)
        if not candidates:
            return None
        preferred = [c for c in candidates if c.instance_id == prefer]
        if preferred:
            return preferred[0]
        hashes = prompt_block_hashes(prompt_ids, self.router.block_size) if prompt_ids else []
        policy = self.router.policies[role]
        with tracing.tracer().start_as_current_span("route") as span:
            chosen = policy.pick(candidates, PickContext(self.router.inflight, hashes))
            if span.is_recording():
                span.set_attributes(
                    {
                        "pdmesh.route.role": role.value,
                        "pdmesh.route.policy": type(policy).__name__,
                        "pdmesh.route.candidates": len(candidates),
                        "pdmesh.route.instance_id": chosen.instance_id,
                    }
                )
        return chosen
