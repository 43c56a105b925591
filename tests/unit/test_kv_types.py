"""KVLayout sizes, mismatch messages and serialisation; transfer helpers that need no peer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdmesh.kv.transfer.base import make_transfer_client, make_transfer_server
from pdmesh.kv.transfer.tcp import block_runs, parse_endpoint
from pdmesh.kv.types import KVLayout

pytestmark = pytest.mark.timeout(30)

LAYOUT = KVLayout("tiny", "mha", 2, 2, 8, 16, "float32", (2, 2, 16, 2, 8))


def test_block_nbytes_follows_dtype() -> None:
    assert LAYOUT.block_nbytes == 2 * 2 * 16 * 2 * 8 * 4
    assert dataclasses.replace(LAYOUT, dtype="bfloat16").block_nbytes == 2 * 2 * 16 * 2 * 8 * 2
    assert dataclasses.replace(LAYOUT, dtype="float16").block_nbytes == LAYOUT.block_nbytes // 2


def test_mismatch_is_none_for_equal_layouts() -> None:
    assert LAYOUT.mismatch(KVLayout.from_dict(LAYOUT.to_dict())) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("model", "other"), ("kind", "mla"), ("dtype", "bfloat16"), ("block_size", 32), ("num_layers", 3),
     ("num_kv_heads", 4), ("head_dim", 16), ("block_shape", (2, 2, 16, 2, 4))],
)  # fmt: skip
def test_mismatch_names_the_field(field: str, value) -> None:
    message = LAYOUT.mismatch(dataclasses.replace(LAYOUT, **{field: value}))
    assert message is not None
    assert field in message and repr(value) in message


def test_layout_round_trips_through_dict() -> None:
    data = LAYOUT.to_dict()
    assert data["block_shape"] == [2, 2, 16, 2, 8]
    assert KVLayout.from_dict(data) == LAYOUT


def test_block_runs_coalesce_consecutive_ids() -> None:
    assert block_runs([]) == []
    assert block_runs([4, 5, 6, 9, 2, 3, 3]) == [(4, 3), (9, 1), (2, 2), (3, 1)]


def test_parse_endpoint() -> None:
    assert parse_endpoint("tcp://10.0.0.1:7001") == ("10.0.0.1", 7001)
    assert parse_endpoint("tcp://[::1]:7001") == ("::1", 7001)


def test_unknown_backend_names_the_choices() -> None:
    pool = torch.zeros((4, *LAYOUT.block_shape))
    with pytest.raises(ValueError, match="tcp"):
        make_transfer_server("rdma", pool, LAYOUT, "127.0.0.1")
    with pytest.raises(ValueError, match="tcp"):
        make_transfer_client("rdma", pool, LAYOUT)


def test_pool_must_match_the_layout() -> None:
    with pytest.raises(ValueError, match="block_shape"):
        make_transfer_client("tcp", torch.zeros((4, 3)), LAYOUT)
    with pytest.raises(ValueError, match="dtype"):
        make_transfer_client("tcp", torch.zeros((4, *LAYOUT.block_shape), dtype=torch.float16), LAYOUT)
