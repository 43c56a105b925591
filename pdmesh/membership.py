"""Cluster membership as plain dataclasses: roles, instance states, loads and the cluster view.

Workers, the coordinator and the controller's logic work on these; protobuf stays at the gRPC edge
(``pdmesh.rpc.convert_cluster``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    """The phase(s) an instance runs."""

    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"


class InstanceState(StrEnum):
    """Where an instance stands in the controller's eyes."""

    HEALTHY = "healthy"
    SUSPECT = "suspect"  # heartbeats late; kept in the view, not routed to
    DEAD = "dead"  # heartbeats gone for good; leaves the view
    DRAINING = "draining"  # taken offline (role flip, shutdown); finishing its work


@dataclass
class LoadData:
    """An instance's load as its heartbeats report it."""

    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    queued_prefill_tokens: int = 0
    pinned_handles: int = 0  # prefilled KV handles still pinned (a role flip waits for none)
    prompt_tokens_total: int = 0  # prompt tokens prefilled since start; rates come from deltas
    prefix_cache_hit_tokens: int = 0  # prompt tokens served from the prefix cache since start
    prefix_cache_query_tokens: int = 0  # prompt tokens looked up in the prefix cache since start
    unknown: bool = False  # the figures are not current (not measured, or not heard since a takeover)

    def idle(self) -> bool:
        """Nothing running, waiting or pinned, as far as is known: the instance may switch its role."""
        return not self.unknown and self.running == 0 and self.waiting == 0 and self.pinned_handles == 0


@dataclass
class InstanceInfoData:
    """One worker instance: who it is, where to reach it, how it is doing."""

    instance_id: str
    role: Role
    address: str  # host:port of the worker's gRPC server
    transfer_endpoint: str = ""  # e.g. tcp://127.0.0.1:7001
    model: str = ""
    state: InstanceState = InstanceState.HEALTHY
    load: LoadData = field(default_factory=LoadData)
    last_heartbeat: float = 0.0  # unix seconds
    metrics_address: str = ""  # host:port serving the instance's Prometheus /metrics; empty: none

    def validate(self) -> None:
        """Raises ValueError naming the first problem (empty id or address, unknown role)."""
        if not self.instance_id.strip():
            raise ValueError("instance_id is empty")
        if not isinstance(self.role, Role):
            raise ValueError(f"role {self.role!r} is not one of prefill, decode, mixed")
        if not self.address.strip():
            raise ValueError(f"instance {self.instance_id}: address is empty (want host:port)")

    def copy(self) -> InstanceInfoData:
        """A deep enough copy to hand out of the membership without sharing the load object."""
        return dataclasses.replace(self, load=dataclasses.replace(self.load))


@dataclass(frozen=True)
class ClusterViewData:
    """A versioned snapshot of the cluster; a higher version is a newer view from the same controller."""

    version: int = 0
    instances: tuple[InstanceInfoData, ...] = ()

    def get(self, instance_id: str) -> InstanceInfoData | None:
        return next((i for i in self.instances if i.instance_id == instance_id), None)

    def healthy(self, role: Role | None = None) -> list[InstanceInfoData]:
        """Healthy instances (of one role, or all), the ones requests may be routed to."""
        return [
            i for i in self.instances if i.state == InstanceState.HEALTHY and (role is None or i.role == role)
        ]

    def has_healthy(self, *roles: Role) -> bool:
        """True when every role given has at least one healthy instance."""
        return all(self.healthy(role) for role in roles)

    def summary(self) -> str:
        """One line for logs and error messages: ``v3: prefill-0=healthy, decode-0=suspect``."""
        parts = ", ".join(f"{i.instance_id}={i.state.value}" for i in self.instances) or "no instances"
        return f"v{self.version}: {parts}"
