"""Fixtures shared by the whole suite: a real Redis (tests/redis_fixture.py) and small checkpoints
written on the fly."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

# The suite runs many processes (workers, engines) on few cores: one math thread each keeps them from
# fighting over the cores. Set before torch is imported anywhere; child processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# A pytest run that is told to stop (CI's timeout, a developer's kill) unwinds like Ctrl-C, so that
# every fixture's teardown stops the servers it started: each service runs in a process group of its
# own and would otherwise outlive the run.
signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session")
def redis_kind() -> str:
    """Where the suite's Redis runs, chosen once: ``container`` (testcontainers) where a Docker
    engine answers, else ``bundled`` (redis-server here); ``PDMESH_TEST_REDIS`` overrides."""
    from tests.redis_fixture import redis_kind as choose

    return choose()


@pytest.fixture(scope="session")
def redis_server(redis_kind: str) -> Iterator:
    """The session's Redis, shared by every test that does not stop or empty it."""
    from tests.redis_fixture import running_redis

    with running_redis(redis_kind) as server:
        yield server


@pytest.fixture
def own_redis_server(redis_kind: str) -> Iterator:
    """A Redis of the test's own: a test that stops or empties it does not disturb the session's."""
    from tests.redis_fixture import running_redis

    with running_redis(redis_kind) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory):
    """Writes (once per session and arguments) a tiny random checkpoint in Hugging Face layout."""
    from pdmesh.modelgen import write_model

    cache: dict[tuple, Path] = {}

    def make(arch: str = "qwen3", preset: str = "tiny", **overrides) -> Path:
        key = (arch, preset, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"model-{arch}-{preset}")
            cache[key] = write_model(arch, out, preset=preset, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_qwen3(model_factory) -> Path:
    return model_factory("qwen3", "tiny")
