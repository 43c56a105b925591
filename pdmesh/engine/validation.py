"""Checks a request must pass at submission; each failure is a ValueError that names the problem.

``validate_static`` reads only what never changes after the engine loaded (vocabulary, context length,
pool size), so any thread may call it while a step runs; ``validate_ownership`` reads the blocks a
caller owns and runs on the engine's thread.
"""

from __future__ import annotations

from collections.abc import Mapping

from pdmesh.engine.block_manager import BlockManager
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import RequestMode


def validate_static(
    request: EngineRequest, max_model_len: int, vocab_size: int, blocks: BlockManager
) -> None:
    """Raises ValueError when ``request`` is malformed or could never fit in this engine."""
    request.sampling.validate()
    prompt = request.prompt_ids
    if not prompt:
        raise ValueError("prompt_ids is empty")
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    total = len(prompt) + request.sampling.max_tokens
    if total > max_model_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({request.sampling.max_tokens}) = {total} "
            f"exceeds max_model_len {max_model_len}"
        )
    if blocks.blocks_for(total) > blocks.num_blocks:
        raise ValueError(
            f"prompt + max_tokens = {total} tokens needs {blocks.blocks_for(total)} KV blocks "
            f"but the cache has only {blocks.num_blocks}"
        )
    if request.mode == RequestMode.DECODE:
        _validate_decode(request, vocab_size, blocks)
    elif request.first_token is not None or request.kv_block_ids is not None:
        raise ValueError(f"first_token and kv_block_ids are for DECODE requests, not {request.mode.value}")


def validate_ownership(request: EngineRequest, external: Mapping[int, int]) -> None:
    """A DECODE request's blocks must be ones the caller holds from ``allocate_kv``."""
    if request.mode != RequestMode.DECODE or request.kv_block_ids is None:
        return
    foreign = [b for b in request.kv_block_ids if external.get(b, 0) <= 0]
    if foreign:
        raise ValueError(f"kv_block_ids {foreign[:4]} were not allocated with allocate_kv (or are in use)")


def _validate_decode(request: EngineRequest, vocab_size: int, blocks: BlockManager) -> None:
    if request.first_token is None or request.kv_block_ids is None:
        raise ValueError("a DECODE request needs first_token and kv_block_ids")
    if not 0 <= request.first_token < vocab_size:
        raise ValueError(f"first_token {request.first_token} is outside the vocabulary [0, {vocab_size})")
    need = blocks.blocks_for(len(request.prompt_ids))
    if len(request.kv_block_ids) < need:
        raise ValueError(f"kv_block_ids has {len(request.kv_block_ids)} blocks; the prompt's KV needs {need}")
    if len(set(request.kv_block_ids)) != len(request.kv_block_ids):
        raise ValueError("kv_block_ids has duplicates")
