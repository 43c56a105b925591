"""Turns a scheduled batch into model inputs (token ids, positions, slots, block tables) and logits.

On CPU the model's linears use weights packed once (``cpu_linear``), and float32 decode keeps the
batch's K/V in a ``DecodeWorkspace`` across steps (up to ``workspace_bytes``) and, for the dense
decoder families with the CPU kernels, runs one kernel call per layer (``fused_decode``); prefill
projects only each sequence's last position through the LM head, and a non-final prompt chunk
none at all.
"""

from __future__ import annotations

import torch
from torch import nn

from pdmesh.engine.cpu_linear import pack_linears
from pdmesh.engine.fused_decode import FusedDecoder
from pdmesh.engine.sequence import Sequence
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
    ) -> None:
        self.model = model
        self.pool = pool
        self.block_size = block_size
        self.device = device
        model.bind_kv_cache(pool)
        self.fused: FusedDecoder | None = None
        if device.type == "cpu":
            pack_linears(model)
            self.fused = FusedDecoder.build(model, pool)
        self.workspace = self._make_workspace(workspace_bytes)

    def _make_workspace(self, budget: int) -> DecodeWorkspace | None:
        """A decode workspace for standard attention in float32 on CPU (where it was measured)."""
        usable = self.device.type == "cpu" and self.pool.dtype == torch.float32
        if budget <= 0 or not usable or getattr(self.model, "kv_kind", "mha") != "mha":
            return None
        cfg = self.model.config
        return DecodeWorkspace(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.block_size, budget)

    def _tensor(self, data: list[int]) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

    def _block_tables(self, seqs: list[Sequence], width: int) -> torch.Tensor:
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])

    def _slots(self, tables: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor):
        return tables[rows, positions // self.block_size], positions % self.block_size

    def prepare_prefill(
        self, seqs: list[Sequence]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        ids, pos, rows, query_lens, context_lens = [], [], [], [], []
        for i, s in enumerate(seqs):
            start, end = s.num_computed, s.prefill_end
            ids.extend(s.token_ids[start:end])
            pos.extend(range(start, end))
            rows.extend([i] * (end - start))
            query_lens.append(end - start)
            context_lens.append(end)
        tables = self._block_tables(seqs, max(len(s.block_table) for s in seqs))
        positions = self._tensor(pos)
        blocks, offsets = self._slots(tables, self._tensor(rows), positions)
        meta = AttentionMetadata(True, blocks, offsets, tables, query_lens, context_lens)
        last = torch.tensor(query_lens).cumsum(0).sub_(1).tolist()
        return self._tensor(ids), positions, meta, last

    def prepare_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        width = max(len(s.block_table) for s in seqs)
        tables = self._block_tables(seqs, width)
        context_lens = [s.num_tokens for s in seqs]
        lens = self._tensor(context_lens)
        positions = lens - 1
        blocks, offsets = self._slots(tables, torch.arange(len(seqs), device=self.device), positions)
        mask = torch.arange(width * self.block_size, device=self.device)[None, :] < lens[:, None]
        meta = AttentionMetadata(
            False, blocks, offsets, tables, [1] * len(seqs), context_lens, mask[:, None, None, :]
        )
        ws = self.workspace
        if ws is not None and ws.begin(seqs, context_lens, self.device, self.pool.dtype):
            meta.workspace = ws
        return self._tensor([s.last_token for s in seqs]), positions, meta

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, logits: bool = True) -> torch.Tensor | None:
        """float32 logits ``[len(seqs), vocab]`` of each sequence's next token (None: not asked)."""
        if is_prefill:
            if self.workspace is not None:
                self.workspace.invalidate()
            ids, positions, meta, last = self.prepare_prefill(seqs)
            hidden = self.model(ids, positions, meta)
            if not logits:
                return None
            hidden = hidden[last]
        else:
            ids, positions, meta = self.prepare_decode(seqs)
            # small elementwise ops on one thread; the products take the threads back (all_threads)
            with single_thread(self.workspace is not None):
                if self.fused is not None and self.fused.applies(meta):
                    hidden = self.fused.forward(ids, positions, meta)
                else:
                    hidden = self.model(ids, positions, meta)
            if meta.workspace is not None:
                meta.workspace.commit()
        return self.model.compute_logits(hidden).float()
