"""Fixtures of the HTTP front's tests: the ChatML test tokenizer, an echoing backend and the app."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdmesh.tokenizer import Tokenizer
from services.coordinator.http_app import create_app
from tests.integration.http_harness import MAX_MODEL_LEN, MODEL, EchoBackend
from tests.unit.test_tokenizer import build_tokenizer_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture
def backend(tok) -> EchoBackend:
    return EchoBackend(eos_id=tok.token_to_id("<|im_end|>"))


@pytest.fixture
def app(backend, tok):
    return create_app(backend, MODEL, tok, MAX_MODEL_LEN)
