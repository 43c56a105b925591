"""Protobuf <-> dataclass conversions for roles, instance states, loads, instances and cluster views."""

from __future__ import annotations

from pdmesh.membership import ClusterViewData, InstanceInfoData, InstanceState, LoadData, Role
from pdmesh.v1 import common_pb2, controller_pb2

_ROLE_TO_PROTO = {
    Role.PREFILL: common_pb2.ROLE_PREFILL,
    Role.DECODE: common_pb2.ROLE_DECODE,
    Role.MIXED: common_pb2.ROLE_MIXED,
}
_ROLE_FROM_PROTO = {v: k for k, v in _ROLE_TO_PROTO.items()}

_STATE_TO_PROTO = {
    InstanceState.HEALTHY: common_pb2.INSTANCE_STATE_HEALTHY,
    InstanceState.SUSPECT: common_pb2.INSTANCE_STATE_SUSPECT,
    InstanceState.DEAD: common_pb2.INSTANCE_STATE_DEAD,
    InstanceState.DRAINING: common_pb2.INSTANCE_STATE_DRAINING,
}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}


def role_to_proto(role: Role) -> int:
    return _ROLE_TO_PROTO[Role(role)]


def role_from_proto(value: int) -> Role:
    """The role; raises ValueError for ROLE_UNSPECIFIED or an unknown number."""
    if value not in _ROLE_FROM_PROTO:
        name = common_pb2.Role.Name(value) if value in common_pb2.Role.values() else str(value)
        raise ValueError(f"role is {name}; want ROLE_PREFILL, ROLE_DECODE or ROLE_MIXED")
    return _ROLE_FROM_PROTO[value]


def state_to_proto(state: InstanceState) -> int:
    return _STATE_TO_PROTO[InstanceState(state)]


def state_from_proto(value: int) -> InstanceState:
    """The state; an unspecified one reads as healthy (a registering instance does not set it)."""
    return _STATE_FROM_PROTO.get(value, InstanceState.HEALTHY)


def load_to_proto(load: LoadData) -> common_pb2.InstanceLoad:
    return common_pb2.InstanceLoad(
        running=load.running,
        waiting=load.waiting,
        free_blocks=load.free_blocks,
        total_blocks=load.total_blocks,
        queued_prefill_tokens=load.queued_prefill_tokens,
        pinned_handles=load.pinned_handles,
        prompt_tokens_total=load.prompt_tokens_total,
        prefix_cache_hit_tokens=load.prefix_cache_hit_tokens,
        prefix_cache_query_tokens=load.prefix_cache_query_tokens,
        unknown=load.unknown,
    )


def load_from_proto(msg: common_pb2.InstanceLoad) -> LoadData:
    return LoadData(
        running=msg.running,
        waiting=msg.waiting,
        free_blocks=msg.free_blocks,
        total_blocks=msg.total_blocks,
        queued_prefill_tokens=msg.queued_prefill_tokens,
        pinned_handles=msg.pinned_handles,
        prompt_tokens_total=msg.prompt_tokens_total,
        prefix_cache_hit_tokens=msg.prefix_cache_hit_tokens,
        prefix_cache_query_tokens=msg.prefix_cache_query_tokens,
        unknown=msg.unknown,
    )


def instance_to_proto(info: InstanceInfoData) -> common_pb2.InstanceInfo:
    return common_pb2.InstanceInfo(
        instance_id=info.instance_id,
        role=role_to_proto(info.role),
        address=info.address,
        transfer_endpoint=info.transfer_endpoint,
        state=state_to_proto(info.state),
        load=load_to_proto(info.load),
        model=info.model,
        last_heartbeat=info.last_heartbeat,
        metrics_address=info.metrics_address,
    )


def instance_from_proto(msg: common_pb2.InstanceInfo) -> InstanceInfoData:
    """The dataclass, validated; raises ValueError naming the problem (empty id or address, no role)."""
    if not msg.instance_id.strip():
        raise ValueError("instance_id is empty")
    info = InstanceInfoData(
        instance_id=msg.instance_id,
        role=role_from_proto(msg.role),
        address=msg.address,
        transfer_endpoint=msg.transfer_endpoint,
        model=msg.model,
        state=state_from_proto(msg.state),
        load=load_from_proto(msg.load),
        last_heartbeat=msg.last_heartbeat,
        metrics_address=msg.metrics_address,
    )
    info.validate()
    return info


def view_to_proto(view: ClusterViewData) -> controller_pb2.ClusterView:
    return controller_pb2.ClusterView(
        version=view.version, instances=[instance_to_proto(i) for i in view.instances]
    )


def view_from_proto(msg: controller_pb2.ClusterView) -> ClusterViewData:
    return ClusterViewData(
        version=msg.version, instances=tuple(instance_from_proto(i) for i in msg.instances)
    )
