"""The parallel layout of one instance: which ranks form which groups, as MindIE forms them.

An instance has ``world`` ranks. Attention and dense layers see them as ``dp`` replicas of ``tp``
ranks each (``tp x dp = world``): ``tp`` splits the heads, ``dp`` splits the requests (each replica
has its own scheduler and KV pool). MoE layers see the same ranks as ``moe_ep`` expert groups of
``moe_tp`` ranks each (``moe_ep x moe_tp = world``): ``moe_ep`` splits the experts, ``moe_tp`` each
expert's matrices. Groups follow MindIE's ``Mapping``:

- a tp group is ``tp`` contiguous ranks (replica ``d`` holds ranks ``d*tp .. d*tp+tp-1``);
- a dp group is the ranks with the same tp rank, strided by ``tp``;
- a moe_tp group is ``moe_tp`` contiguous ranks;
- a moe_ep group is the ranks with the same moe_tp rank, strided by ``moe_tp`` (expert groups are
  strided).

``build_layout`` is a pure function of the numbers and the model's sizes; it refuses an impossible
layout with a ``LayoutError`` that names them. ``ExpertPlacement`` is the table that puts routed
experts on expert-parallel ranks (global id -> ep rank, local slot); it starts contiguous and a
balancer may hand the engine another one with the same number of slots per rank.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """An impossible parallel layout; the message names the numbers that do not fit."""


@dataclass(frozen=True)
class ModelDims:
    """The model sizes a layout must divide (0: the model has no such part)."""

    num_heads: int
    num_kv_heads: int
    num_experts: int = 0
    intermediate_size: int = 0
    moe_intermediate_size: int = 0
    kv_replicated: bool = False  # MLA: one latent row per token, replicated on every tp rank


@dataclass(frozen=True)
class RankPlace:
    """Where one rank sits in every group kind."""

    rank: int
    tp_rank: int
    dp_rank: int
    moe_tp_rank: int
    ep_rank: int


@dataclass(frozen=True)
class ParallelLayout:
    """The groups of one instance; index a group tuple by dp rank, tp rank, moe_tp rank or ep rank."""

    world: int
    tp: int
    dp: int
    moe_ep: int
    moe_tp: int
    tp_groups: tuple[tuple[int, ...], ...]  # [dp rank] -> the replica's ranks (contiguous)
    dp_groups: tuple[tuple[int, ...], ...]  # [tp rank] -> the ranks with that tp rank (strided)
    moe_tp_groups: tuple[tuple[int, ...], ...]  # [ep rank] -> ranks sharing its experts (contiguous)
    moe_ep_groups: tuple[tuple[int, ...], ...]  # [moe_tp rank] -> ranks with that slice (strided)
    dims: ModelDims

    def place(self, rank: int) -> RankPlace:
        if not 0 <= rank < self.world:
            raise LayoutError(f"rank {rank} is outside the instance's {self.world} ranks")
        return RankPlace(
            rank=rank,
            tp_rank=rank % self.tp,
            dp_rank=rank // self.tp,
            moe_tp_rank=rank % self.moe_tp,
            ep_rank=rank // self.moe_tp,
        )

    def kv_heads(self, rank: int) -> tuple[int, int]:
        """``(first, count)`` of the model's KV heads that ``rank`` caches (``kv_head_range``)."""
        if self.dims.kv_replicated:
            return 0, self.dims.num_kv_heads
        return kv_head_range(self.dims.num_kv_heads, self.tp, self.place(rank).tp_rank)


