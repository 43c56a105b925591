"""The role actuator on Kubernetes (``ControllerConfig.actuator = "kubernetes"``).

A flip switches the worker in place, as the local actuator does (its ``SetRole`` RPC: no restart, the
model stays loaded), and records the new role on the instance's pods: every pod of its
LeaderWorkerSet group gets the label ``pdmesh.io/role=<role>``, so that ``kubectl get pods -l`` and
anything selecting on the label see the role the instance serves. The label goes first and is put
back if the switch fails. A group that Kubernetes recreates comes back in its template's role; with
``pd_ratio`` set, the controller flips it again.

``scale`` sets a role's instance count: the ``replicas`` of its LeaderWorkerSet (``pdmesh-<role>``).

The client is the official ``kubernetes`` package (its asyncio API). It is configured in-cluster
(the pod's service account) when ``KUBERNETES_SERVICE_HOST`` is set, else from ``$KUBECONFIG`` or
``~/.kube/config``; the namespace is ``$POD_NAMESPACE``, the service account's, the kubeconfig
context's, or ``default``. The instance id of a worker on Kubernetes is its leader pod's name.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from kubernetes.aio import config as kube_config
from kubernetes.aio.client import ApiClient, Configuration, CoreV1Api, CustomObjectsApi
from kubernetes.aio.client.exceptions import ApiException

from pdmesh.membership import InstanceInfoData, Role
from services.controller.roles import FlipFailed, LocalGrpcActuator, RoleActuator

log = logging.getLogger(__name__)

ROLE_LABEL = "pdmesh.io/role"
LWS_GROUP, LWS_VERSION, LWS_PLURAL = "leaderworkerset.x-k8s.io", "v1", "leaderworkersets"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubernetesActuator:
    """Flips in place and relabels the instance's pods; scales a role's LeaderWorkerSet."""

    def __init__(
        self,
        namespace: str | None = None,
        configuration: Configuration | None = None,
        switch: RoleActuator | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self._namespace = namespace
        self._configuration = configuration
        self.switch = switch or LocalGrpcActuator(timeout_s=timeout_s)
        self.request_timeout_s = 10.0

    @classmethod
    def from_environment(cls, timeout_s: float = 30.0) -> KubernetesActuator:
        """Configured on first use (in-cluster or kubeconfig), so a controller starts without an API server."""
        return cls(timeout_s=timeout_s)

    async def flip(self, instance: InstanceInfoData, new_role: Role) -> None:
        pods = await self.group_pods(instance.instance_id)
        await self._label(pods, new_role)
        try:
            await self.switch.flip(instance, new_role)
        except FlipFailed:
            with contextlib.suppress(FlipFailed):
                await self._label(pods, instance.role)
            raise
        log.info(
            "%s: pods %s labelled %s=%s", instance.instance_id, ", ".join(pods), ROLE_LABEL, new_role.value
        )

    async def group_pods(self, instance_id: str) -> list[str]:
        """The names of every pod of the instance's group (the leader alone outside a LeaderWorkerSet)."""
        async with await self._api() as api:
            core = CoreV1Api(api)
            namespace = await self.namespace()
            try:
                leader = await core.read_namespaced_pod(
                    instance_id, namespace, _request_timeout=self.request_timeout_s
                )
                labels = leader.metadata.labels or {}
                if LWS_NAME_LABEL not in labels or LWS_GROUP_INDEX_LABEL not in labels:
                    return [instance_id]
                selector = (
                    f"{LWS_NAME_LABEL}={labels[LWS_NAME_LABEL]},"
                    f"{LWS_GROUP_INDEX_LABEL}={labels[LWS_GROUP_INDEX_LABEL]}"
                )
                pods = await core.list_namespaced_pod(
                    namespace, label_selector=selector, _request_timeout=self.request_timeout_s
                )
            except (ApiException, OSError) as exc:
                raise FlipFailed(f"reading pod {namespace}/{instance_id}: {_reason(exc)}") from None
        return sorted(p.metadata.name for p in pods.items)

    async def _label(self, pods: list[str], role: Role) -> None:
        body = {"metadata": {"labels": {ROLE_LABEL: role.value}}}
        async with await self._api() as api:
            core = CoreV1Api(api)
            namespace = await self.namespace()
            for pod in pods:
                try:
                    await core.patch_namespaced_pod(
                        pod, namespace, body, _request_timeout=self.request_timeout_s
                    )
                except (ApiException, OSError) as exc:
                    raise FlipFailed(f"labelling pod {namespace}/{pod}: {_reason(exc)}") from None

    async def scale(self, role: Role, instances: int) -> None:
        """Sets the number of instances (LeaderWorkerSet groups) of ``role``."""
        if instances < 0:
            raise ValueError(f"instances must be >= 0, not {instances}")
        body = {"spec": {"replicas": instances}}
        await self._lws("patch", role, body)
        log.info("scaled %s to %d instances", role.value, instances)

    async def instances(self, role: Role) -> int:
        """The instance count the LeaderWorkerSet of ``role`` asks for."""
        lws = await self._lws("get", role)
        return int(lws.get("spec", {}).get("replicas", 1))

    async def _lws(self, verb: str, role: Role, body: dict | None = None) -> dict:
        name = f"pdmesh-{role.value}"
        async with await self._api() as api:
            custom = CustomObjectsApi(api)
            namespace = await self.namespace()
            args = (LWS_GROUP, LWS_VERSION, namespace, LWS_PLURAL, name)
            try:
                if verb == "get":
                    return await custom.get_namespaced_custom_object(
                        *args, _request_timeout=self.request_timeout_s
                    )
                return await custom.patch_namespaced_custom_object(  # custom resources: no strategic merge
                    *args,
                    body,
                    _content_type="application/merge-patch+json",
                    _request_timeout=self.request_timeout_s,
                )
            except (ApiException, OSError) as exc:
                raise RuntimeError(f"{verb} LeaderWorkerSet {namespace}/{name}: {_reason(exc)}") from None

    async def _api(self) -> ApiClient:
        if self._configuration is None:
            configuration = Configuration()
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                kube_config.load_incluster_config(client_configuration=configuration)
            else:
                try:
                    await kube_config.load_kube_config(_kubeconfig(), client_configuration=configuration)
                except kube_config.ConfigException as exc:
                    raise FlipFailed(f"no Kubernetes API to act on: {exc}") from None
            self._configuration = configuration
        return ApiClient(self._configuration)

    async def namespace(self) -> str:
        if self._namespace is None:
            self._namespace = os.environ.get("POD_NAMESPACE") or _service_account_namespace()
        if self._namespace is None:
            with contextlib.suppress(Exception):  # no kubeconfig, or one without contexts
                _, active = kube_config.list_kube_config_contexts(_kubeconfig())
                self._namespace = active.get("context", {}).get("namespace")
        self._namespace = self._namespace or "default"
        return self._namespace


def _kubeconfig() -> str:
    """$KUBECONFIG (its first file) or ~/.kube/config, read now: the client reads it at import."""
    first = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    return first or os.path.expanduser("~/.kube/config")


def _service_account_namespace() -> str | None:
    with contextlib.suppress(OSError):
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    return None


def _reason(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return repr(exc)
