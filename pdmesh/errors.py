"""One vocabulary of errors for every layer: what went wrong, as a kind, never as a wire status.

A worker fails a request with a ``WorkerError``; the Worker servicer sends its kind in-band
(``pdmesh.v1.ErrorCode``), and the coordinator's worker client raises a ``WorkerError`` again from
that code or from the call's gRPC status. The coordinator answers its callers with kinds too; only
its two fronts map a kind to a status (HTTP in ``http_errors``, gRPC in ``grpc_front``).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    """What went wrong. The first six are the workers' in-band codes (``pdmesh.v1.ErrorCode``
    ``ERROR_CODE_<kind>``); the rest only arise between the coordinator and its callers."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # the request itself is bad: no retry helps
    KV_UNAVAILABLE = "KV_UNAVAILABLE"  # the prompt's KV is gone or could not be pulled
    OVERLOADED = "OVERLOADED"  # no room for it now (KV blocks, the admission queue)
    ABORTED = "ABORTED"  # cancelled where it ran
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # its time ran out
    INTERNAL = "INTERNAL"  # a fault where it ran
    UNAVAILABLE = "UNAVAILABLE"  # no instance could take it (unreachable, changed role, none healthy)
    UPSTREAM_FAILED = "UPSTREAM_FAILED"  # an instance failed it in a way another attempt would not mend


class WorkerError(Exception):
    """A request failed on a worker with a kind the caller can act on.

    ``cause`` names the failure for metrics (lower case): the kind, or the gRPC status of a call
    that failed outright (``unavailable``, ``failed_precondition``...)."""

    def __init__(self, kind: ErrorKind, message: str, cause: str | None = None) -> None:
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.message = message
        self.cause = cause or kind.value.lower()
