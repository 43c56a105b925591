"""Prompt logprobs, computed while prefilling: each prompt token's logprob given the tokens before it.

A sequence that asks (``SamplingParams.prompt_logprobs`` N, in MIXED or PREFILL mode) has every position
of its prompt projected through the LM head during its prefill (each chunk of a chunked prefill too),
not only the last. Position p's float32 log-softmax gives prompt token p+1 its logprob, its rank there
(1: the most likely) and the top N tokens there; the first prompt token has none (None). Such a prompt
takes nothing from the prefix cache (cached positions would have no logits), as in vLLM. The list goes
out once, with the first token; a sequence recomputed after a preemption does not collect again.

``logit_rows`` lays out which rows of a prefill step's hidden states are projected, ``take`` records
the collecting sequences' entries from those logits and returns the rows sampling needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pdmesh.engine.sequence import Sequence

SLICE_ROWS = 256  # positions whose log-softmax is computed at once


def collects(seq: Sequence) -> bool:
    """Whether ``seq``'s next prefill computes prompt logprobs."""
    return seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent


def logit_rows(seqs: list[Sequence], query_lens: list[int], sample: bool) -> list[int] | None:
    """Rows of a prefill step to project: every row of a collecting sequence, else each sequence's
    last when sampling; None when there are none."""
    rows: list[int] = []
    start = 0
    for seq, n in zip(seqs, query_lens, strict=True):
        if collects(seq):
            rows.extend(range(start, start + n))
        elif sample:
            rows.append(start + n - 1)
        start += n
    return rows or None


@torch.inference_mode()
def take(seqs: list[Sequence], is_prefill: bool, logits: torch.Tensor | None, sample: bool):
    """Records the prompt logprobs in a step's ``logits`` (laid out by ``logit_rows``) and returns the
    rows to sample from, one per sequence (None when the step samples nothing)."""
    if not is_prefill or logits is None or not any(collects(s) for s in seqs):
        return logits if sample else None
    picks, row = [], 0
    for seq in seqs:
        n = seq.prefill_end - seq.num_computed  # this step's tokens of it (ModelRunner.prepare)
        if collects(seq):
            _record(seq, logits[row : row + n])
            row += n
        elif sample:
            row += 1
        picks.append(row - 1)
    return logits[picks] if sample else None


def _record(seq: Sequence, rows: torch.Tensor) -> None:
    """Appends the entries of the prompt tokens these rows (positions from ``num_computed`` on) predict."""
    start = seq.num_computed
    end = min(start + rows.shape[0], seq.num_prompt_tokens - 1)  # the last position predicts a new token
    for at in range(start, end, SLICE_ROWS):  # a slice at a time: one more [rows, vocab] copy at most
        _record_rows(seq, rows[at - start : min(at + SLICE_ROWS, end) - start], at)


def _record_rows(seq: Sequence, rows: torch.Tensor, start: int) -> None:
    end = start + rows.shape[0]
    lp = torch.log_softmax(rows.float(), dim=-1)
    targets = torch.tensor(seq.prompt_ids[start + 1 : end + 1], dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, targets[:, None]).squeeze(1)
    ranks = ((lp > chosen[:, None]).sum(dim=1) + 1).tolist()
    top_n = seq.sampling.prompt_logprobs or 0
    values, ids = lp.topk(top_n, dim=-1) if top_n else (None, None)
    for i, (value, rank) in enumerate(zip(chosen.tolist(), ranks, strict=True)):
        top = {} if ids is None else dict(zip(ids[i].tolist(), values[i].tolist(), strict=True))
        seq.prompt_logprobs.append((value, int(rank), top))
