"""Token sampling for a batch: penalties, temperature, top-k, top-p, min-p, per-request seeds.

Greedy rows (temperature 0) take the argmax after penalties. Random rows draw with the exponential
race (``argmax(p / E)``, ``E ~ Exp(1)``) using the request's own ``torch.Generator``, which draws
exactly one vector per step: a seeded request gets the same tokens whatever else is in the batch.
Logprobs are those of the model's raw distribution (before penalties and temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdmesh.engine.grammar import apply_masks
from pdmesh.generation import SamplingParams
from pdmesh.kernels import cpu as cpu_kernels
from pdmesh.models.threads import configured_threads

Logprobs = tuple[float, dict[int, float]]


@dataclass
class SampleInput:
    """What sampling needs from one sequence."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]
    allowed: torch.Tensor | None = None  # structured outputs: the tokens its grammar accepts next


def _needs_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def apply_penalties(logits: torch.Tensor, inputs: list[SampleInput]) -> torch.Tensor:
    """Repetition (prompt and output tokens), presence and frequency (output tokens) penalties."""
    rows = [i for i, inp in enumerate(inputs) if _needs_penalties(inp.params)]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in rows:
        p, row = inputs[i].params, logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(
                sorted(set(inputs[i].prompt_ids) | set(inputs[i].output_ids)),
                dtype=torch.long,
                device=row.device,
            )
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if inputs[i].output_ids and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(
                torch.tensor(inputs[i].output_ids, dtype=torch.long, device=row.device), minlength=vocab
            )
            counts = counts[:vocab].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def _filter_sorted(sorted_logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Masks (to -inf) what top-k, top-p and min-p exclude, on logits sorted in descending order."""
    vocab = sorted_logits.shape[-1]
    ranks = torch.arange(vocab, device=sorted_logits.device)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=sorted_logits.device)
    masked = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = masked.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=probs.device, dtype=probs.dtype)
    before = probs.cumsum(dim=-1) - probs  # mass strictly ahead of each token; the first is always kept
    masked = masked.masked_fill((before >= top_p[:, None]) & (top_p[:, None] < 1.0), float("-inf"))
    min_p = torch.tensor([p.min_p for p in params], device=probs.device, dtype=probs.dtype)
    masked = masked.masked_fill(probs < min_p[:, None] * probs[:, :1], float("-inf"))
    return masked


def _sample_random(logits: torch.Tensor, inputs: list[SampleInput]) -> list[int]:
    params = [inp.params for inp in inputs]
    temps = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
    scaled = logits / temps[:, None]
    filtering = any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params)
    if filtering:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        scaled = torch.empty_like(scaled).scatter_(1, order, _filter_sorted(sorted_logits, params))
    probs = scaled.softmax(dim=-1)
    tokens = []
    for i, inp in enumerate(inputs):
        noise = torch.empty_like(probs[i]).exponential_(generator=inp.generator).clamp_min_(1e-20)
        tokens.append(int(torch.argmax(probs[i] / noise)))
    return tokens


def _logprobs(logits: torch.Tensor, tokens: list[int], inputs: list[SampleInput]) -> list[Logprobs | None]:
    rows = [i for i, inp in enumerate(inputs) if inp.params.logprobs > 0]
    result: list[Logprobs | None] = [None] * len(inputs)
    if not rows:
        return result
    lp = torch.log_softmax(logits[rows].float(), dim=-1)
    for j, i in enumerate(rows):
        values, ids = lp[j].topk(inputs[i].params.logprobs)
        top = {int(t): float(v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)}
        result[i] = (float(lp[j, tokens[i]]), top)
    return result


def _argmax(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the CPU kernel, about 6x torch's at 32 x 32000, where it applies)."""
    if cpu_kernels.enabled(logits) and logits.dim() == 2 and logits.stride(1) == 1:
        return cpu_kernels.argmax(logits, configured_threads())
    return logits.argmax(dim=-1).tolist()


@torch.inference_mode()
def sample(logits: torch.Tensor, inputs: list[SampleInput]) -> tuple[list[int], list[Logprobs | None]]:
    """One token per row of ``logits`` ``[B, V]`` (float32), and its logprobs when asked."""
    processed = apply_penalties(logits, inputs)
    processed = apply_masks(processed, [inp.allowed for inp in inputs], logits)  # structured outputs
    tokens = [0] * len(inputs)
    greedy = [i for i, inp in enumerate(inputs) if inp.params.greedy]
    if len(greedy) == len(inputs):  # all greedy: one argmax, no row copy
        tokens = _argmax(processed)
    elif greedy:
        chosen = _argmax(processed[greedy])
        for i, t in zip(greedy, chosen, strict=True):
            tokens[i] = int(t)
    rand = [i for i, inp in enumerate(inputs) if not inp.params.greedy]
    if rand:
        for i, t in zip(rand, _sample_random(processed[rand], [inputs[i] for i in rand]), strict=True):
            tokens[i] = t
    return tokens, _logprobs(logits, tokens, inputs)
