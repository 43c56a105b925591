"""The judgement of ``pdmesh bench soak`` (gaps, justified failures, RSS lifetimes, stream endings) and
the launcher's restart back-off, on hand-made inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdmesh.bench.soak_load import _stream_event
from pdmesh.bench.soak_monitor import HealthMonitor, RssMonitor
from pdmesh.launcher import LocalStack, StackSpec
from pdmesh.v1 import common_pb2

pytestmark = pytest.mark.timeout(30)

HEALTHY, SUSPECT = common_pb2.INSTANCE_STATE_HEALTHY, common_pb2.INSTANCE_STATE_SUSPECT


def instance(iid: str, role: int, state: int = HEALTHY, heartbeat: float = 100.0) -> common_pb2.InstanceInfo:
    return common_pb2.InstanceInfo(instance_id=iid, role=role, state=state, last_heartbeat=heartbeat)


def test_a_role_without_a_serving_instance_opens_a_gap_until_one_serves_again():
    health = HealthMonitor("unused:0", poll_s=0.2, t0=0.0)
    p0, d0 = instance("prefill-0", common_pb2.ROLE_PREFILL), instance("decode-0", common_pb2.ROLE_DECODE)
    health._record([p0, d0], 1.0)
    health._record([instance("prefill-0", common_pb2.ROLE_PREFILL, SUSPECT), d0], 2.0)
    health._record([instance("prefill-0", common_pb2.ROLE_PREFILL, SUSPECT), d0], 2.2)
    health._record([p0, d0], 3.0)
    assert health.closed_gaps(10.0) == {"prefill": [[2.0, 3.0]], "decode": []}
    assert health.justifies(2.5, 2.6, slack_s=0.4)
    assert health.justifies(3.3, 4.0, slack_s=0.4)  # within the slack after the gap
    assert not health.justifies(3.5, 4.0, slack_s=0.4)
    assert not health.justifies(0.0, 1.5, slack_s=0.4)


def test_a_killed_instance_serves_again_only_after_a_heartbeat_from_its_new_process():
    health = HealthMonitor("unused:0", poll_s=0.2, t0=0.0, kills={"decode-0": 150.0})
    assert not health.serving(instance("decode-0", common_pb2.ROLE_DECODE, heartbeat=149.0))
    assert health.serving(instance("decode-0", common_pb2.ROLE_DECODE, heartbeat=151.0))
    health._record([instance("decode-0", common_pb2.ROLE_DECODE, heartbeat=149.0)], 5.0)
    assert health.closed_gaps(6.0)["decode"] == [[5.0, 6.0]]  # still open: closed at "now"


def test_rss_is_judged_per_process_lifetime_after_its_warm_up():
    rss = RssMonitor(pids=dict, t0=0.0)
    rss.samples[("decode-0", 1)] = [(t, 1000 if t < 10 else 1200) for t in range(0, 40)]  # warm-up growth
    rss.samples[("decode-0", 2)] = [(t, 1000 + 20 * (t - 40)) for t in range(40, 70)]  # leaks 2%/s
    rss.samples[("redis", 3)] = [(t, 100) for t in range(0, 15)]  # too short to judge
    report = rss.report(warmup_s=10.0, limit=0.10, until=100.0)
    by_pid = {e["pid"]: e for e in report["lifetimes"]}
    assert by_pid[1]["judged"] and by_pid[1]["ok"] and by_pid[1]["growth"] == 0
    assert by_pid[2]["judged"] and not by_pid[2]["ok"] and by_pid[2]["growth"] > 0.10
    assert not by_pid[3]["judged"]
    assert not report["ok"] and report["judged"] == 2
    json.dumps(report)  # it goes into the JSON as it is


def test_stream_endings_are_classified():
    assert _stream_event("[DONE]", finished=True) == ("completed", 200, "")
    assert _stream_event("[DONE]", finished=False)[0] == "broken"
    assert _stream_event(json.dumps({"choices": [{"finish_reason": "length"}]}), finished=False) is True
    assert _stream_event(json.dumps({"choices": [{"text": "a"}]}), finished=False) is False
    unavailable = json.dumps({"error": {"message": "no healthy decode instance", "code": 503}})
    assert _stream_event(unavailable, finished=False)[:2] == ("503", 503)
    assert _stream_event(json.dumps({"error": {"message": "x", "code": 502}}), finished=False)[:2] == (
        "5xx",
        502,
    )


def test_restart_back_off_doubles_while_a_worker_keeps_crashing(tmp_path: Path):
    stack = LocalStack(StackSpec(model_dir=tmp_path, restart_backoff_s=1.0, restart_backoff_max_s=8.0))
    assert [stack._backoff(n) for n in range(1, 7)] == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0]
    with pytest.raises(ValueError, match="restart_backoff"):
        StackSpec(model_dir=tmp_path, restart_backoff_s=0)
