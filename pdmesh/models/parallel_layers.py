"""Tensor-parallel building blocks: each rank holds a shard of the weight and loads only that.

- ``ColumnParallelLinear``: the output rows split over the tp group. Several projections may share
  one weight (q/k/v, gate/up), each split on its own (``ColumnShard``: which rows of the checkpoint
  tensor this rank keeps), so the local product yields this rank's heads or its slice of the
  intermediate size; no collective.
- ``RowParallelLinear``: the input columns split; the local product is summed over the tp group
  (all-reduce) and the bias, held whole, added once after the sum.
- ``VocabParallelEmbedding``: each rank holds ``ceil(vocab / tp)`` rows; ids outside its range give
  zeros and the all-reduce fills them in.
- ``ParallelLMHead``: the same rows of the output projection; a rank's logits are its slice of the
  vocabulary, which the engine gathers on the leader (``pdmesh.parallel.executor``).

The local product is the module's ``product`` (``F.linear`` over the shard); ``cpu_linear`` may
replace it with a packed one, as it replaces a plain ``nn.Linear``'s forward. At tp 1 the model
families build plain ``nn.Linear``/``MergedLinear``/``nn.Embedding`` instead, so an unsharded model
is exactly what it was before tensor parallelism existed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.parallel import comm
from pdmesh.parallel.state import current


@dataclass(frozen=True)
class ColumnShard:
    """Rows ``first .. first+rows`` of a checkpoint tensor of ``full`` rows, kept by this rank."""

    full: int
    first: int
    rows: int


def even_shard(full: int, parts: int, index: int) -> ColumnShard:
    """The ``index``-th of ``parts`` equal row ranges of ``full`` rows."""
    if full % parts:
        raise ValueError(f"{full} rows do not split over {parts} ranks")
    rows = full // parts
    return ColumnShard(full, index * rows, rows)


class ShardedLinear(nn.Module):
    """A linear over this rank's shard of the weight; ``product`` is the local ``x @ W.T``."""

    sharded = True  # the loader hands every checkpoint tensor to ``weight_loader``
    bias_in_product = True  # False: the bias is added after the collective

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias if self.bias_in_product else None)


class ColumnParallelLinear(ShardedLinear):
    """Output rows split over tp; ``shards`` name the projections stored one after another."""

    def __init__(self, in_features: int, shards: dict[str, ColumnShard], bias: bool = False) -> None:
        super().__init__()
        self.shards = shards
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, shard in shards.items():
            self.offsets[name] = offset
            offset += shard.rows
        self.out_features = offset
        self.weight = nn.Parameter(torch.empty(offset, in_features))
        self.bias = nn.Parameter(torch.empty(offset)) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        name = shard_id if shard_id is not None else next(iter(self.shards))
        shard = self.shards[name]
        if loaded.shape[0] != shard.full:
            raise ValueError(f"shard {name} has {loaded.shape[0]} rows, expected {shard.full}")
        start = self.offsets[name]
        param.data[start : start + shard.rows].copy_(loaded[shard.first : shard.first + shard.rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)


class RowParallelLinear(ShardedLinear):
    """Input columns split over tp: the local product, summed over the tp group, plus the bias."""

    bias_in_product = False

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        state = current()
        shard = even_shard(in_features, state.tp, state.tp_rank)
        self.first, self.in_local, self.in_features = shard.first, shard.rows, in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, shard.rows))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        if param is self.bias:
            param.data.copy_(loaded)
            return
        if tuple(loaded.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"row-parallel weight of shape {tuple(loaded.shape)}, expected "
                f"{(self.out_features, self.in_features)}"
            )
        param.data.copy_(loaded[:, self.first : self.first + self.in_local])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = comm.all_reduce_tp(self.product(x))
        return y if self.bias is None else y + self.bias


def vocab_range(vocab: int) -> tuple[int, int]:
    """``(first, rows)`` of the vocabulary this rank holds (the last rank's may run past ``vocab``)."""
    state = current()
    rows = -(-vocab // state.tp)
    return state.tp_rank * rows, rows


def _load_vocab_rows(param: nn.Parameter, loaded: torch.Tensor, vocab: int) -> None:
    first, rows = vocab_range(vocab)
    if loaded.shape[0] != vocab:
        raise ValueError(f"vocabulary tensor has {loaded.shape[0]} rows, expected {vocab}")
    kept = loaded[first : first + rows]
    param.data.zero_()
    param.data[: kept.shape[0]].copy_(kept)


class _VocabRows(nn.Module):
    """A [vocab, hidden] matrix of which this rank holds its slice of the vocabulary's rows."""

    sharded = True

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.first, rows = vocab_range(vocab)
        self.weight = nn.Parameter(torch.empty(rows, hidden))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        _load_vocab_rows(param, loaded, self.vocab)


class VocabParallelEmbedding(_VocabRows):
    """This rank's rows of the embedding table; the tp all-reduce assembles every token's row."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        rows.masked_fill_(outside[:, None], 0.0)
        return comm.all_reduce_tp(rows)


class ParallelLMHead(_VocabRows):
    """This rank's rows of the output projection: logits of its slice of the vocabulary."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)


def embedding(vocab: int, hidden: int) -> nn.Module:
    """``nn.Embedding`` at tp 1, else the vocab-parallel one."""
    return nn.Embedding(vocab, hidden) if current().tp == 1 else VocabParallelEmbedding(vocab, hidden)


def lm_head(vocab: int, hidden: int) -> nn.Module:
    """``nn.Linear`` at tp 1, else the vocab-parallel head."""
    return nn.Linear(hidden, vocab, bias=False) if current().tp == 1 else ParallelLMHead(vocab, hidden)


def row_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    """``nn.Linear`` at tp 1, else a row-parallel one."""
    if current().tp == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias)


def column_heads_linear(in_features: int, heads: int, per_head: int, bias: bool = False) -> nn.Module:
    """A projection to ``heads`` heads of ``per_head`` rows: ``nn.Linear`` at tp 1, else this rank's
    heads (column-parallel)."""
    if current().tp == 1:
        return nn.Linear(in_features, heads * per_head, bias=bias)
    return ColumnParallelLinear(in_features, {"heads": heads_shard(heads, per_head)}, bias=bias)


def heads_shard(heads: int, per_head: int) -> ColumnShard:
    """Rows of ``heads`` heads of ``per_head`` rows each that this rank's tp slice holds."""
    state = current()
    return even_shard(heads * per_head, state.tp, state.tp_rank)
