"""Where the services of a local stack serve ``/metrics``: read from their logs.

Every service of a ``LocalStack`` gets ``--metrics-port`` (0, a free port, except the coordinator's
when ``pdmesh up --metrics-port`` names one) and logs ``metrics on http://HOST:PORT/metrics`` once its
server listens (``pdmesh.observability.metrics_server``). The address is read from that line, in the
part of the log the service's current process wrote (a restarted worker appends to the same file).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

DEFAULT_COORDINATOR_METRICS_PORT = 9464  # `pdmesh up --metrics-port` (OpenTelemetry's Prometheus port)
_LINE = re.compile(r"metrics on http://(\S+?)/metrics")
_POLL_S = 0.05


def metrics_args(port: int | None) -> dict[str, str]:
    """The ``--metrics-port`` flag of one service (none when the stack runs without metrics)."""
    return {} if port is None else {"metrics-port": str(port)}


def find_metrics_address(log_path: Path, offset: int) -> str | None:
    """The last ``host:port`` logged after byte ``offset`` of the log, or None."""
    try:
        with open(log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    found = _LINE.findall(text)
    return found[-1] if found else None


def wait_metrics_address(log_path: Path, offset: int, timeout_s: float, alive=lambda: True) -> str:
    """Waits until the service logged its metrics address; TimeoutError (or RuntimeError when
    ``alive()`` turns False first) names the log to read."""
    deadline = time.monotonic() + timeout_s
    while True:
        address = find_metrics_address(log_path, offset)
        if address is not None:
            return address
        if not alive():
            raise RuntimeError(f"the service exited before serving metrics; see {log_path}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no 'metrics on http://...' line in {log_path} within {timeout_s:.0f}s "
                "(was it started with --metrics-port?)"
            )
        time.sleep(_POLL_S)
