"""Protobuf <-> dataclass conversions for sampling parameters, token logprobs, KV layouts and handles.

Protobuf stops at the servicers: everything past them works on the dataclasses.
"""

from __future__ import annotations

from pdmesh.generation import SamplingParams
from pdmesh.kv.types import HandleState, KVHandle, KVLayout, KVPart
from pdmesh.v1 import common_pb2

# One generated token's logprobs, as the engine gives them (``TokenOutput.logprobs`` entries): the
# chosen token's logprob and {top token id: logprob}, most likely first.
TokenLogprobs = tuple[float, dict[int, float]]


def sampling_to_proto(s: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        repetition_penalty=s.repetition_penalty,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        max_tokens=s.max_tokens,
        stop_token_ids=s.stop_token_ids,
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
    )
    if s.seed is not None:
        msg.seed = s.seed
    return msg


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """The dataclass; raises ValueError naming a parameter out of bounds."""
    params = SamplingParams(
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_tokens,
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
    )
    params.validate()
    return params


def logprobs_to_proto(entries: list[TokenLogprobs] | None) -> list[common_pb2.TokenLogprobs]:
    """One message per token (none when ``entries`` is None), the top tokens in their order."""
    return [
        common_pb2.TokenLogprobs(
            logprob=chosen,
            top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in top.items()],
        )
        for chosen, top in entries or ()
    ]


def logprobs_from_proto(messages) -> list[TokenLogprobs] | None:
    """The entries of a repeated ``TokenLogprobs`` field; None when it is empty (none were asked)."""
    if not messages:
        return None
    return [(m.logprob, {t.token_id: t.logprob for t in m.top}) for m in messages]


def layout_to_proto(layout: KVLayout) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(
        model=layout.model,
        kind=layout.kind,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        block_size=layout.block_size,
        dtype=layout.dtype,
        block_shape=list(layout.block_shape),
    )


def layout_from_proto(msg: common_pb2.KVLayout) -> KVLayout:
    return KVLayout(
        model=msg.model,
        kind=msg.kind,
        num_layers=msg.num_layers,
        num_kv_heads=msg.num_kv_heads,
        head_dim=msg.head_dim,
        block_size=msg.block_size,
        dtype=msg.dtype,
        block_shape=tuple(msg.block_shape),
    )


def handle_to_proto(h: KVHandle) -> common_pb2.KVHandle:
    return common_pb2.KVHandle(
        handle_id=h.handle_id,
        request_id=h.request_id,
        prefill_instance=h.prefill_instance,
        transfer_endpoint=h.transfer_endpoint,
        block_ids=h.block_ids,
        num_tokens=h.num_tokens,
        layout=layout_to_proto(h.layout),
        expires_at=h.expires_at,
        version=h.version,
        prefill_address=h.prefill_address,
        parts=[common_pb2.KVPart(**p.to_dict()) for p in h.parts],
    )


def handle_from_proto(msg: common_pb2.KVHandle) -> KVHandle:
    return KVHandle(
        handle_id=msg.handle_id,
        request_id=msg.request_id,
        prefill_instance=msg.prefill_instance,
        transfer_endpoint=msg.transfer_endpoint,
        block_ids=list(msg.block_ids),
        num_tokens=msg.num_tokens,
        layout=layout_from_proto(msg.layout),
        expires_at=msg.expires_at,
        state=HandleState.READY,
        version=msg.version,
        prefill_address=msg.prefill_address,
        parts=[_part_from_proto(p) for p in msg.parts],
    )


def _part_from_proto(msg: common_pb2.KVPart) -> KVPart:
    return KVPart(
        rank=msg.rank,
        endpoint=msg.endpoint,
        dp_rank=msg.dp_rank,
        tp_rank=msg.tp_rank,
        tp_size=msg.tp_size,
        head_start=msg.head_start,
        head_count=msg.head_count,
        total_heads=msg.total_heads,
    )
