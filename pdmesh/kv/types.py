"""The KV layout two instances must share, and the handle that names a request's prefilled KV."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum


@dataclass(frozen=True)
class KVLayout:
    """Shape of one KV block in an instance's pool.

    The pool is one tensor ``[num_blocks, *block_shape]`` so that a block is one contiguous run of
    bytes, which is what the transfer backends move.
    """

    model: str
    kind: str  # "mha" or "mla"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    block_shape: tuple[int, ...]

    @property
    def block_nbytes(self) -> int:
        import torch

        return math.prod(self.block_shape) * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def mismatch(self, other: KVLayout) -> str | None:
        """None when the layouts match, else a message naming the first field that differs."""
        for name in (
            "model",
            "kind",
            "dtype",
            "block_size",
            "num_layers",
            "num_kv_heads",
            "head_dim",
            "block_shape",
        ):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"KV layout mismatch: {name} is {mine!r} here but {theirs!r} at the peer"
        return None

    def mismatch_but_heads(self, other: KVLayout) -> str | None:
        """As ``mismatch``, but two ranks of a tensor-parallel instance may cache different KV heads."""
        for name in ("model", "kind", "dtype", "block_size", "num_layers", "head_dim"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"KV layout mismatch: {name} is {mine!r} here but {theirs!r} at the peer"
        return None

    def with_heads(self, heads: int) -> KVLayout:
        """The layout of a rank that caches ``heads`` KV heads of the same model (MHA: K/V per head;
        an MLA latent row has no heads and is the same on every rank)."""
        if self.kind != "mha" or heads == self.num_kv_heads:
            return self
        shape = list(self.block_shape)
        shape[-2] = heads  # [layers, 2, block_size, heads, head_dim]
        return replace(self, num_kv_heads=heads, block_shape=tuple(shape))

    def to_dict(self) -> dict:
        return {**asdict(self), "block_shape": list(self.block_shape)}

    @classmethod
    def from_dict(cls, data: dict) -> KVLayout:
        return cls(**{**data, "block_shape": tuple(data["block_shape"])})


class HandleState(StrEnum):
    READY = "READY"
    CLAIMED = "CLAIMED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"


HANDLE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class KVPart:
    """One rank of a parallel prefill instance that holds part of a request's KV: where to pull it
    and which of the model's KV heads it caches (all of them for an MLA latent cache)."""

    rank: int
    endpoint: str
    dp_rank: int
    tp_rank: int
    tp_size: int
    head_start: int
    head_count: int
    total_heads: int

    @property
    def heads(self) -> range:
        return range(self.head_start, self.head_start + self.head_count)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KVPart:
        return cls(**data)


@dataclass
class KVHandle:
    """Where one request's prefilled KV lives (registered by the prefill worker in Redis)."""

    handle_id: str
    request_id: str
    prefill_instance: str
    transfer_endpoint: str  # e.g. "tcp://127.0.0.1:7001"
    block_ids: list[int]
    num_tokens: int
    layout: KVLayout
    expires_at: float  # unix seconds
    state: HandleState = HandleState.READY
    version: int = HANDLE_SCHEMA_VERSION
    prefill_address: str = ""  # the prefill worker's gRPC address, where Release goes
    extra: dict = field(default_factory=dict)
    # A parallel prefill instance: every rank that holds part of the KV (``layout`` is the first's,
    # each part's is ``layout.with_heads(part.head_count)``). Empty: one rank at transfer_endpoint.
    parts: list[KVPart] = field(default_factory=list)
    # What a puller must present to the transfer server (``wire.ExposedTable``): handed out only
    # through the registry, never through the coordinator; "" for a handle that needs none.
    secret: str = field(default="", repr=False)

    def to_dict(self) -> dict:
        """Plain JSON-able data (for the control channel of a parallel instance)."""
        data = asdict(self)
        data["layout"] = self.layout.to_dict()
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> KVHandle:
        return cls(
            **{
                **data,
                "layout": KVLayout.from_dict(data["layout"]),
                "state": HandleState(data["state"]),
                "parts": [KVPart.from_dict(p) for p in data.get("parts", [])],
            }
        )
