"""A parallel prefill's handle keeps its parts through Redis' hash fields and through protobuf."""

from __future__ import annotations

import time

import pytest

from pdmesh.kv.registry import decode_handle, encode_handle
from pdmesh.kv.types import KVHandle, KVLayout, KVPart
from pdmesh.rpc.convert import handle_from_proto, handle_to_proto

pytestmark = pytest.mark.timeout(30)

LAYOUT = KVLayout("m", "mha", 2, 1, 16, 8, "float32", (2, 2, 8, 1, 16))
PARTS = [KVPart(r, f"tcp://127.0.0.1:{7000 + r}", 1, r, 2, r, 1, 2) for r in range(2)]


def handle(parts: list[KVPart]) -> KVHandle:
    return KVHandle(
        "h:1", "h", "prefill-0", PARTS[0].endpoint, [3, 4], 12, LAYOUT, time.time() + 30, parts=parts
    )


@pytest.mark.parametrize("parts", [PARTS, []], ids=["parallel", "single-rank"])
def test_parts_round_trip(parts) -> None:
    h = handle(parts)
    fields = {**encode_handle(h), "state": "READY", "expires_at": str(h.expires_at)}
    assert decode_handle(fields).parts == parts
    assert handle_from_proto(handle_to_proto(h)).parts == parts
    assert KVHandle.from_dict(h.to_dict()) == h


def test_a_handle_written_before_parts_existed_reads_as_one_rank() -> None:
    fields = {**encode_handle(handle([])), "state": "READY", "expires_at": "1.0"}
    del fields["parts"]
    assert decode_handle(fields).parts == []


def test_a_parts_layout_differs_only_in_its_heads() -> None:
    two = LAYOUT.with_heads(2)
    assert (two.num_kv_heads, two.block_shape) == (2, (2, 2, 8, 2, 16))
    assert LAYOUT.mismatch_but_heads(two) is None and LAYOUT.mismatch(two) is not None
