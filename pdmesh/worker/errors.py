"""Errors a worker answers in-band, so that the coordinator can retry, recompute or fail cleanly."""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    """Mirrors ``pdmesh.v1.ErrorCode`` without importing protobuf past the servicer."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    KV_UNAVAILABLE = "KV_UNAVAILABLE"
    OVERLOADED = "OVERLOADED"
    ABORTED = "ABORTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"


class WorkerError(Exception):
    """A request failed on this worker with a code the caller can act on."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.message = message
