"""Engine-internal data: the request the engine schedules and the load figures it reports.

The engine never sees protobuf; servicers turn messages into these dataclasses. The plain request
types shared with the coordinator live in ``pdmesh.generation``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.generation import RequestMode, SamplingParams


@dataclass
class EngineRequest:
    """One request handed to the engine."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    mode: RequestMode = RequestMode.MIXED
    # DECODE mode only: the token prefill sampled, and the blocks that already hold the prompt's KV
    # (allocated with ``allocate_kv`` and filled by a transfer). The engine owns them from then on.
    first_token: int | None = None
    kv_block_ids: list[int] | None = None


@dataclass
class EngineStats:
    """Load figures a worker reports in its heartbeat."""

    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    queued_prefill_tokens: int
    prefix_cache_query_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int = 0  # of which found there (their KV reused)
