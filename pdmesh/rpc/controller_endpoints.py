"""Finding the active controller among several (``host:port[,host:port...]``).

A standby controller answers FAILED_PRECONDITION with the active one's address in the trailing
metadata key ``pdmesh-active-controller``; a controller that is down answers UNAVAILABLE or times out.
``ControllerEndpoints.follow`` turns either into "which address next".
"""

from __future__ import annotations

import grpc

ACTIVE_METADATA_KEY = "pdmesh-active-controller"
_MOVE_ON = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
)


def parse_addresses(spec: str) -> list[str]:
    """``"a:1, b:2"`` -> ``["a:1", "b:2"]``; ValueError when none is given."""
    addresses = [a.strip() for a in spec.split(",") if a.strip()]
    if not addresses:
        raise ValueError(f"no controller address in {spec!r} (want host:port[,host:port...])")
    return addresses


def active_from_error(exc: grpc.aio.AioRpcError) -> str | None:
    """The active controller named by a standby's refusal, or None."""
    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == ACTIVE_METADATA_KEY and value:
            return value if isinstance(value, str) else value.decode()
    return None


class ControllerEndpoints:
    """The configured controllers and the one currently believed active."""

    def __init__(self, spec: str) -> None:
        self.addresses = parse_addresses(spec)
        self._index = 0

    @property
    def current(self) -> str:
        return self.addresses[self._index]

    def __str__(self) -> str:
        return ",".join(self.addresses)

    def follow(self, exc: grpc.aio.AioRpcError) -> bool:
        """Moves to the active controller named in ``exc``, or to the next address when the current one
        is down or a standby without an active one to name. True when the address changed."""
        active = active_from_error(exc)
        if active is not None:
            if active not in self.addresses:
                self.addresses.append(active)
            before, self._index = self._index, self.addresses.index(active)
            return before != self._index
        if exc.code() in _MOVE_ON and len(self.addresses) > 1:
            self._index = (self._index + 1) % len(self.addresses)
            return True
        return False

    def is_standby_refusal(self, exc: grpc.aio.AioRpcError) -> bool:
        return exc.code() == grpc.StatusCode.FAILED_PRECONDITION and (
            active_from_error(exc) is not None or "standby" in (exc.details() or "")
        )