def kv_head_range(num_kv_heads: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """``(first, count)`` of the KV heads tp rank ``tp_rank`` caches.

    Heads split evenly over tp; with fewer KV heads than tp ranks each rank caches the one KV head
    its query heads attend to, so ``tp / kv_heads`` ranks hold the same head.
    """
    if tp == 1:
        return 0, num_kv_heads
    if num_kv_heads >= tp:
        per = num_kv_heads // tp
        return tp_rank * per, per
    return tp_rank // (tp // num_kv_heads), 1


def _contiguous(world: int, size: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(range(g * size, (g + 1) * size)) for g in range(world // size))


def _strided(world: int, stride: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(range(s, world, stride)) for s in range(stride))


def check_numbers(world: int, tp: int, dp: int, moe_ep: int, moe_tp: int) -> None:
    """The checks that need no model: positive sizes and both products equal to ``world``."""
    for name, value in (("world", world), ("tp", tp), ("dp", dp), ("moe_ep", moe_ep), ("moe_tp", moe_tp)):
        if value < 1:
            raise LayoutError(f"{name} must be >= 1, got {value}")
    if tp * dp != world:
        raise LayoutError(f"tp x dp = {tp} x {dp} = {tp * dp} must equal the world size {world}")
    if moe_ep * moe_tp != world:
        raise LayoutError(
            f"moe_ep x moe_tp = {moe_ep} x {moe_tp} = {moe_ep * moe_tp} must equal the world size {world}"
        )


def _check_dims(tp: int, moe_ep: int, moe_tp: int, dims: ModelDims) -> None:
    if dims.num_heads % tp:
        raise LayoutError(f"{dims.num_heads} attention heads do not divide over tp={tp}")
    kv = dims.num_kv_heads
    if not dims.kv_replicated and tp > 1 and kv % tp and tp % kv:
        raise LayoutError(
            f"{kv} KV heads and tp={tp}: one must divide the other (split them, or replicate each "
            "head over tp / heads ranks)"
        )
    if dims.intermediate_size and dims.intermediate_size % tp:
        raise LayoutError(f"intermediate size {dims.intermediate_size} does not divide over tp={tp}")
    if dims.num_experts:
        if dims.num_experts % moe_ep:
            raise LayoutError(f"{dims.num_experts} routed experts do not divide over moe_ep={moe_ep}")
        if dims.moe_intermediate_size % moe_tp:
            raise LayoutError(
                f"expert intermediate size {dims.moe_intermediate_size} does not divide over moe_tp={moe_tp}"
            )


def build_layout(world: int, tp: int, dp: int, moe_ep: int, moe_tp: int, dims: ModelDims) -> ParallelLayout:
    """The groups of an instance of ``world`` ranks; ``LayoutError`` naming what does not fit."""
    check_numbers(world, tp, dp, moe_ep, moe_tp)
    _check_dims(tp, moe_ep, moe_tp, dims)
    return ParallelLayout(
        world=world,
        tp=tp,
        dp=dp,
        moe_ep=moe_ep,
        moe_tp=moe_tp,
        tp_groups=_contiguous(world, tp),
        dp_groups=_strided(world, tp),
        moe_tp_groups=_contiguous(world, moe_tp),
        moe_ep_groups=_strided(world, moe_tp),
        dims=dims,
    )


@dataclass(frozen=True)
class ExpertPlacement:
    """Routed experts on expert-parallel ranks: ``ep_rank_of[e]`` and ``slot_of[e]`` for expert ``e``.

    Every ep rank has ``slots`` local experts; each (ep rank, slot) holds exactly one expert.
    """

    ep_rank_of: tuple[int, ...]
    slot_of: tuple[int, ...]
    moe_ep: int

    @property
    def num_experts(self) -> int:
        return len(self.ep_rank_of)

    @property
    def slots(self) -> int:
        return self.num_experts // self.moe_ep

    @classmethod
    def contiguous(cls, num_experts: int, moe_ep: int) -> ExpertPlacement:
        """Ep rank ``r`` holds experts ``r*E/moe_ep .. (r+1)*E/moe_ep - 1`` in order (MindIE's default)."""
        if num_experts % moe_ep:
            raise LayoutError(f"{num_experts} routed experts do not divide over moe_ep={moe_ep}")
        per = num_experts // moe_ep
        return cls(
            tuple(e // per for e in range(num_experts)), tuple(e % per for e in range(num_experts)), moe_ep
        )

    @classmethod
    def from_table(cls, ep_rank_of: list[int], slot_of: list[int], moe_ep: int) -> ExpertPlacement:
        """A placement from a balancer's table; ``LayoutError`` unless every slot holds one expert."""
        placement = cls(tuple(ep_rank_of), tuple(slot_of), moe_ep)
        placement.check()
        return placement

    def check(self) -> None:
        if len(self.ep_rank_of) != len(self.slot_of):
            raise LayoutError("the placement table needs one ep rank and one slot per expert")
        if self.num_experts % self.moe_ep:
            raise LayoutError(f"{self.num_experts} routed experts do not divide over moe_ep={self.moe_ep}")
        seen = set()
        for e, (r, s) in enumerate(zip(self.ep_rank_of, self.slot_of, strict=True)):
            if not (0 <= r < self.moe_ep and 0 <= s < self.slots):
                raise LayoutError(
                    f"expert {e} placed at ep rank {r} slot {s}: outside {self.moe_ep} x {self.slots}"
                )
            if (r, s) in seen:
                raise LayoutError(f"expert {e} placed at ep rank {r} slot {s}, which holds another expert")
            seen.add((r, s))

    def experts_on(self, ep_rank: int) -> list[int]:
        """The global ids held by ``ep_rank``, in slot order."""
        owned = sorted(
            (s, e) for e, (r, s) in enumerate(zip(self.ep_rank_of, self.slot_of, strict=True)) if r == ep_rank
        )
        return [e for _, e in owned]
