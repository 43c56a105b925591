"""Turns a scheduled batch into model inputs (token ids, positions, slots, block tables) and logits.

``prepare`` makes a ``StepInputs`` (plain lists) from the scheduled sequences and ``execute`` runs
it on this rank, so that an instance's leader can hand the same step to the other ranks of a
tensor-parallel replica (``pdmesh.parallel.executor``); ``run`` is both on one rank.

On CPU the model's linears use weights packed once (``cpu_linear``), and float32 decode keeps the
batch's K/V in a ``DecodeWorkspace`` across steps (up to ``workspace_bytes``) and, for the dense
decoder families with the CPU kernels, runs one kernel call per layer (``fused_decode``); prefill
projects only each sequence's last position through the LM head, and a non-final prompt chunk
none at all (except a prompt asking for prompt logprobs: all its positions, prompt_logprobs.py).
"""

from __future__ import annotations

import torch
from torch import nn

from pdmesh.engine import prompt_logprobs
from pdmesh.engine.cpu_linear import pack_linears, usable_kernels
from pdmesh.engine.fused_decode import FusedDecoder
from pdmesh.engine.linear_choice import LinearChoice
from pdmesh.engine.sequence import Sequence
from pdmesh.engine.step import StepInputs
from pdmesh.models import AttentionMetadata
from pdmesh.models.decode_workspace import DecodeWorkspace
from pdmesh.models.threads import single_thread


class ModelRunner:
    """Runs the model over the KV pool for one prefill or decode batch."""

    def __init__(
        self,
        model: nn.Module,
        pool: torch.Tensor,
        block_size: int,
        device: torch.device,
        workspace_bytes: int = 0,
        linear: LinearChoice | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.block_size = block_size
        self.device = device
        model.bind_kv_cache(pool)
        self.fused: FusedDecoder | None = None
        self.linear_kernel = "torch"  # the CPU linear product in use (linear_choice)
        if device.type == "cpu":
            choice = linear or LinearChoice()
            self.linear_kernel = choice.resolve(
                model, usable_kernels(model) or ["torch"], torch.get_num_threads()
            )
            pack_linears(model, self.linear_kernel)
            self.fused = FusedDecoder.build(model, pool)
        self.workspace = self._make_workspace(workspace_bytes)

    def _make_workspace(self, budget: int) -> DecodeWorkspace | None:
        """A decode workspace for standard attention in float32 on CPU (where it was measured)."""
        usable = self.device.type == "cpu" and self.pool.dtype == torch.float32
        if budget <= 0 or not usable or getattr(self.model, "kv_kind", "mha") != "mha":
            return None
        cfg = self.model.config
        kv_heads = getattr(self.model, "local_kv_heads", lambda: cfg.num_kv_heads)()
        return DecodeWorkspace(cfg.num_layers, kv_heads, cfg.head_dim, self.block_size, budget)

    def _tensor(self, data: list[int]) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

    def _block_tables(self, tables: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables)
        return self._tensor([t + [0] * (width - len(t)) for t in tables])

    def _slots(self, tables: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor):
        return tables[rows, positions // self.block_size], positions % self.block_size

    @staticmethod
    def prepare(seqs: list[Sequence], is_prefill: bool, logits: bool = True) -> StepInputs:
        """The step's inputs from the scheduled sequences (what the replica's other ranks are sent)."""
        tables = [list(s.block_table) for s in seqs]
        keys = [s.order for s in seqs]
        if not is_prefill:
            context_lens = [s.num_tokens for s in seqs]
            return StepInputs(
                False,
                [s.last_token for s in seqs],
                [n - 1 for n in context_lens],
                tables,
                [1] * len(seqs),
                context_lens,
                keys,
                list(range(len(seqs))) if logits else None,
            )
        ids, pos, query_lens, context_lens = [], [], [], []
        for s in seqs:
            start, end = s.num_computed, s.prefill_end
            ids.extend(s.token_ids[start:end])
            pos.extend(range(start, end))
            query_lens.append(end - start)
            context_lens.append(end)
        rows = prompt_logprobs.logit_rows(seqs, query_lens, logits)  # the last rows, or every row
        return StepInputs(True, ids, pos, tables, query_lens, context_lens, keys, rows)

    def _prefill_meta(self, inputs: StepInputs) -> tuple[torch.Tensor, AttentionMetadata]:
        tables = self._block_tables(inputs.block_tables)
        positions = self._tensor(inputs.positions)
        rows = self._tensor([i for i, n in enumerate(inputs.query_lens) for _ in range(n)])
        blocks, offsets = self._slots(tables, rows, positions)
        meta = AttentionMetadata(True, blocks, offsets, tables, inputs.query_lens, inputs.context_lens)
        return positions, meta

    def _decode_meta(self, inputs: StepInputs) -> tuple[torch.Tensor, AttentionMetadata]:
        tables = self._block_tables(inputs.block_tables)
        width = tables.shape[1]
        context_lens = inputs.context_lens
        lens = self._tensor(context_lens)
        positions = lens - 1
        batch = len(context_lens)
        blocks, offsets = self._slots(tables, torch.arange(batch, device=self.device), positions)
        mask = torch.arange(width * self.block_size, device=self.device)[None, :] < lens[:, None]
        meta = AttentionMetadata(
            False, blocks, offsets, tables, [1] * batch, context_lens, mask[:, None, None, :]
        )
        ws = self.workspace
        if ws is not None and ws.begin(inputs.seq_keys, context_lens, self.device, self.pool.dtype):
            meta.workspace = ws
        return positions, meta

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """The step on this rank: float32 logits of ``inputs.logit_rows`` (this rank's slice of the
        vocabulary under tensor parallelism), None when no rows are asked."""
        ids = self._tensor(inputs.token_ids)
        if inputs.is_prefill:
            if self.workspace is not None:
                self.workspace.invalidate()
            positions, meta = self._prefill_meta(inputs)
            hidden = self.model(ids, positions, meta)
        else:
            positions, meta = self._decode_meta(inputs)
            # small elementwise ops on one thread; the products take the threads back (all_threads)
            with single_thread(self.workspace is not None):
                if self.fused is not None and self.fused.applies(meta):
                    hidden = self.fused.forward(ids, positions, meta)
                else:
                    hidden = self.model(ids, positions, meta)
            if meta.workspace is not None:
                meta.workspace.commit()
        if inputs.logit_rows is None:
            return None
        if inputs.is_prefill:
            hidden = hidden[inputs.logit_rows]
        return self.model.compute_logits(hidden).float()

    def run(self, seqs: list[Sequence], is_prefill: bool, logits: bool = True) -> torch.Tensor | None:
        """float32 logits ``[len(seqs), vocab]`` of each sequence's next token (None: not asked)."""
        return self.execute(self.prepare(seqs, is_prefill, logits))
