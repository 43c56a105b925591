"""The expert-load series a parallel MoE worker exposes, ``pdmesh ctl experts`` reading them back, and
its ``--rebalance`` refused where there is nothing to balance."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.parallel.eplb import ReplicaPlacement, imbalance, rank_loads
from services.controller import ctl
from services.controller.ctl_experts import ExpertsError, parse, render
from services.worker.expert_metrics import ExpertLoadCollector, RebalanceRefused, rebalance
from services.worker.metrics import WorkerMetrics

pytestmark = pytest.mark.timeout(30)


def layer_stats(placement: ReplicaPlacement, window: list[int]) -> dict:
    return {
        "window": window,
        "total": [3 * w for w in window],
        "rank_loads": rank_loads(placement, window),
        "imbalance": imbalance(placement, window),
        "replicas": [len(placement.physical_of(e)) for e in range(placement.num_experts)],
    }


def test_series_round_trip_through_ctl_experts() -> None:
    placement = ReplicaPlacement.from_lists([[0, 1, 2], [3, 0, 1]], 4)
    window = [40, 10, 5, 5]
    metrics = WorkerMetrics("w-1", lambda: "decode", "tcp")
    collector = ExpertLoadCollector()
    collector.add(metrics, lambda: [layer_stats(placement, window)])
    registry = CollectorRegistry()
    registry.register(collector)
    parsed = parse(generate_latest(registry).decode())
    layer = parsed["w-1"][0]
    assert layer["experts"][0] == {"total": 120, "window": 40, "replicas": 2}
    assert layer["ranks"] == {0: 20 + 5 + 5, 1: 5 + 20 + 5}
    assert layer["imbalance"] == pytest.approx(1.0)
    text = render(parsed)
    assert "layer 0: imbalance 1.000" in text
    assert text.index("expert    0") < text.index("expert    1")  # hottest first


def test_no_expert_series_is_an_error() -> None:
    with pytest.raises(ExpertsError, match="no expert series"):
        parse("# nothing here\n")


def test_ctl_experts_unreachable(capsys) -> None:
    assert ctl.main(["experts", "127.0.0.1:1"]) == 1
    assert "cannot read http://127.0.0.1:1/metrics" in capsys.readouterr().err


def test_ctl_experts_needs_an_address(capsys) -> None:
    assert ctl.main(["experts"]) == 2
    assert "--rebalance WORKER" in capsys.readouterr().err


def test_ctl_experts_rebalance_unreachable(capsys) -> None:
    assert ctl.main(["--timeout-s", "2", "experts", "--rebalance", "127.0.0.1:1"]) == 1
    assert "RebalanceExperts at 127.0.0.1:1: UNAVAILABLE" in capsys.readouterr().err


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("arch", "why"), [("qwen3", "no MoE layers"), ("qwen3_moe", "moe_ep 1")])
def test_one_rank_refuses_to_rebalance(arch: str, why: str, model_factory) -> None:
    engine = LLMEngine(EngineConfig(model_dir=model_factory(arch, "tiny"), kv_cache_memory_mib=4))
    with pytest.raises(RebalanceRefused, match=why):
        rebalance(engine)
