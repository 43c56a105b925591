"""A rendered docker-compose file, run as local processes with its own commands, environment and
health checks (``compose_runner``), serves requests: that proves the commands, ports and variables
`pdmesh deploy render` writes, not just their schema. Its controller runs the Kubernetes actuator
against a fake API server, so a role flip also relabels the instance's pods there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from pdmesh.bench.serve import main as bench_main
from pdmesh.launcher import ROOT
from pdmesh.rpc.convert_cluster import instance_from_proto
from tests.e2e.compose_runner import ComposeProcesses
from tests.e2e.helpers import list_instances
from tests.k8s_fake_api import FakeKubernetesAPI

pytestmark = pytest.mark.timeout(240)

ROLE_LABEL = "pdmesh.io/role"


def cluster_file(model_dir) -> dict:
    small = {"kv_cache_memory_mib": 16, "kv_lease_s": 10.0, "maxBatchSize": 8}
    return {
        "deploy_config": {"p_instances_num": 2, "d_instances_num": 1, "image_name": "pdmesh:test"},
        "model": {"modelWeightPath": str(model_dir)},
        "controller": {
            "heartbeat_interval_s": 0.2,
            "suspect_after_s": 1.5,
            "dead_after_s": 3.0,
            "probe_interval_s": 0.5,
            "drain_timeout_s": 30.0,
            "actuator": "kubernetes",
        },
        "coordinator": {"http_port": 8000, "request_timeout_s": 60.0},
        "prefill": dict(small),
        "decode": dict(small),
    }


@pytest.fixture(scope="module")
def fake_api() -> Iterator[FakeKubernetesAPI]:
    with FakeKubernetesAPI(namespace="pdmesh") as api:
        for pod, role in (("prefill-0", "prefill"), ("prefill-1", "prefill"), ("decode-0", "decode")):
            api.add_pod(pod, {ROLE_LABEL: role, "app.kubernetes.io/component": role})
        yield api


@pytest.fixture(scope="module")
def compose_stack(tiny_qwen3, tmp_path_factory, fake_api) -> Iterator[ComposeProcesses]:
    work = tmp_path_factory.mktemp("compose")
    (work / "cluster.json").write_text(json.dumps(cluster_file(tiny_qwen3)))
    render = [sys.executable, "-m", "pdmesh.cli", "deploy", "render", "--config", str(work / "cluster.json")]
    render += ["--target", "compose", "--out", str(work / "out")]
    subprocess.run(render, check=True, capture_output=True, timeout=60, cwd=ROOT)
    kubeconfig = fake_api.write_kubeconfig(work / "kubeconfig")
    stack = ComposeProcesses(
        work / "out" / "compose.yaml", work / "logs", env={"KUBECONFIG": str(kubeconfig)}
    )
    stack.start()
    try:
        stack.wait_healthy("coordinator", time.monotonic() + 120)  # its check is GET /ready
        yield stack
    finally:
        stack.stop()


def complete(stack: ComposeProcesses, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "The mesh", "max_tokens": 4, "temperature": 0}
    return httpx.post(f"{stack.url('coordinator')}/v1/completions", json=body, timeout=60)


def test_rendered_compose_serves_a_request(compose_stack, tiny_qwen3):
    assert httpx.get(f"{compose_stack.url('coordinator')}/ready", timeout=10).json() == {"status": "ready"}
    response = complete(compose_stack, tiny_qwen3.name)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
    log = (compose_stack.log_dir / "coordinator.log").read_text()
    assert log.count("pdmesh coordinator is ready (2 prefill, 1 decode)") == 1


def test_flip_relabels_the_pods_through_the_kubernetes_api(compose_stack, fake_api, tiny_qwen3):
    controller = f"127.0.0.1:{compose_stack.ports[('controller', 50051)]}"
    argv = [
        sys.executable,
        "-m",
        "pdmesh.cli",
        "ctl",
        "--controller",
        controller,
        "flip",
        "prefill-1",
        "decode",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, cwd=ROOT, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert fake_api.label("prefill-1", ROLE_LABEL) == "decode"
    assert fake_api.label("prefill-0", ROLE_LABEL) == "prefill"
    patched = [path for method, path, _ in fake_api.requests if method == "PATCH"]
    assert patched == ["/api/v1/namespaces/pdmesh/pods/prefill-1"]
    instances = [instance_from_proto(m) for m in list_instances(controller)]  # the flip has ended
    roles = {i.instance_id: i.role.value for i in instances}
    assert roles == {"prefill-0": "prefill", "prefill-1": "decode", "decode-0": "decode"}
    assert complete(compose_stack, tiny_qwen3.name).status_code == 200


def test_benchmark_with_mindie_flag_names(compose_stack, tiny_qwen3, tmp_path):
    """The paper's last step: MindIE's benchmark command line against the deployed stack, reading a
    GSM8K directory."""
    gsm8k = tmp_path / "gsm8k"
    gsm8k.mkdir()
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}."} for i in range(6)]
    (gsm8k / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "bench.json"
    argv = ["--DatasetPath", str(gsm8k), "--DatasetType", "gsm8k", "--ModelName", tiny_qwen3.name]
    argv += [
        "--ModelPath",
        str(tiny_qwen3),
        "--TestType",
        "openai",
        "--Http",
        compose_stack.url("coordinator"),
    ]
    argv += ["--Tokenizer", "True", "--MaxOutputLen", "4", "--WarmupSize", "1", "--RequestRate", "20"]
    argv += ["--Concurrency", "3", "--SamplingParams", '{"temperature": 0, "ignore_eos": true}']
    argv += ["--WorkersNum", "2", "--TaskKind", "stream", "--num-prompts", "6", "--disable-tqdm"]
    argv += ["--json", str(report)]
    assert bench_main(argv) == 0
    result = json.loads(report.read_text())
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["dataset"] == "gsm8k" and result["max_concurrency"] == 3
    assert result["total_output_tokens"] == 6 * 4  # ignore_eos: exactly MaxOutputLen each
