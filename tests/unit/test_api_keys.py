"""API key matching, key file reloading and per-key limits (services/coordinator/api_keys.py)."""

from __future__ import annotations

import os

import pytest

from services.coordinator.api_keys import (
    FILE_CHECK_S,
    ApiKeyError,
    KeyLimits,
    KeyRing,
    bearer,
    key_id,
    parse_key_file,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fixed_keys_match_exactly():
    ring = KeyRing(["alpha", "beta"])
    assert ring.enabled
    assert ring.match("beta") == key_id("beta")
    assert ring.match("bet") is None and ring.match("betaa") is None and ring.match(None) is None
    assert not KeyRing([]).enabled


def test_key_file_lines_and_comments():
    assert parse_key_file("# keys\n\n k1 \nk2 # the batch job\n#k3\n") == ["k1", "k2"]


def test_key_file_reloads_when_it_changes(tmp_path):
    path, clock = tmp_path / "keys", Clock()
    path.write_text("old\n")
    ring = KeyRing([], str(path), clock=clock)
    assert ring.match("old")
    path.write_text("new-key\n")
    assert ring.match("old"), "looked again before FILE_CHECK_S"
    clock.now += FILE_CHECK_S
    assert ring.match("old") is None and ring.match("new-key")
    path.write_text("")
    clock.now += FILE_CHECK_S
    assert ring.enabled and ring.match("new-key") is None  # an empty file refuses everyone
    os.remove(path)
    clock.now += FILE_CHECK_S
    assert ring.match("anything") is None


def test_missing_key_file_is_a_startup_error(tmp_path):
    with pytest.raises(ApiKeyError, match="cannot read the API key file"):
        KeyRing([], str(tmp_path / "absent"))


def test_rate_limit_is_a_token_bucket_per_key():
    clock = Clock()
    limits = KeyLimits(2.0, None, clock=clock)
    assert limits.acquire("a") is None and limits.acquire("a") is None  # a burst of one second
    refusal = limits.acquire("a")
    assert refusal.limit == "api_key_max_rps" and refusal.retry_after_s == 1
    assert limits.acquire("b") is None  # another key has its own bucket
    clock.now += 0.5
    assert limits.acquire("a") is None


def test_concurrency_limit_until_release():
    limits = KeyLimits(None, 2)
    assert limits.acquire("a") is None and limits.acquire("a") is None
    assert limits.acquire("a").limit == "api_key_max_concurrency"
    limits.release("a")
    assert limits.acquire("a") is None


def test_bearer_header():
    assert bearer("Bearer sk-1") == "sk-1" and bearer("bearer  sk-1 ") == "sk-1"
    assert bearer("Basic abc") is None and bearer("Bearer ") is None and bearer(None) is None
