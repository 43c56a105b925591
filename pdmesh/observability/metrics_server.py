"""The Prometheus /metrics server every service runs on its own port, apart from its API port.

The API may demand credentials while the metrics port stays open to the scraper, as in MindIE-MS.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class MetricsServer:
    """prometheus_client's HTTP server on ``host:port`` (0 picks a free port), stopped by ``stop()``.

    ``address`` is what others scrape: bound to a wildcard host, the server names ``public_host``
    instead (the host the service advertises for its API), since 0.0.0.0 reaches no one else."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry = REGISTRY,
        public_host: str | None = None,
    ) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        shown = public_host if host in WILDCARD_HOSTS and public_host else host
        self.address = f"{shown}:{self._server.server_port}"
        log.info("metrics on http://%s/metrics", self.address)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(host: str, port: int | None) -> MetricsServer | None:
    """The server when ``port`` is set (``--metrics-port``), else None: metrics stay off."""
    return None if port is None else MetricsServer(host, port)
