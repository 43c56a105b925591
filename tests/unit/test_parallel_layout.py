"""The parallel layout as MindIE forms it, the refusals that name the numbers, the expert table."""

from __future__ import annotations

import pytest

from pdmesh.parallel.layout import ExpertPlacement, LayoutError, ModelDims, build_layout, kv_head_range

pytestmark = pytest.mark.timeout(30)

DSV3 = ModelDims(num_heads=128, num_kv_heads=128, num_experts=256, intermediate_size=18432,
                 moe_intermediate_size=2048, kv_replicated=True)  # fmt: skip


def test_mindie_prefill_instance_tp8_dp2_moe_ep4_moe_tp4_on_16_ranks() -> None:
    layout = build_layout(16, tp=8, dp=2, moe_ep=4, moe_tp=4, dims=DSV3)
    assert layout.tp_groups == (tuple(range(0, 8)), tuple(range(8, 16)))  # contiguous
    assert layout.dp_groups == tuple((t, t + 8) for t in range(8))  # strided by tp
    assert layout.moe_tp_groups == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15))
    assert layout.moe_ep_groups == ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15))
    place = layout.place(13)
    assert (place.tp_rank, place.dp_rank, place.moe_tp_rank, place.ep_rank) == (5, 1, 1, 3)
    assert layout.kv_heads(13) == (0, 128)  # MLA: the latent cache is whole on every rank


def test_mindie_decode_instance_dp64_moe_ep64_on_64_ranks() -> None:
    layout = build_layout(64, tp=1, dp=64, moe_ep=64, moe_tp=1, dims=DSV3)
    assert layout.tp_groups == tuple((r,) for r in range(64))
    assert layout.dp_groups == (tuple(range(64)),)
    assert layout.moe_tp_groups == tuple((r,) for r in range(64))
    assert layout.moe_ep_groups == (tuple(range(64)),)
    placement = ExpertPlacement.contiguous(256, 64)
    assert placement.experts_on(63) == [252, 253, 254, 255]
    assert (placement.ep_rank_of[5], placement.slot_of[5]) == (1, 1)


@pytest.mark.parametrize(
    ("numbers", "dims", "message"),
    [
        ((4, 2, 1, 4, 1), ModelDims(8, 8), "tp x dp = 2 x 1 = 2 must equal the world size 4"),
        ((4, 4, 1, 2, 1), ModelDims(8, 8), "moe_ep x moe_tp = 2 x 1 = 2 must equal the world size 4"),
        ((4, 4, 1, 4, 1), ModelDims(6, 6), "6 attention heads do not divide over tp=4"),
        ((4, 4, 1, 4, 1), ModelDims(8, 3), "3 KV heads and tp=4"),
        ((2, 2, 1, 2, 1), ModelDims(4, 2, num_experts=7, moe_intermediate_size=8), "7 routed experts do not divide over moe_ep=2"),
        ((2, 2, 1, 1, 2), ModelDims(4, 2, num_experts=8, moe_intermediate_size=9), "expert intermediate size 9 does not divide over moe_tp=2"),
        ((2, 2, 1, 2, 1), ModelDims(4, 2, intermediate_size=7), "intermediate size 7 does not divide over tp=2"),
    ],
)  # fmt: skip
def test_impossible_layouts_are_refused_naming_the_numbers(numbers, dims, message) -> None:
    with pytest.raises(LayoutError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_layout(*numbers, dims=dims)


def test_kv_heads_split_or_replicated_over_tp() -> None:
    assert [kv_head_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    # two KV heads over four ranks: each rank caches the head its query heads attend to
    assert [kv_head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert kv_head_range(2, 1, 0) == (0, 2)


def test_a_balancer_table_is_checked() -> None:
    table = ExpertPlacement.from_table([1, 1, 0, 0], [0, 1, 0, 1], moe_ep=2)
    assert table.experts_on(0) == [2, 3] and table.experts_on(1) == [0, 1]
    with pytest.raises(LayoutError, match="holds another expert"):
        ExpertPlacement.from_table([0, 0, 0, 1], [0, 1, 1, 0], moe_ep=2)
    with pytest.raises(LayoutError, match="outside"):
        ExpertPlacement.from_table([0, 2, 1, 1], [0, 0, 0, 1], moe_ep=2)
