"""The cluster file: MindIE's names, bounds and cross-key rules, one-line errors on every entry point,
each service's settings built from it, and `pdmesh up --config` with flags over its keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdmesh.bench.serve import build_parser, config_from_args
from pdmesh.cli import main as pdmesh_main
from pdmesh.config import ControllerConfig, CoordinatorConfig, WorkerConfig
from pdmesh.deploy.cli import main as deploy_main
from pdmesh.deploy.cli import self_target
from pdmesh.deploy.cluster_file import ClusterFileError, load_cluster_file, parse_cluster_file
from pdmesh.deploy.local import UpOverrides, stack_spec
from pdmesh.deploy.settings import controller_config, coordinator_config, settings_args, worker_config

pytestmark = pytest.mark.timeout(60)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
EXAMPLES = [DEPLOY / "user_config.json", *sorted((DEPLOY / "examples").iterdir())]


def minimal(**sections) -> dict:
    return {"model": {"modelWeightPath": "/models/m"}, **sections}


def error_of(data: dict) -> str:
    with pytest.raises(ClusterFileError) as info:
        parse_cluster_file(data)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_shipped_examples_are_valid(path):
    cluster = load_cluster_file(path)
    assert cluster.world("prefill") == cluster.pods("prefill") * cluster.devices_per_pod("prefill")


def test_seed_shape_and_mindie_section_names():
    cluster = load_cluster_file(DEPLOY / "examples" / "seed-npu.json")
    d = cluster.deploy_config
    assert (d.p_instances_num, d.single_p_instance_pod_num, d.d_instances_num, d.single_d_instance_pod_num) == (
        4, 2, 1, 8,
    )  # fmt: skip
    assert (cluster.prefill.moe_ep, cluster.prefill.moe_tp, cluster.decode.max_batch_size) == (4, 4, 256)
    assert cluster.controller.replicas == 2 and d.namespace == "pdmesh"  # MindIE's job_id


def test_our_names_and_mindie_names_mean_the_same():
    ours = parse_cluster_file(minimal(prefill={"max_prefill_tokens": 999}, controller={"pd_ratio": "2:1"}))
    mindie = parse_cluster_file(
        minimal(
            mindie_server_prefill_config={"maxPrefillTokens": 999},
            mindie_ms_controller_config={"pd_ratio": "2:1"},
        )
    )
    assert ours == mindie


def test_errors_name_the_key_path_and_the_allowed_range():
    message = error_of(minimal(deploy_config={"p_instances_num": 17}, prefill={"maxBatchSize": 0}))
    assert "deploy_config.p_instances_num" in message and ">= 1 and <= 16" in message and "got 17" in message
    assert "prefill.maxBatchSize" in message and ">= 1" in message
    assert "coordinator.nope: Extra inputs are not permitted" in error_of(minimal(coordinator={"nope": 1}))
    assert "model.modelWeightPath: Field required" in error_of({"model": {}})
    assert "prefill.dtype" in error_of(minimal(prefill={"dtype": "int4"}))


def test_layout_rules_as_mindie_checks_them():
    moe = error_of(minimal(prefill={"tp": 2, "moe_ep": 4}, deploy_config={"p_pod_npu_num": 2}))
    assert "prefill: tp*dp (2*1=2) must equal moe_ep*moe_tp (4*1=4)" in moe
    devices = error_of(minimal(decode={"tp": 4, "moe_ep": 4}))
    assert "decode: tp*dp (4) must equal the instance's devices" in devices
    assert "single_d_instance_pod_num*d_pod_npu_num (1*1=1)" in devices
    assert "decode.block_size" in error_of(minimal(decode={"block_size": 32}))
    assert "prefill.device" in error_of(minimal(prefill={"device": "tpu"}))


def test_yaml_and_unreadable_files(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model:\n  modelWeightPath: /m\ndeploy_config:\n  d_instances_num: 3\n")
    assert load_cluster_file(yaml_file).deploy_config.d_instances_num == 3
    broken = tmp_path / "c.json"
    broken.write_text('{"model": ')
    with pytest.raises(ClusterFileError, match="not valid JSON"):
        load_cluster_file(broken)
    with pytest.raises(ClusterFileError, match="cannot read"):
        load_cluster_file(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ClusterFileError, match="top level must be a mapping"):
        load_cluster_file(tmp_path / "list.json")


def test_each_service_gets_its_own_settings_object():
    cluster = load_cluster_file(DEPLOY / "examples" / "ha-cuda.yaml")
    controller = controller_config(cluster, host="0.0.0.0", port=1, redis_url="redis://r:1/0")
    assert isinstance(controller, ControllerConfig) and controller.pd_ratio == "1:1"
    coordinator = coordinator_config(cluster, host="0.0.0.0", controller="c:1")
    assert isinstance(coordinator, CoordinatorConfig)
    assert (coordinator.ready_prefill_instances, coordinator.ready_decode_instances) == (2, 2)
    assert coordinator.http_port == 8080 and coordinator.model_name == "qwen3-8b"
    worker = worker_config(cluster, "decode", host="h", port=2, controller="c:1", redis_url="redis://r:1/0")
    assert isinstance(worker, WorkerConfig) and worker.max_batch_size == 128 and worker.device == "cuda"
    args = settings_args(worker)
    assert args["max-batch-size"] == "128" and args["port"] == "2" and "kv-lease-s" not in args  # a default


def test_up_config_builds_the_stack_and_flags_win(tmp_path):
    cluster = load_cluster_file(DEPLOY / "user_config.json")
    spec = stack_spec(cluster, UpOverrides(decode=2, http_port=0, model=tmp_path), tmp_path / "logs", False)
    assert (spec.prefill, spec.decode, spec.http_port, spec.model_dir) == (1, 2, 0, tmp_path.resolve())
    assert "kv-cache-memory-mib" not in spec.role_args["prefill"]  # the file says the default: left out
    custom = parse_cluster_file(
        minimal(decode={"maxBatchSize": 5}, controller={"replicas": 2, "pd_ratio": "auto"})
    )
    spec = stack_spec(custom, UpOverrides(transfer_backend="shm"), tmp_path, True)
    assert (
        spec.role_args["decode"]["max-batch-size"] == "5"
        and "max-batch-size" not in spec.role_args["prefill"]
    )
    assert spec.controllers == 2 and spec.controller_args["pd-ratio"] == "auto"
    assert spec.worker_args == {"transfer-backend": "shm"} and spec.restart_workers
    multi = parse_cluster_file(minimal(prefill={"tp": 2, "moe_tp": 2}, deploy_config={"p_pod_npu_num": 2}))
    spec = stack_spec(multi, UpOverrides(), tmp_path, False)  # the leader starts its other rank itself
    assert (spec.role_args["prefill"]["tp"], spec.role_args["prefill"]["moe-tp"]) == ("2", "2")
    assert "tp" not in spec.role_args["decode"]
    assert spec.metrics_port == 9464  # the coordinator's /metrics/mesh: the file's default
    quiet = parse_cluster_file(minimal(observability={"metrics_port": None}))
    assert (
        stack_spec(quiet, UpOverrides(), tmp_path, False).metrics_port is None
    )  # no service serves /metrics
    assert stack_spec(quiet, UpOverrides(metrics_port=0), tmp_path, False).metrics_port == 0  # the flag wins


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(minimal(deploy_config={"d_instances_num": 0})))
    assert pdmesh_main(["up", "--config", str(bad)]) == 2
    assert deploy_main(["render", "--config", str(bad), "--target", "k8s", "--out", str(tmp_path / "o")]) == 2
    assert deploy_main(["check", "--config", str(tmp_path / "none.json")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("pdmesh up: ") and "deploy_config.d_instances_num" in lines[0]
    assert lines[1].startswith("pdmesh deploy render: ") and ">= 1 and <= 16" in lines[1]
    shm = tmp_path / "shm.json"
    shm.write_text(json.dumps(minimal(prefill={"transfer_backend": "shm"})))
    assert (
        deploy_main(["render", "--config", str(shm), "--target", "compose", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "prefill.transfer_backend: shm needs" in capsys.readouterr().err


def test_probe_self_reads_the_container_command():
    def target(*argv: str):
        return self_target([a.encode() for a in argv])

    assert target("pdmesh", "controller", "--host", "0.0.0.0", "--port", "50051") == (
        "grpc",
        "127.0.0.1:50051",
    )
    assert target("pdmesh", "decode-worker", "--host", "decode-0", "--port", "7") == ("grpc", "decode-0:7")
    assert target("pdmesh", "coordinator", "--http-port", "8080") == ("http", "http://127.0.0.1:8080/health")
    with pytest.raises(ValueError, match="not a pdmesh service"):
        target("redis-server")


def test_mindie_benchmark_flags_set_their_twins():
    args = build_parser().parse_args(
        ["--Http", "http://h:1", "--DatasetType", "synthetic", "--MaxOutputLen", "7", "--Concurrency", "4"]
        + ["--SamplingParams", '{"temperature": 0.5}', "--ModelPath", "/m", "--RequestRate", "2.5"]
    )
    config = config_from_args(args)
    assert (config.base_url, config.dataset, config.output_len, config.max_concurrency) == (
        "http://h:1",
        "random",
        7,
        4,
    )
    assert (config.temperature, config.tokenizer, config.request_rate) == (0.5, "/m", 2.5)
    for bad, match in (
        (["--SamplingParams", '{"top_k": 3}'], "unsupported top_k"),
        (["--TaskKind", "text"], "streams"),
    ):
        with pytest.raises(ValueError, match=match):
            config_from_args(build_parser().parse_args(bad))
