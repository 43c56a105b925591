"""End to end: a W8A8 INT8 checkpoint (``pdmesh quantize`` of a random qwen3_moe) served over real
processes gives the same greedy text with prefill/decode disaggregation as on one mixed worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdmesh.launcher import LocalStack
from pdmesh.quantize import quantize_checkpoint
from tests.e2e.conftest import start_stack

pytestmark = pytest.mark.timeout(240)

MESSAGES = [{"role": "user", "content": "Tell me about the weather near the sea."}]


@pytest.fixture(scope="module")
def int8_model(model_factory, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen3_moe-w8a8")
    quantize_checkpoint(model_factory("qwen3_moe", "tiny"), out, "msmodelslim-w8a8")
    return out


@pytest.fixture(scope="module")
def int8_pd_stack(int8_model, tmp_path_factory) -> Iterator[LocalStack]:
    stack = start_stack(int8_model, tmp_path_factory, prefill=1, decode=1, mode="pd")
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def int8_mixed_stack(int8_model, tmp_path_factory) -> Iterator[LocalStack]:
    stack = start_stack(int8_model, tmp_path_factory, prefill=1, decode=0, mode="mixed")
    try:
        yield stack
    finally:
        stack.stop()


def greedy_text(stack: LocalStack, max_tokens: int = 24) -> str:
    model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {
        "model": model,
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    return choice["message"]["content"]


def test_int8_pd_equals_mixed(int8_pd_stack, int8_mixed_stack) -> None:
    pd_text = greedy_text(int8_pd_stack)
    assert pd_text
    assert pd_text == greedy_text(int8_mixed_stack)
