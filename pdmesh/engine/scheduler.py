"""Continuous batching: which sequences run in the next step.

Prefill first: waiting prompts are admitted in arrival order while the prefill batch, the prefill
token budget, the running-sequence cap and the free blocks allow. A prompt longer than the budget
runs alone and in chunks of ``max_prefill_tokens``: each step computes the next chunk over the KV the
earlier chunks wrote, and only the last chunk samples a token; while sequences are running, a decode
step for them follows every chunk (chunked prefill), so that a long prompt stalls their tokens by one
chunk at a time, not by its whole prefill. Otherwise one decode step for the running sequences;
when a sequence needs a block and none is free, the newest running sequence is
preempted (its blocks freed; it is recomputed from its tokens later).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from pdmesh.engine.block_manager import BlockManager
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.prompt_logprobs import collects
from pdmesh.engine.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """The sequences of one step and whether it is a prefill."""

    seqs: list[Sequence]
    is_prefill: bool
    partial: bool = False  # a non-final prefill chunk: no token is sampled


class Scheduler:
    """Waiting and running queues over one block manager."""

    def __init__(self, config: EngineConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.chunking: Sequence | None = None  # a long prompt between its prefill chunks
        self._decode_turn = False  # a chunk just ran: the running sequences step before the next one
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def queued_prefill_tokens(self) -> int:
        chunking = [self.chunking] if self.chunking is not None else []
        return sum(s.num_tokens - s.num_computed for s in [*chunking, *self.waiting])

    def schedule(self) -> ScheduledBatch | None:
        if self.chunking is not None:
            if self._decode_turn and self.running:
                self._decode_turn = False
                decode = self._schedule_decode()
                if decode:
                    return ScheduledBatch(decode, False)
            return self._next_chunk(self.chunking)
        prefill = self._schedule_prefill()
        if prefill:
            if prefill[0].chunk_end is not None:
                self._decode_turn = True
                return ScheduledBatch(prefill, True, partial=True)
            return ScheduledBatch(prefill, True)
        decode = self._schedule_decode()
        return ScheduledBatch(decode, False) if decode else None

    def _schedule_prefill(self) -> list[Sequence]:
        cfg, batch, tokens = self.config, [], 0
        while self.waiting and len(batch) < cfg.max_prefill_batch_size:
            seq = self.waiting[0]
            if len(self.running) + len(batch) >= cfg.max_num_seqs:
                break
            if seq.block_table:  # DECODE mode: its KV arrived already, straight to decoding
                self.running.append(self.waiting.popleft())
                continue
            n = seq.num_tokens
            if batch and tokens + n > cfg.max_prefill_tokens:
                break
            if collects(seq):  # prompt logprobs need every position computed: no prefix-cache hits
                if not self.blocks.can_allocate(n):
                    break
                seq.block_table, seq.num_computed = self.blocks.allocate(n), 0
            else:
                token_ids = seq.token_ids
                if not self.blocks.can_allocate_prompt(token_ids):
                    break
                seq.block_table, seq.num_computed = self.blocks.allocate_prompt(token_ids)
            batch.append(self.waiting.popleft())
            tokens += n - seq.num_computed
            if n - seq.num_computed > cfg.max_prefill_tokens:  # alone (batch rule above): chunk it
                seq.chunk_end = seq.num_computed + cfg.max_prefill_tokens
                self.chunking = seq
                return batch
        self.running.extend(batch)
        return batch

    def _next_chunk(self, seq: Sequence) -> ScheduledBatch:
        """The next chunk of the prompt being prefilled in chunks; the last one joins ``running``."""
        seq.chunk_end = min(seq.num_computed + self.config.max_prefill_tokens, seq.num_tokens)
        if seq.chunk_end < seq.num_tokens:
            self._decode_turn = True
            return ScheduledBatch([seq], True, partial=True)
        seq.chunk_end = None
        self.chunking = None
        self.running.append(seq)
        return ScheduledBatch([seq], True)

    def _schedule_decode(self) -> list[Sequence]:
        queue = deque(sorted(self.running, key=lambda s: s.order))
        scheduled: list[Sequence] = []
        while queue and len(scheduled) < self.config.max_num_seqs:
            seq = queue.popleft()
            while not self.blocks.can_append(seq.block_table, seq.num_tokens):
                if queue:
                    self.preempt(queue.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.blocks.append_slot(seq.block_table, seq.num_tokens)
                scheduled.append(seq)
        self.running = scheduled + list(queue)
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        """Frees ``seq``'s blocks and puts it back at the head of the waiting queue (recompute)."""
        log.info("preempting %s (%d tokens) for lack of KV blocks", seq.request_id, seq.num_tokens)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0
        self.num_preemptions += 1
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes ``seq`` out of whichever queue holds it (its blocks are the caller's business)."""
        if seq is self.chunking:
            self.chunking = None
            seq.chunk_end = None
        elif seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
