"""The cluster state in Redis, written only by the lease holder (every write is fenced in Lua).

Keys (prefix ``pdmesh:``): ``ctl:instances`` (hash: instance id -> JSON record with its role, address,
endpoint, model and draining mark), ``ctl:meta`` (hash: ``ratio``, ``version``). Loads and heartbeat
times are not stored: they come again with the next heartbeats, and a controller that takes over
gives every stored instance a fresh grace period. When Redis lost the state (restarted empty, or a
replica behind took over), a controller taking over completes what it finds with what it knew
before (``merge_states``) and writes it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from pdmesh.membership import InstanceInfoData, Role

_FENCE_CHECK = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then
  return redis.error_reply('FENCED stale fencing token ' .. ARGV[1] .. ', current ' .. current)
end
"""

_HSET = _FENCE_CHECK + "redis.call('HSET', KEYS[2], ARGV[2], ARGV[3]) return 1"
_HDEL = _FENCE_CHECK + "return redis.call('HDEL', KEYS[2], ARGV[2])"


class FencedOut(RuntimeError):
    """A write was refused: a newer controller holds the lease."""


@dataclass
class StoredState:
    """What a controller taking over loads."""

    instances: list[InstanceInfoData]
    draining: set[str]
    ratio: str | None
    version: int
    flips: dict[str, Role] = field(default_factory=dict)  # unfinished role flips: id -> target role


def encode_instance(info: InstanceInfoData, draining: bool, flip_to: Role | None = None) -> str:
    fields = {
        "role": info.role.value,
        "address": info.address,
        "transfer_endpoint": info.transfer_endpoint,
        "model": info.model,
        "metrics_address": info.metrics_address,
        "draining": draining,
    }
    if flip_to is not None:
        fields["flip_to"] = flip_to.value  # a role flip in progress: a new active controller finishes it
    return json.dumps(fields)


def decode_instance(instance_id: str, raw: str) -> tuple[InstanceInfoData, bool]:
    fields = json.loads(raw)
    info = InstanceInfoData(
        instance_id=instance_id,
        role=Role(fields["role"]),
        address=fields["address"],
        transfer_endpoint=fields.get("transfer_endpoint", ""),
        model=fields.get("model", ""),
        metrics_address=fields.get("metrics_address", ""),
    )
    return info, bool(fields.get("draining"))


class ClusterStore:
    """Fenced reads and writes of the controller's state."""

    def __init__(self, redis: aioredis.Redis, fence_key: str, prefix: str = "pdmesh:") -> None:
        self.redis = redis
        self.fence_key = fence_key
        self.instances_key = f"{prefix}ctl:instances"
        self.meta_key = f"{prefix}ctl:meta"
        self._hset = redis.register_script(_HSET)
        self._hdel = redis.register_script(_HDEL)

    async def _fenced(self, script, key: str, token: int, *args: str) -> int:
        try:
            return int(await script(keys=[self.fence_key, key], args=[token, *args]))
        except aioredis.ResponseError as exc:
            if "FENCED" in str(exc):
                raise FencedOut(str(exc)) from None
            raise

    async def put_instance(
        self, token: int, info: InstanceInfoData, draining: bool, flip_to: Role | None = None
    ) -> None:
        record = encode_instance(info, draining, flip_to)
        await self._fenced(self._hset, self.instances_key, token, info.instance_id, record)

    async def delete_instance(self, token: int, instance_id: str) -> None:
        await self._fenced(self._hdel, self.instances_key, token, instance_id)

    async def set_meta(self, token: int, name: str, value: str) -> None:
        await self._fenced(self._hset, self.meta_key, token, name, value)

    async def load(self) -> StoredState:
        """Everything stored (empty on a fresh Redis)."""
        raw = await self.redis.hgetall(self.instances_key)
        meta = await self.redis.hgetall(self.meta_key)
        return parse_state(raw, meta)

    async def snapshot(self) -> tuple[int | None, StoredState]:
        """The fencing counter (None when missing) and the state, read in one transaction so that
        the state is the one written under that counter."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(self.fence_key).hgetall(self.instances_key).hgetall(self.meta_key)
            counter, raw, meta = await pipe.execute()
        return (int(counter) if counter is not None else None), parse_state(raw, meta)


def merge_states(fresh: StoredState, known: StoredState) -> StoredState:
    """``fresh`` (read from a Redis that lost data) completed with what this controller knew before:
    the records ``fresh`` lacks come from ``known``."""
    missing = [i for i in known.instances if all(i.instance_id != f.instance_id for f in fresh.instances)]
    ids = {i.instance_id for i in missing}
    return StoredState(
        instances=sorted([*fresh.instances, *missing], key=lambda i: i.instance_id),
        draining=fresh.draining | (known.draining & ids),
        ratio=fresh.ratio or known.ratio,
        version=max(fresh.version, known.version),
        flips={**{k: v for k, v in known.flips.items() if k in ids}, **fresh.flips},
    )


def parse_state(raw: dict[str, str], meta: dict[str, str]) -> StoredState:
    """The state from the instances hash and the meta hash as Redis returns them."""
    instances, draining, flips = [], set(), {}
    for instance_id in sorted(raw):
        info, drained = decode_instance(instance_id, raw[instance_id])
        instances.append(info)
        if drained:
            draining.add(instance_id)
        flip_to = json.loads(raw[instance_id]).get("flip_to")
        if flip_to:
            flips[instance_id] = Role(flip_to)
    return StoredState(instances, draining, meta.get("ratio"), int(meta.get("version", "0")), flips)
