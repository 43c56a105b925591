"""How ``pdmesh up`` shares a host's cores between its workers (pdmesh.cores)."""

from __future__ import annotations

import pytest

from pdmesh.cores import split_cores
from pdmesh.launcher import LocalStack, StackSpec

pytestmark = pytest.mark.timeout(30)


def test_the_decode_worker_gets_a_core_of_its_own_and_prefill_runs_on_both():
    assert split_cores(["prefill", "decode"], [1, 1], [0, 1]) == ["0-1", "1"]


def test_spare_cores_go_to_prefill_workers_first():
    assert split_cores(["prefill", "decode"], [1, 1], list(range(5))) == ["0-4", "3-4"]
    lists = split_cores(["prefill", "prefill", "decode"], [1, 1, 1], list(range(8)))
    assert lists == ["0-2,6-7", "3-7", "6-7"]


def test_a_parallel_worker_gets_a_share_per_rank():
    assert split_cores(["decode", "prefill"], [2, 1], list(range(6))) == ["0-3", "0-5"]


def test_fewer_cores_than_workers_gives_each_one_core_in_turn():
    assert split_cores(["prefill", "prefill", "decode"], [1, 1, 1], [0, 1]) == ["0", "1", "0"]


def test_fewer_cores_than_ranks_of_a_parallel_worker_pins_nothing():
    assert split_cores(["prefill", "decode"], [2, 1], [0, 1]) is None


def test_mixed_workers_share_alike_and_non_contiguous_cpus_are_listed():
    assert split_cores(["mixed", "mixed"], [1, 1], [0, 2, 3, 4]) == ["0,2", "3-4"]


def test_bad_rank_counts_are_refused():
    with pytest.raises(ValueError, match="rank count"):
        split_cores(["prefill"], [0], [0, 1])


def test_the_launcher_pins_only_when_asked(tmp_path):
    spec = StackSpec(model_dir=tmp_path, role_args={"prefill": {"tp": "2"}})
    assert LocalStack(spec)._worker_cpus() is None
    spec.pin_workers = True
    cpus = LocalStack(spec)._worker_cpus()
    assert cpus is None or len(cpus) == 2


def test_pdmesh_up_serving_defaults_stay_under_what_was_given(tmp_path):
    from pdmesh.cli import _one_host_defaults

    spec = StackSpec(model_dir=tmp_path, role_args={"decode": {"max-prefill-tokens": "512"}})
    _one_host_defaults(spec)
    assert spec.coordinator_args == {"overflow-prefill-tokens": "1024"}
    assert spec.role_args["decode"] == {"max-prefill-tokens": "512"}  # the cluster file's key wins
    spec = StackSpec(model_dir=tmp_path, coordinator_args={"overflow-prefill-tokens": "0"})
    _one_host_defaults(spec)
    assert spec.coordinator_args == {"overflow-prefill-tokens": "0"}
    assert spec.role_args["decode"] == {"max-prefill-tokens": "64"}
