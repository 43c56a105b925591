"""The Kubernetes actuator against a fake API server (a real HTTP server speaking the calls it makes;
no cluster can run here): it finds an instance's whole LeaderWorkerSet group, relabels it, puts the
label back when the switch fails, scales a role, and says what went wrong in one line. A flip that
succeeds end to end, with real workers, is in tests/e2e/test_deploy_compose.py."""

from __future__ import annotations

import asyncio

import pytest
from kubernetes.aio.client import Configuration

from pdmesh.config import ControllerConfig
from pdmesh.membership import InstanceInfoData, Role
from services.controller.k8s_actuator import ROLE_LABEL, KubernetesActuator
from services.controller.roles import FlipFailed, LocalGrpcActuator
from services.controller.server import default_actuator
from tests.k8s_fake_api import FakeKubernetesAPI

pytestmark = pytest.mark.timeout(60)

LWS = "leaderworkerset.sigs.k8s.io/"


@pytest.fixture
def api():
    with FakeKubernetesAPI(namespace="pdmesh") as api:
        for pod, group in (("pdmesh-prefill-0", "0"), ("pdmesh-prefill-0-1", "0"), ("pdmesh-prefill-1", "1")):
            api.add_pod(
                pod, {LWS + "name": "pdmesh-prefill", LWS + "group-index": group, ROLE_LABEL: "prefill"}
            )
        api.add_pod("standalone", {ROLE_LABEL: "decode"})
        api.add_lws("pdmesh-prefill", replicas=2, size=2)
        yield api


def actuator(api: FakeKubernetesAPI, switch=None) -> KubernetesActuator:
    return KubernetesActuator("pdmesh", Configuration(host=api.url), switch=switch)


def test_the_group_of_an_instance(api):
    act = actuator(api)
    assert asyncio.run(act.group_pods("pdmesh-prefill-0")) == ["pdmesh-prefill-0", "pdmesh-prefill-0-1"]
    assert asyncio.run(act.group_pods("standalone")) == ["standalone"]
    with pytest.raises(FlipFailed, match=r"reading pod pdmesh/gone: 404"):
        asyncio.run(act.group_pods("gone"))


def test_a_failed_switch_puts_the_label_back(api):
    """Nothing listens where the worker should be: the local switch fails, the pods keep their role."""
    act = actuator(api, switch=LocalGrpcActuator(timeout_s=0.5, retry_s=0.1))
    instance = InstanceInfoData(instance_id="pdmesh-prefill-0", role=Role.PREFILL, address="127.0.0.1:9")
    with pytest.raises(FlipFailed, match="SetRole on pdmesh-prefill-0: UNAVAILABLE"):
        asyncio.run(act.flip(instance, Role.DECODE))
    patches = [path.rsplit("/", 1)[1] for method, path, _ in api.requests if method == "PATCH"]
    assert patches == ["pdmesh-prefill-0", "pdmesh-prefill-0-1"] * 2  # relabelled, then put back
    assert (
        api.label("pdmesh-prefill-0", ROLE_LABEL) == api.label("pdmesh-prefill-0-1", ROLE_LABEL) == "prefill"
    )
    assert api.label("pdmesh-prefill-1", ROLE_LABEL) == "prefill"


def test_scale_a_role(api):
    act = actuator(api)
    asyncio.run(act.scale(Role.PREFILL, 3))
    assert asyncio.run(act.instances(Role.PREFILL)) == 3
    assert api.lws["pdmesh-prefill"]["spec"]["leaderWorkerTemplate"] == {"size": 2}  # only replicas changed
    with pytest.raises(RuntimeError, match="LeaderWorkerSet pdmesh/pdmesh-decode: 404"):
        asyncio.run(act.scale(Role.DECODE, 1))


def test_configured_from_kubeconfig_or_a_clear_error(api, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig")))
    act = default_actuator(ControllerConfig(actuator="kubernetes"))
    assert isinstance(act, KubernetesActuator)
    assert asyncio.run(act.namespace()) == "pdmesh"  # the context's
    assert asyncio.run(act.group_pods("pdmesh-prefill-1")) == ["pdmesh-prefill-1"]
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(FlipFailed, match="no Kubernetes API to act on"):
        asyncio.run(KubernetesActuator.from_environment().group_pods("pdmesh-prefill-1"))
    assert isinstance(default_actuator(ControllerConfig()), LocalGrpcActuator)
