"""Admission control: at most ``max_inflight`` requests run, at most ``max_queue`` wait; beyond
that a request is refused at once as OVERLOADED (HTTP 429) with a Retry-After hint, never queued without bound."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from pdmesh.errors import ErrorKind
from pdmesh.observability import coordinator_metrics as metrics
from services.coordinator.backend import GenerationError


class AdmissionGate:
    """A bounded semaphore with a bounded waiting room."""

    def __init__(self, max_inflight: int, max_queue: int, queue_timeout_s: float) -> None:
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._slots = asyncio.Semaphore(max_inflight)
        self.inflight = 0
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Holds one slot for the body of the ``async with``; raises GenerationError(OVERLOADED) when full."""
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise GenerationError(
                f"the coordinator is at capacity ({self.max_inflight} running, {self.waiting} queued)",
                ErrorKind.OVERLOADED,
                retry_after_s=1.0,
            )
        self.waiting += 1
        metrics.QUEUED.inc()
        queued_at = time.monotonic()
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.queue_timeout_s)
        except TimeoutError:
            raise GenerationError(
                f"waited {self.queue_timeout_s:.0f}s in the admission queue",
                ErrorKind.OVERLOADED,
                retry_after_s=1.0,
            ) from None
        finally:
            self.waiting -= 1
            metrics.QUEUED.dec()
        metrics.QUEUE_TIME.observe(time.monotonic() - queued_at)
        self.inflight += 1
        metrics.INFLIGHT.inc()
        try:
            yield
        finally:
            self.inflight -= 1
            metrics.INFLIGHT.dec()
            self._slots.release()
