"""Local stacks as real processes (Redis, controller, workers, coordinator), one per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pdmesh.launcher import LocalStack, StackSpec

SMALL_WORKER = {"kv-cache-memory-mib": "16", "kv-lease-s": "10"}


def start_stack(model_dir, tmp_path_factory, worker_args: dict | None = None, **spec) -> LocalStack:
    """Starts a stack (1 prefill + 1 decode unless told otherwise) with small KV pools; the caller stops it."""
    log_dir = tmp_path_factory.mktemp("stack-logs")
    worker_args = {**SMALL_WORKER, **(worker_args or {})}
    stack = LocalStack(
        StackSpec(model_dir=model_dir, http_port=0, log_dir=log_dir, worker_args=worker_args, **spec)
    )
    stack.start()
    return stack


@pytest.fixture(scope="module")
def pd_stack(tiny_qwen3, tmp_path_factory) -> Iterator[LocalStack]:
    stack = start_stack(tiny_qwen3, tmp_path_factory, prefill=1, decode=1, mode="pd")
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def mixed_stack(tiny_qwen3, tmp_path_factory) -> Iterator[LocalStack]:
    stack = start_stack(tiny_qwen3, tmp_path_factory, prefill=1, decode=0, mode="mixed")
    try:
        yield stack
    finally:
        stack.stop()
