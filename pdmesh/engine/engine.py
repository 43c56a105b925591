"""``LLMEngine``: token-in, token-out over a paged KV cache with continuous batching.

Each ``step`` is schedule -> execute -> update: the scheduler picks a prefill or a decode batch,
the model runner computes next-token logits, sampling picks tokens, and the engine appends them,
checks stop conditions and frees the blocks of finished sequences.

PREFILL requests stop after their first token and leave their prompt's blocks pinned for the
caller (``free_kv``); DECODE requests adopt blocks filled elsewhere and continue from
``first_token``. Blocks handed out by ``allocate_kv`` or pinned by PREFILL are "external": owned by
the caller until adopted by a DECODE request or given back with ``free_kv``.

As the leader of a parallel instance (``executor`` given) the engine keeps one block manager and
scheduler per dp replica (``replicas``), prepares every replica's step and hands them to the
executor, which runs them on all ranks and returns the logits; sampling and bookkeeping stay here.
A failure there breaks the whole instance (the ranks are out of step), so it is not absorbed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import torch

from pdmesh.accelerator import dtype_name, resolve_device, resolve_dtype
from pdmesh.engine import prompt_logprobs
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.grammar import GrammarCompiler
from pdmesh.engine.linear_choice import LinearChoice
from pdmesh.engine.model_runner import ModelRunner
from pdmesh.engine.replicas import ReplicaSet
from pdmesh.engine.sampling import sample
from pdmesh.engine.scheduler import ScheduledBatch
from pdmesh.engine.sequence import Sequence
from pdmesh.engine.step import StepInputs
from pdmesh.engine.types import EngineRequest, EngineStats
from pdmesh.engine.validation import validate_ownership, validate_static
from pdmesh.generation import FinishReason, RequestMode, TokenOutput
from pdmesh.kv.types import KVLayout
from pdmesh.models import load_model
from pdmesh.parallel.state import current as parallel_state

log = logging.getLogger(__name__)

# (num_blocks, layout) -> a zeroed [num_blocks, *layout.block_shape] tensor on the engine's device
PoolAllocator = Callable[[int, KVLayout], torch.Tensor]


class StepExecutor(Protocol):
    """Runs one step on every rank of a parallel instance (``pdmesh.parallel.executor``): each dp
    replica's inputs (None: idle) in, each replica's full-vocabulary logits (None: none asked) out."""

    def run_step(self, plans: list[StepInputs | None]) -> list[torch.Tensor | None]: ...


MAX_AUTO_BLOCKS_PER_SEQ_FACTOR = 1  # auto-sized pools hold at most max_num_seqs full-length sequences


class LLMEngine:
    """One model, one KV pool, one scheduler per dp replica; driven by ``step``."""

    def __init__(
        self,
        config: EngineConfig,
        pool_allocator: PoolAllocator | None = None,
        executor: StepExecutor | None = None,
    ) -> None:
        self.config = config
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype)
        self.model, self.model_config = load_model(config.model_dir, self.dtype, self.device)
        mc = self.model_config
        self._max_model_len = min(
            config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
        )
        self.block_shape = tuple(self.model.kv_block_shape(config.block_size))
        kv_heads, kv_dim = self.model.kv_heads_and_dim()
        self._layout = KVLayout(
            model=mc.fingerprint(),
            kind=self.model.kv_kind,
            num_layers=mc.num_layers,
            num_kv_heads=kv_heads,
            head_dim=kv_dim,
            block_size=config.block_size,
            dtype=dtype_name(self.dtype),
            block_shape=self.block_shape,
        )
        num_blocks = config.num_blocks or self._auto_num_blocks()
        if pool_allocator is None:
            self._kv_pool = torch.zeros((num_blocks, *self.block_shape), dtype=self.dtype, device=self.device)
        else:  # e.g. a shared-memory pool that a transfer backend serves
            self._kv_pool = pool_allocator(num_blocks, self._layout)
        self.executor = executor
        self.replicas = ReplicaSet(parallel_state().dp if executor is not None else 1, config, num_blocks)
        self.blocks, self.scheduler = self.replicas[0].blocks, self.replicas[0].scheduler
        self.runner = ModelRunner(
            self.model,
            self._kv_pool,
            config.block_size,
            self.device,
            workspace_bytes=config.decode_workspace_mib << 20,
            linear=LinearChoice(config.workload, config.linear_kernel, config.max_prefill_tokens),
        )
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[TokenOutput] = []
        self._external: Counter[int] = Counter()  # caller-owned block -> references held
        self._order = 0
        self.ran_batch = False  # whether the last step ran a batch (False: nothing could run)
        self.last_batches: list[tuple[bool, int]] = []  # the last step's (is_prefill, size) (metrics)
        self._rng = torch.Generator().manual_seed(config.seed)
        # structured outputs: the matchers of constrained requests
        self.grammars = GrammarCompiler(config.model_dir, mc.vocab_size, mc.eos_token_ids)
        log.info(
            "engine ready: %s, %d KV blocks of %d tokens", mc.fingerprint(), num_blocks, config.block_size
        )

    def _auto_num_blocks(self) -> int:
        block_bytes = torch.Size(self.block_shape).numel() * torch.empty((), dtype=self.dtype).element_size()
        by_memory = self.config.kv_cache_memory_mib * 1024 * 1024 // block_bytes
        per_seq = -(-self._max_model_len // self.config.block_size)
        return max(1, min(by_memory, per_seq * self.config.max_num_seqs * MAX_AUTO_BLOCKS_PER_SEQ_FACTOR))

    # -- properties -------------------------------------------------------------------------------

    @property
    def kv_pool(self) -> torch.Tensor:
        return self._kv_pool

    @property
    def kv_layout(self) -> KVLayout:
        return self._layout

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.model_config.eos_token_ids)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    # -- requests ---------------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Queues ``request``; ValueError (naming the problem) when it is invalid or can never fit."""
        if request.request_id in self._seqs:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        self.check_request(request)
        validate_ownership(request, self._external)
        replica = self.replicas[self.replicas.pick(request)]
        seq = Sequence(request, self._order, self._generator(request))
        seq.replica = replica.index
        seq.grammar = self.grammars.start(request)  # structured outputs
        self._order += 1
        if request.mode == RequestMode.DECODE:
            self._external.subtract(seq.block_table)
            self._external = +self._external
            seq.block_table = self.replicas.one_replica(seq.block_table)[1]
            reason = self._stop_reason(seq, seq.output_ids[-1])
            if reason is not None:  # the first token already ends it: nothing to generate
                replica.blocks.free(seq.block_table)
                self._pending.append(self._output(seq, [], reason))
                return
        self._seqs[request.request_id] = seq
        replica.scheduler.add(seq)

    def check_request(self, request: EngineRequest) -> None:
        """The checks that read nothing a step changes: safe from any thread (ValueError naming the problem)."""
        validate_static(request, self._max_model_len, self.vocab_size, self.blocks)
        self.grammars.start(request)  # structured outputs: the constraint compiles and its tokens follow it
        if request.mode == RequestMode.DECODE and request.kv_block_ids and len(self.replicas) > 1:
            self.replicas.one_replica(request.kv_block_ids)

    def _generator(self, request: EngineRequest) -> torch.Generator | None:
        if request.sampling.greedy:
            return None
        seed = request.sampling.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
        return torch.Generator(device=self.device).manual_seed(seed)

    def abort(self, request_id: str) -> bool:
        """Cancels a request: frees its blocks and emits a finished output (reason ABORT) next step."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.replicas.of(seq).scheduler.remove(seq)
        self._release(seq)
        self._pending.append(self._output(seq, [], FinishReason.ABORT))
        return True

    def has_unfinished(self) -> bool:
        return bool(self._seqs or self._pending)

    def allocate_kv(self, num_tokens: int) -> list[int] | None:
        """Blocks for ``num_tokens`` tokens owned by the caller (for a KV transfer), or None if short.

        With several dp replicas they all lie in the replica with the most free blocks (global ids:
        ``replica_of`` tells which)."""
        replica = self.replicas.for_allocation(num_tokens) if num_tokens >= 1 else None
        if replica is None:
            return None
        ids = self.replicas.to_global(replica.index, replica.blocks.allocate(num_tokens))
        self._external.update(ids)
        return ids

    def replica_of(self, block_ids: list[int]) -> tuple[int, list[int]]:
        """``(dp replica, ids in its pool)`` of blocks that all lie in one replica (ValueError if not)."""
        return self.replicas.one_replica(block_ids)

    def free_kv(self, block_ids: list[int]) -> None:
        """Gives back caller-owned blocks (from ``allocate_kv`` or a PREFILL output); repeats are ignored."""
        owned = []
        for b in block_ids:
            if self._external[b] > 0:
                self._external[b] -= 1
                owned.append(b)
        self._external = +self._external
        if len(owned) != len(block_ids):
            log.warning(
                "free_kv: %d of %d blocks were not caller-owned", len(block_ids) - len(owned), len(block_ids)
            )
        for replica, local in self.replicas.split(owned).items():
            self.replicas[replica].blocks.free(local)

    def stats(self) -> EngineStats:
        reps = list(self.replicas)
        return EngineStats(
            running=sum(len(r.scheduler.running) for r in reps),
            waiting=sum(len(r.scheduler.waiting) for r in reps),
            free_blocks=sum(r.blocks.num_free_blocks for r in reps),
            total_blocks=sum(r.blocks.num_blocks for r in reps),
            queued_prefill_tokens=sum(r.scheduler.queued_prefill_tokens() for r in reps),
            prefix_cache_query_tokens=sum(r.blocks.prefix_query_tokens for r in reps),
            prefix_cache_hit_tokens=sum(r.blocks.prefix_hit_tokens for r in reps),
        )

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[TokenOutput]:
        """Runs one batch (one per dp replica); returns this step's outputs (and any queued
        abort/finish outputs)."""
        if self.executor is not None:
            return self._step_replicas()
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        self.ran_batch = batch is not None
        self.last_batches = [] if batch is None else [(batch.is_prefill, len(batch.seqs))]
        if batch is None:
            return outputs
        try:
            # a non-final chunk of a long prompt only writes KV (and any prompt logprobs)
            logits = self.runner.run(batch.seqs, batch.is_prefill, not batch.partial)
            logits = prompt_logprobs.take(batch.seqs, batch.is_prefill, logits, not batch.partial)
            if batch.partial:
                self._advance_chunk(batch.seqs[0])
                return outputs
            tokens, logprobs = sample(logits, [s.sample_input() for s in batch.seqs])
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep the engine alive
            log.exception("step failed for %d sequences", len(batch.seqs))
            return outputs + self.fail([s.request_id for s in batch.seqs], f"{type(exc).__name__}: {exc}")
        self._finish_batch(batch, tokens, logprobs, outputs)
        return outputs

    def _step_replicas(self) -> list[TokenOutput]:
        """One step of every dp replica, run by the executor on all ranks of the instance."""
        outputs, self._pending = self._pending, []
        batches: list[ScheduledBatch | None] = [r.scheduler.schedule() for r in self.replicas]
        self.ran_batch = any(b is not None for b in batches)
        self.last_batches = [(b.is_prefill, len(b.seqs)) for b in batches if b is not None]
        if not self.ran_batch:
            return outputs
        plans = [
            None if b is None else self.runner.prepare(b.seqs, b.is_prefill, logits=not b.partial)
            for b in batches
        ]
        all_logits = self.executor.run_step(plans)  # raises when the instance broke: not absorbed
        for batch, logits in zip(batches, all_logits, strict=True):
            if batch is None:
                continue
            logits = prompt_logprobs.take(batch.seqs, batch.is_prefill, logits, not batch.partial)
            if batch.partial:
                self._advance_chunk(batch.seqs[0])
                continue
            tokens, logprobs = sample(logits, [s.sample_input() for s in batch.seqs])
            self._finish_batch(batch, tokens, logprobs, outputs)
        return outputs

    def _finish_batch(self, batch: ScheduledBatch, tokens, logprobs, outputs: list[TokenOutput]) -> None:
        for seq, token, lp in zip(batch.seqs, tokens, logprobs, strict=True):
            outputs.append(self._update(seq, token, lp, batch.is_prefill))
        if not self._seqs and self.runner.workspace is not None:
            self.runner.workspace.release()  # idle: give the decode workspace's memory back

    def fail(self, request_ids: list[str], error: str) -> list[TokenOutput]:
        """Finishes these requests with FinishReason.ERROR, freeing their blocks."""
        outputs = []
        for rid in request_ids:
            seq = self._seqs.pop(rid, None)
            if seq is not None:
                self.replicas.of(seq).scheduler.remove(seq)
                self._release(seq)
                outputs.append(self._output(seq, [], FinishReason.ERROR, error=error))
        return outputs

    def _cache_full_blocks(self, seq: Sequence) -> None:
        blocks = self.replicas.of(seq).blocks
        if seq.num_computed // blocks.block_size > len(seq.block_hashes):
            blocks.cache_full_blocks(seq.block_table, seq.token_ids[: seq.num_computed], seq.block_hashes)

    def _advance_chunk(self, seq: Sequence) -> None:
        seq.num_computed, seq.chunk_end = seq.prefill_end, None
        self._cache_full_blocks(seq)

    def _update(self, seq: Sequence, token: int, lp, was_prefill: bool) -> TokenOutput:
        output = self._advance(seq, token, lp, was_prefill)
        if was_prefill and prompt_logprobs.collects(seq):  # they go out with the first token
            output.prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        return output

    def _advance(self, seq: Sequence, token: int, lp, was_prefill: bool) -> TokenOutput:
        seq.num_computed = seq.num_tokens
        self._cache_full_blocks(seq)
        seq.append(token)
        lps = [lp] if lp is not None else None
        reason = self._stop_reason(seq, token)
        scheduler = self.replicas.of(seq).scheduler
        if seq.mode == RequestMode.PREFILL and was_prefill:
            self._seqs.pop(seq.request_id)
            scheduler.remove(seq)
            if reason is not None:
                self._release(seq)
                return self._output(seq, [token], reason, logprobs=lps)
            pinned = self.replicas.to_global(seq.replica, seq.block_table)
            seq.block_table = []
            self._external.update(pinned)
            return self._output(seq, [token], None, logprobs=lps, kv_block_ids=pinned)
        if reason is None:
            return TokenOutput(seq.request_id, [token], num_prompt_tokens=seq.num_prompt_tokens, logprobs=lps)
        self._seqs.pop(seq.request_id)
        scheduler.remove(seq)
        self._release(seq)
        return self._output(seq, [token], reason, logprobs=lps)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.sampling
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.model_config.eos_token_ids):
            return FinishReason.STOP
        if seq.grammar is not None and seq.grammar.stopped:  # structured outputs: the grammar is complete
            return FinishReason.STOP
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self._max_model_len:
            return FinishReason.LENGTH
        return None

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.replicas.of(seq).blocks.free(seq.block_table)
            seq.block_table = []

    @staticmethod
    def _output(seq: Sequence, tokens: list[int], reason: FinishReason | None, **extra) -> TokenOutput:
        return TokenOutput(
            seq.request_id,
            tokens,
            finished=True,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            **extra,
        )
