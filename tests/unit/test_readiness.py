"""The coordinator's readiness: ready once the configured numbers of instances are healthy, one log
line the first time, and a clear account of what is missing before."""

from __future__ import annotations

import logging

import pytest

from pdmesh.membership import ClusterViewData, InstanceInfoData, InstanceState, Role
from services.coordinator.readiness import READY_LINE, Readiness

pytestmark = pytest.mark.timeout(10)


def view(*members: tuple[str, Role, InstanceState]) -> ClusterViewData:
    infos = tuple(InstanceInfoData(i, role, "127.0.0.1:1", state=state) for i, role, state in members)
    return ClusterViewData(version=len(infos), instances=infos)


H = InstanceState.HEALTHY


def test_ready_once_the_configured_instances_are_healthy(caplog) -> None:
    current = view(
        ("p0", Role.PREFILL, H), ("d0", Role.DECODE, H), ("d1", Role.DECODE, InstanceState.SUSPECT)
    )
    readiness = Readiness(lambda: current, lambda: True, {Role.PREFILL: 1, Role.DECODE: 2})
    assert readiness.check() == (False, "healthy instances: 1/2 decode")
    current = view(("p0", Role.PREFILL, H), ("d0", Role.DECODE, H), ("d1", Role.DECODE, H))
    with caplog.at_level(logging.INFO):
        assert readiness.check(current) == (True, "")
        assert readiness.check(view()) == (True, "")  # reached once: it stays ready
    assert [r.getMessage() for r in caplog.records] == [f"{READY_LINE} (1 prefill, 2 decode)"]


def test_without_numbers_ready_means_servable() -> None:
    servable = False
    readiness = Readiness(lambda: view(), lambda: servable, {Role.PREFILL: 0})
    assert readiness.check() == (False, "no healthy prefill and decode instances (nor a mixed one)")
    servable = True
    assert readiness.check() == (True, "")
