"""Where a rank learns its place (flags, torchrun's variables, LeaderWorkerSet's, or one host),
the worker settings that refuse an impossible instance, and ``pdmesh up``'s per-role flags."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pdmesh.cli import _parallel_role_args, build_parser
from pdmesh.cli import main as cli_main
from pdmesh.config import WorkerConfig
from pdmesh.parallel.launch import RankSpec, config_env, rank_spec

pytestmark = pytest.mark.timeout(30)

BASE = dict(controller="127.0.0.1:1", redis_url="redis://127.0.0.1:1", model_dir="/m")


def config(**fields) -> WorkerConfig:
    return WorkerConfig(**BASE, **fields)


def test_one_host_rank_0_starts_every_other_rank() -> None:
    assert rank_spec(config(tp=2, dp=2), {}) == RankSpec(4, 0, 0, "127.0.0.1", 0, (1, 2, 3))
    assert rank_spec(config(), {}) == RankSpec(1, 0, 0, "127.0.0.1", 0)


def test_torchrun_variables_give_one_process_per_rank() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.5",
        "MASTER_PORT": "29511",
    }
    assert rank_spec(config(tp=4), env) == RankSpec(4, 3, 1, "10.0.0.5", 29511)
    with pytest.raises(ValueError, match="WORLD_SIZE=8 but tp x dp = 4 x 1 = 4"):
        rank_spec(config(tp=4), {**env, "WORLD_SIZE": "8"})
    with pytest.raises(ValueError, match="needs rank 0's address and port"):
        rank_spec(config(tp=4, rank=2), {})


def test_leaderworkerset_pods_each_start_their_hosts_ranks() -> None:
    env = {"LWS_LEADER_ADDRESS": "pd-prefill-0.pd-prefill", "LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1"}
    spec = rank_spec(config(tp=8, dp=2), env)
    assert spec == RankSpec(16, 8, 0, "pd-prefill-0.pd-prefill", 29500, tuple(range(9, 16)))
    leader = rank_spec(config(tp=8, dp=2), {**env, "LWS_WORKER_INDEX": "0"})
    assert leader.rank == 0 and leader.spawn == tuple(range(1, 8))
    with pytest.raises(ValueError, match="16 ranks on 3 hosts"):
        rank_spec(config(tp=8, dp=2), {**env, "LWS_GROUP_SIZE": "3"})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(tp=2, moe_ep=3), "moe_ep x moe_tp = 3 x 1 = 3 must equal tp x dp = 2 x 1 = 2"),
        (dict(dp=2, moe_dispatch="all_reduce"), "all_reduce needs every rank to see every token"),
        (dict(tp=2, rank=2), "rank 2 is outside the instance's 2 ranks"),
        (dict(tp=3, nnodes=2), "3 ranks \\(tp x dp\\) do not spread evenly over nnodes=2"),
    ],
)
def test_worker_settings_refuse_impossible_instances(fields, message) -> None:
    with pytest.raises(ValidationError, match=message):
        config(**fields)


def test_every_setting_travels_to_the_started_ranks_as_its_env_twin() -> None:
    env = config_env(config(tp=2, moe_dispatch="all_to_all", dist_timeout_s=5))
    assert env["PDMESH_WORKER_TP"] == "2" and env["PDMESH_WORKER_MOE_DISPATCH"] == "all_to_all"
    assert "PDMESH_WORKER_RANK" not in env  # unset: each started rank gets its own
    assert WorkerConfig(**{k.removeprefix("PDMESH_WORKER_").lower(): v for k, v in env.items()}).tp == 2


def test_up_parallel_flags_become_each_roles_worker_flags(monkeypatch) -> None:
    monkeypatch.setenv("PDMESH_UP_DECODE_DP", "2")
    args = build_parser().parse_args(
        ["up", "--prefill-tp", "2", "--prefill-moe-ep", "2", "--decode-moe-ep", "2"]
    )
    assert _parallel_role_args(args) == {
        "prefill": {"tp": "2", "moe-ep": "2"},
        "decode": {"dp": "2", "moe-ep": "2"},
        "mixed": {"tp": "2", "moe-ep": "2"},
    }


def test_up_refuses_an_impossible_layout_before_starting_anything(tiny_qwen3, capsys) -> None:
    code = cli_main(["up", "--model", str(tiny_qwen3), "--decode-tp", "2", "--decode-moe-ep", "3"])
    assert code == 2
    assert (
        "decode instances: moe_ep x moe_tp = 3 x 1 = 3 must equal the world size 2" in capsys.readouterr().err
    )
