"""``StepInputs``: one engine step of one dp replica as plain data.

The leader of a parallel instance schedules and prepares every step; the other ranks of the
replica receive exactly this (as JSON over the instance's control channel) and run it on their
shard of the model and their part of the KV pool. Sequences are named by ``seq_keys`` (their
admission number), which the decode workspace uses to tell an unchanged batch from a new one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class StepInputs:
    """Token ids, positions and KV blocks of one replica's prefill or decode step."""

    is_prefill: bool
    token_ids: list[int]
    positions: list[int]
    block_tables: list[list[int]]  # per sequence, its blocks in this replica's pool
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens attended per sequence (cached + new)
    seq_keys: list[int]
    logit_rows: list[int] | None  # rows of the step's hidden states to project; None: no logits

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_logit_rows(self) -> int:
        return len(self.logit_rows) if self.logit_rows is not None else 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StepInputs:
        return cls(**data)
