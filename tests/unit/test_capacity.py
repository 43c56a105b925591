"""The controller's auto ratio reads instance capacity from the planner's latency model."""

from __future__ import annotations

import pytest

from pdmesh.config import ControllerConfig
from pdmesh.planner.capacity import capacity_from_model, capacity_from_profile
from pdmesh.planner.model import LatencyModel
from pdmesh.planner.profile_file import save_profile
from services.controller.server import instance_capacity
from tests.unit.test_planner import DECODE, PREFILL, synthetic_profile

pytestmark = pytest.mark.timeout(30)


def test_capacity_follows_the_fitted_model():
    model = LatencyModel.fit(synthetic_profile())
    cap = capacity_from_model(model, prefill_batch_tokens=2048, tpot_ms=30, context_len=256)
    a, b, _ = PREFILL
    assert cap.prefill_tokens_per_s == pytest.approx(
        2048 / (a + b * 2048 + PREFILL[2] * 2048 * 2048), rel=0.05
    )
    alpha, beta, gamma = DECODE
    step = lambda batch: alpha + beta * batch + gamma * batch * 256  # noqa: E731
    assert step(cap.decode_batch) <= 0.030 * 1.01 and step(cap.decode_batch + 1) > 0.030 * 0.99


def test_controller_uses_the_profile_when_given(tmp_path):
    path = tmp_path / "profile.json"
    save_profile(synthetic_profile(), path)
    config = ControllerConfig(planner_profile=str(path), planner_tpot_ms=30, planner_context_len=256)
    from_profile = instance_capacity(config)
    expected = capacity_from_profile(path, 30, 256)
    assert (from_profile.prefill_tokens_per_s, from_profile.decode_batch) == (
        expected.prefill_tokens_per_s,
        expected.decode_batch,
    )
    assert instance_capacity(ControllerConfig()).decode_batch == ControllerConfig().decode_batch_capacity


def test_a_bad_profile_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        instance_capacity(ControllerConfig(planner_profile=str(bad)))
