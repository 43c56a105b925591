"""The suite's Redis choice (tests/redis_fixture.py): the override, the probe, and the shared surface."""

from __future__ import annotations

import pytest
import redis

from pdmesh.ports import free_port
from pdmesh.redis_server import RedisServer
from tests.redis_fixture import ENV_VAR, docker_error, make_redis, redis_kind, running_redis

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def no_docker_engine(monkeypatch) -> None:
    """DOCKER_HOST at a loopback port nothing listens on: no engine answers there."""
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{free_port('127.0.0.1')}")


def test_bundled_override_gives_the_bundled_server(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "Bundled")
    assert redis_kind() == "bundled"
    assert isinstance(make_redis(), RedisServer)


def test_an_unknown_override_is_refused_naming_the_variable(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "podman")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='podman': expected one of container, bundled"):
        redis_kind()


def test_without_an_engine_the_probe_says_why_and_picks_the_bundled_server(
    monkeypatch, no_docker_engine
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert docker_error() is not None
    assert redis_kind() == "bundled"


def test_a_container_asked_for_without_an_engine_fails_instead_of_falling_back(
    monkeypatch, no_docker_engine
) -> None:
    monkeypatch.setenv(ENV_VAR, "container")
    with pytest.raises(RuntimeError, match=f"{ENV_VAR}=container, but no Docker engine answers"):
        redis_kind()


def test_the_fixture_redis_answers_and_comes_back_empty_on_the_same_port(redis_kind: str) -> None:
    """What the tests rely on, whichever kind this run chose: stop() then start() is an empty Redis
    at the same URL."""
    with running_redis(redis_kind) as server:
        url, port = server.url, server.port
        with redis.Redis.from_url(url) as client:
            client.set("k", "v")
        server.stop()
        assert not server.running
        server.start()
        assert (server.url, server.port) == (url, port)
        with redis.Redis.from_url(url) as client:
            assert client.ping() and client.get("k") is None
    assert not server.running
