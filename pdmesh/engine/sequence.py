"""``Sequence``: the engine's running state of one request."""

from __future__ import annotations

import torch

from pdmesh.engine.grammar import GrammarMatcher
from pdmesh.engine.sampling import SampleInput
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import RequestMode, SamplingParams


class Sequence:
    """Prompt and generated tokens, the KV blocks holding them, and the request's generator."""

    def __init__(self, request: EngineRequest, order: int, generator: torch.Generator | None) -> None:
        self.request_id = request.request_id
        self.mode = request.mode
        self.sampling: SamplingParams = request.sampling
        self.prompt_ids = list(request.prompt_ids)
        self.output_ids: list[int] = []
        self.block_table: list[int] = []
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.block_hashes: list[int] = []  # prefix-cache names of the full blocks computed so far
        self.order = order  # admission order: the newest is preempted first
        self.generator = generator
        self.chunk_end: int | None = None  # chunked prefill: compute tokens up to here this step
        self.replica = 0  # the dp replica whose blocks and scheduler hold it
        self.grammar: GrammarMatcher | None = None  # structured outputs: where its output is in the grammar
        # prompt logprobs (engine/prompt_logprobs.py): collected during the first prefill, sent once
        asked = request.sampling.prompt_logprobs is not None and request.mode != RequestMode.DECODE
        self.prompt_logprobs: list | None = [None] if asked else None
        self.prompt_logprobs_sent = False
        if request.mode == RequestMode.DECODE:
            self.output_ids.append(int(request.first_token))
            self.block_table = list(request.kv_block_ids or [])
            self.num_computed = len(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefill_end(self) -> int:
        """Where this step's prefill stops: the chunk's end, or all tokens."""
        return self.num_tokens if self.chunk_end is None else self.chunk_end

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def append(self, token: int) -> None:
        self.output_ids.append(token)
        if self.grammar is not None:
            self.grammar.accept(token)

    def sample_input(self) -> SampleInput:
        allowed = self.grammar.allowed() if self.grammar is not None else None
        return SampleInput(self.sampling, self.generator, self.prompt_ids, self.output_ids, allowed)
