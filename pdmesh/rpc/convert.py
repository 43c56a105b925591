"""Protobuf <-> dataclass conversions for sampling parameters, token logprobs, KV layouts and handles.

Protobuf stops at the servicers: everything past them works on the dataclasses.
"""

from __future__ import annotations

from pdmesh.generation import PromptLogprob, SamplingParams, StructuredOutput
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
    if s.prompt_logprobs is not None:  # prompt logprobs
        msg.prompt_logprobs = s.prompt_logprobs
    if s.structured is not None:  # structured outputs
        msg.structured.CopyFrom(structured_to_proto(s.structured))
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
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        structured=structured_from_proto(msg),  # structured outputs
    )
    params.validate()
    return params


def structured_to_proto(s: StructuredOutput) -> common_pb2.StructuredOutput:
    return common_pb2.StructuredOutput(kind=s.kind, spec=s.spec, resume_tokens=s.resume_tokens)


def structured_from_proto(msg: common_pb2.SamplingParams) -> StructuredOutput | None:
    """The constraint a SamplingParams message carries; None when its ``structured`` is unset."""
    if not msg.HasField("structured"):
        return None
    s = msg.structured
    return StructuredOutput(kind=s.kind, spec=s.spec, resume_tokens=s.resume_tokens)


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


def prompt_logprobs_to_proto(entries: list[PromptLogprob | None] | None) -> common_pb2.PromptLogprobs | None:
    """Prompt logprobs: the message (entries from the second prompt token on), None when not asked."""
    if entries is None:
        return None
    return common_pb2.PromptLogprobs(
        tokens=[
            common_pb2.PromptTokenLogprob(
                logprob=chosen,
                rank=rank,
                top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in top.items()],
            )
            for chosen, rank, top in entries[1:]
        ]
    )


def prompt_logprobs_from_proto(owner, field: str = "prompt_logprobs") -> list[PromptLogprob | None] | None:
    """Prompt logprobs in ``owner``'s message field: one entry per prompt token, the first None; None
    when the field is unset (none asked, or not on this message)."""
    if not owner.HasField(field):
        return None
    msg = getattr(owner, field)
    return [None, *((m.logprob, m.rank, {t.token_id: t.logprob for t in m.top}) for m in msg.tokens)]


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
