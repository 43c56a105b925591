"""Membership logic with an injected clock: registration, heartbeats, suspect and dead, the version."""

from __future__ import annotations

import asyncio

import pytest

from pdmesh.membership import InstanceInfoData, InstanceState, LoadData, Role
from services.controller.membership import Membership

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(clock: FakeClock) -> Membership:
    return Membership(suspect_after_s=3.0, dead_after_s=6.0, clock=clock)


def info(instance_id: str = "p0", role: Role = Role.PREFILL) -> InstanceInfoData:
    return InstanceInfoData(
        instance_id, role, f"127.0.0.1:{5000 + len(instance_id)}", "tcp://127.0.0.1:7001", "tiny"
    )


def test_register_makes_a_healthy_member_and_bumps_the_version():
    clock = FakeClock()
    m = make(clock)
    assert m.version == 0 and m.view().instances == ()
    record = m.register(info("p0"))
    assert record.state == InstanceState.HEALTHY and record.last_heartbeat == clock.now
    assert m.version == 1
    view = m.view()
    assert [i.instance_id for i in view.instances] == ["p0"] and view.version == 1
    assert view.healthy(Role.PREFILL) and not view.healthy(Role.DECODE)


def test_register_again_replaces_the_record():
    clock = FakeClock()
    m = make(clock)
    m.register(info("p0"))
    clock.now += 5
    m.sweep()
    assert m.get("p0").state == InstanceState.SUSPECT
    again = info("p0")
    again.address = "127.0.0.1:9999"
    m.register(again)
    record = m.get("p0")
    assert record.state == InstanceState.HEALTHY and record.address == "127.0.0.1:9999"
    assert len(m.instances()) == 1


def test_register_rejects_bad_input():
    m = make(FakeClock())
    with pytest.raises(ValueError, match="instance_id is empty"):
        m.register(InstanceInfoData("", Role.DECODE, "127.0.0.1:1"))
    with pytest.raises(ValueError, match="address is empty"):
        m.register(InstanceInfoData("d0", Role.DECODE, ""))
    assert m.version == 0


def test_timings_must_be_ordered():
    with pytest.raises(ValueError, match="suspect_after_s < dead_after_s"):
        Membership(suspect_after_s=5.0, dead_after_s=5.0)


def test_heartbeat_updates_load_without_a_new_version():
    clock = FakeClock()
    m = make(clock)
    m.register(info("d0", Role.DECODE))
    clock.now += 1
    assert m.heartbeat("d0", LoadData(running=3, free_blocks=10, total_blocks=16)) is True
    record = m.get("d0")
    assert record.load.running == 3 and record.last_heartbeat == clock.now
    assert m.version == 1


def test_a_heartbeat_without_a_load_marks_it_unknown_and_never_idle():
    """A worker that could not measure its load sends none: its last figures must not pass for idle."""
    clock = FakeClock()
    m = make(clock)
    m.register(info("d0", Role.DECODE))
    assert m.heartbeat("d0", LoadData(free_blocks=16, total_blocks=16)) is True
    assert m.get("d0").load.idle() and m.load_known("d0")
    assert m.heartbeat("d0") is True  # alive, load not measured
    record = m.get("d0")
    assert record.load.unknown and not record.load.idle() and not m.load_known("d0")
    assert record.state == InstanceState.HEALTHY  # the heartbeat still counts
    m.heartbeat("d0", LoadData(free_blocks=16, total_blocks=16))
    assert m.load_known("d0") and m.get("d0").load.idle()


def test_heartbeat_from_an_unknown_instance_answers_false():
    m = make(FakeClock())
    assert m.heartbeat("ghost", LoadData()) is False


def test_silence_makes_suspect_then_dead_and_dead_leave_the_view():
    clock = FakeClock()
    m = make(clock)
    m.register(info("p0"))
    m.register(info("d0", Role.DECODE))
    assert m.version == 2

    clock.now += 2.9
    m.heartbeat("d0")
    assert m.sweep() == [] and m.version == 2  # nothing late yet

    clock.now += 0.2  # p0 silent 3.1s, d0 0.2s
    assert m.sweep() == []
    assert m.get("p0").state == InstanceState.SUSPECT and m.get("d0").state == InstanceState.HEALTHY
    assert m.version == 3
    assert m.view().healthy(Role.PREFILL) == []

    assert m.sweep() == [] and m.version == 3  # no change, no new version

    clock.now += 3.0  # p0 silent 6.1s
    assert m.sweep() == ["p0"]
    assert m.get("p0") is None and [i.instance_id for i in m.view().instances] == ["d0"]
    assert m.version == 4
    assert m.heartbeat("p0") is False  # a dead instance must register again


def test_a_late_heartbeat_brings_a_suspect_back():
    clock = FakeClock()
    m = make(clock)
    m.register(info("p0"))
    clock.now += 4
    m.sweep()
    assert m.get("p0").state == InstanceState.SUSPECT
    assert m.heartbeat("p0") is True
    assert m.get("p0").state == InstanceState.HEALTHY
    assert m.version == 3
    clock.now += 4
    assert m.sweep() == []  # silence counts from the last heartbeat


def test_sweep_with_an_explicit_time():
    clock = FakeClock()
    m = make(clock)
    m.register(info("p0"))
    assert m.sweep(now=clock.now + 10) == ["p0"]


def test_deregister_removes_at_once():
    m = make(FakeClock())
    m.register(info("p0"))
    assert m.deregister("p0") is True
    assert m.view().instances == () and m.version == 2
    assert m.deregister("p0") is False and m.version == 2


def test_copies_do_not_leak_the_records():
    m = make(FakeClock())
    m.register(info("p0"))
    m.get("p0").load.running = 99
    m.view().instances[0].load.waiting = 99
    assert m.get("p0").load == LoadData()


def test_wait_for_change_wakes_on_the_next_version():
    async def main() -> None:
        clock = FakeClock()
        m = make(clock)
        waiter = asyncio.ensure_future(m.wait_for_change(m.version))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        m.register(info("p0"))
        assert await asyncio.wait_for(waiter, 1.0) == 1
        assert await m.wait_for_change(0) == 1  # already past: returns at once
        with pytest.raises(TimeoutError):
            await m.wait_for_change(1, timeout_s=0.05)

    asyncio.run(main())
