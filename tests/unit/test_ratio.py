"""The P:D ratio decision: parsing, prompt-heavy and decode-heavy demand, the floor, the cooldown."""

from __future__ import annotations

import pytest

from pdmesh.cluster import InstanceInfoData, LoadData, Role
from services.controller.ratio import Capacity, Demand, DemandMeter, RatioPolicy, parse_ratio

pytestmark = pytest.mark.timeout(30)

CAP = Capacity(prefill_tokens_per_s=1000.0, decode_batch=8)
AUTO = parse_ratio("auto")
PROMPT_HEAVY = Demand(prompt_tokens_per_s=5000.0, queued_prefill_tokens=4000, kv_usage=0.05, decode_running=1)
DECODE_HEAVY = Demand(prompt_tokens_per_s=100.0, kv_usage=0.9, decode_running=30)


def policy(cooldown_s: float = 0.0) -> RatioPolicy:
    return RatioPolicy(CAP, cooldown_s)


def test_parse_ratio():
    assert str(parse_ratio("2:1")) == "2:1" and parse_ratio(" AUTO ").mode == "auto"
    assert parse_ratio("off").mode == "off"
    for bad in ["", "3", "0:1", "1:0", "a:b", "1:2:3", "-1:2"]:
        with pytest.raises(ValueError, match="bad ratio"):
            parse_ratio(bad)


def test_prompt_heavy_moves_towards_prefill_one_step_at_a_time():
    assert policy().decide(AUTO, 1, 3, PROMPT_HEAVY, now=0) == 2


def test_decode_heavy_moves_towards_decode():
    assert policy().decide(AUTO, 3, 1, DECODE_HEAVY, now=0) == 2


def test_floor_of_one_each():
    assert policy().decide(AUTO, 3, 1, PROMPT_HEAVY, now=0) == 3  # would take the last decode
    assert policy().decide(AUTO, 1, 3, DECODE_HEAVY, now=0) == 1  # would take the last prefill
    assert policy().decide(parse_ratio("9:1"), 1, 1, Demand(), now=0) == 1


def test_idle_or_balanced_demand_holds():
    assert policy().decide(AUTO, 2, 2, Demand(), now=0) == 2
    balanced = Demand(prompt_tokens_per_s=2000.0, kv_usage=0.9, decode_running=16)  # 2 vs 2 instances
    assert policy().decide(AUTO, 2, 2, balanced, now=0) == 2


def test_cooldown_holds_then_releases():
    p = policy(cooldown_s=30.0)
    p.record_flip(100.0)
    assert p.decide(AUTO, 1, 3, PROMPT_HEAVY, now=110.0) == 1
    assert p.decide(AUTO, 1, 3, PROMPT_HEAVY, now=131.0) == 2


def test_fixed_ratio_steps_towards_the_target():
    assert policy().decide(parse_ratio("1:1"), 1, 3, Demand(), now=0) == 2
    assert policy().decide(parse_ratio("1:1"), 2, 2, DECODE_HEAVY, now=0) == 2
    assert policy().decide(parse_ratio("3:1"), 2, 2, Demand(), now=0) == 3
    assert policy().decide(parse_ratio("off"), 1, 3, PROMPT_HEAVY, now=0) == 1


def test_meter_rates_from_counters():
    meter = DemandMeter(smoothing=1.0)

    def inst(iid, role, total, running=0, free=10):
        load = LoadData(running=running, free_blocks=free, total_blocks=10, prompt_tokens_total=total)
        return InstanceInfoData(iid, role, "127.0.0.1:1", load=load)

    meter.measure([inst("p", Role.PREFILL, 100), inst("d", Role.DECODE, 0)], now=10.0)
    demand = meter.measure(
        [inst("p", Role.PREFILL, 600), inst("d", Role.DECODE, 0, running=3, free=5)], now=12.0
    )
    assert demand.prompt_tokens_per_s == pytest.approx(250.0)
    assert demand.kv_usage == pytest.approx(0.5) and demand.decode_running == 3
