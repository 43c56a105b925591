"""The cluster file: one JSON (or YAML) document that describes a whole deployment.

Its names follow MindIE's ``user_config.json`` where the two overlap: ``deploy_config`` holds the
instance and pod counts (``p_instances_num``, ``single_p_instance_pod_num``, ``p_pod_npu_num``, ...),
``prefill`` and ``decode`` (also accepted as ``mindie_server_prefill_config`` /
``mindie_server_decode_config``) hold each role's server settings with MindIE's ``maxBatchSize``,
``maxPrefillBatchSize`` and ``maxPrefillTokens``, ``controller`` and ``coordinator`` (or
``mindie_ms_controller_config`` / ``mindie_ms_coordinator_config``) their services' settings.

The sections hold no field of their own for a service setting: they are built from the services'
pydantic settings (``ControllerConfig``, ``CoordinatorConfig``, ``WorkerConfig``), so bounds and
descriptions have one source. What a deployment decides by itself (addresses, ports, instance ids,
readiness counts) is left out of the sections and set by ``pdmesh.deploy.settings``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from pdmesh.config import ControllerConfig, CoordinatorConfig, WorkerConfig
from pdmesh.deploy.tls_config import TlsConfig

# Worker settings that belong to a role's server section (an include list: fields added to
# WorkerConfig later, such as a rank's address, are the deployment's unless named here).
SERVER_FIELDS = (
    "dtype", "device", "transfer_backend", "kv_cache_memory_mib", "decode_workspace_mib", "block_size",
    "max_batch_size", "max_prefill_batch_size", "max_prefill_tokens", "kv_lease_s",
    "tp", "dp", "moe_ep", "moe_tp",
)  # fmt: skip
# MindIE's ScheduleConfig names for the same settings.
MINDIE_NAMES = {
    "max_batch_size": "maxBatchSize",
    "max_prefill_batch_size": "maxPrefillBatchSize",
    "max_prefill_tokens": "maxPrefillTokens",
}
# Settings the deployment decides (addresses, identity, readiness), never the file; the TLS files
# come from tls_config, and API keys only from a file (the cluster file is a ConfigMap, not a secret).
TLS_FIELDS = ("tls_ca", "tls_cert", "tls_key", "tls_crl")
CONTROLLER_RUNTIME = ("host", "port", "metrics_port", "redis_url", "advertise_address", *TLS_FIELDS)
COORDINATOR_RUNTIME = (
    "host", "controller", "model_dir", "model_name", "block_size", "metrics_port",
    "ready_prefill_instances", "ready_decode_instances", "ready_mixed_instances",
    *TLS_FIELDS, "http_tls_cert", "http_tls_key", "api_keys",
)  # fmt: skip

_SECTION_CONFIG = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class ClusterFileError(ValueError):
    """A cluster file that cannot be read or is invalid; the message is one line for the user."""


def _section(name: str, settings: type[BaseModel], fields: list[str], **extra: Any) -> type[BaseModel]:
    """A model whose fields are ``settings``' own (same type, default, bounds, description)."""
    own = {}
    for field in fields:
        info = settings.model_fields[field]
        if field in MINDIE_NAMES:
            info = FieldInfo.merge_field_infos(info, Field(alias=MINDIE_NAMES[field]))
        own[field] = (info.annotation, info)
    return create_model(name, __config__=_SECTION_CONFIG, __doc__=settings.__doc__, **own, **extra)


ServerSection = _section("ServerSection", WorkerConfig, list(SERVER_FIELDS))
ControllerSection = _section(
    "ControllerSection",
    ControllerConfig,
    [f for f in ControllerConfig.model_fields if f not in CONTROLLER_RUNTIME],
    replicas=(int, Field(1, ge=1, le=5, description="controllers; 2 or more: active/standby (HA)")),
)
CoordinatorSection = _section(
    "CoordinatorSection",
    CoordinatorConfig,
    [f for f in CoordinatorConfig.model_fields if f not in COORDINATOR_RUNTIME],
)


class DeployConfig(BaseModel):
    """Instance and pod counts, devices, image and where things live (MindIE's deploy_config)."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    p_instances_num: int = Field(1, ge=1, le=16, description="prefill instances")
    d_instances_num: int = Field(1, ge=1, le=16, description="decode instances")
    single_p_instance_pod_num: int = Field(1, ge=1, le=64, description="pods of one prefill instance")
    single_d_instance_pod_num: int = Field(1, ge=1, le=64, description="pods of one decode instance")
    p_pod_npu_num: int = Field(
        1, ge=1, le=16, description="devices (ranks) per prefill pod; on CPU, ranks per pod"
    )
    d_pod_npu_num: int = Field(
        1, ge=1, le=16, description="devices (ranks) per decode pod; on CPU, ranks per pod"
    )
    image_name: str = Field("pdmesh:0.1.0", min_length=1, description="the image every role runs")
    namespace: str = Field(
        "pdmesh",
        max_length=63,
        pattern=_DNS_LABEL,
        validation_alias=AliasChoices("namespace", "job_id"),
        description="Kubernetes namespace (MindIE: job_id); also the compose project name",
    )
    weight_mount_path: str | None = Field(
        None,
        description="host directory mounted read-only at the same path (default: modelWeightPath)",
    )
    model_pvc: str | None = Field(
        None, description="Kubernetes: a PersistentVolumeClaim holding the weights instead of hostPath"
    )
    redis_url: str | None = Field(None, description="an external Redis; default: one is deployed")
    redis_image: str = Field("redis:7.4-alpine", description="the Redis image when one is deployed")
    controller_port: int = Field(50051, ge=1, le=65535, description="every controller's gRPC port")
    worker_port: int = Field(50052, ge=1, le=65535, description="every worker's gRPC port")
    worker_transfer_port: int = Field(50053, ge=1, le=65535, description="prefill KV transfer port")


class ObservabilitySection(BaseModel):
    """Metrics in containers, and whether the renders add Prometheus and Grafana (deploy/observability)."""

    model_config = ConfigDict(extra="forbid")

    metrics_port: int | None = Field(
        9464,
        ge=1,
        le=65535,
        description="every service's Prometheus /metrics port (the coordinator's also serves /metrics/mesh); "
        "null: no metrics servers",
    )
    prometheus: bool = Field(
        False, description="compose: a Prometheus service; Kubernetes: its scrape config as a ConfigMap"
    )
    grafana: bool = Field(
        False,
        description="compose: a Grafana service with the dashboard; Kubernetes: the dashboard ConfigMap",
    )
    prometheus_image: str = Field("prom/prometheus:v3.5.0", min_length=1, description="compose's Prometheus")
    grafana_image: str = Field("grafana/grafana:12.1.1", min_length=1, description="compose's Grafana")


class ModelSection(BaseModel):
    """The checkpoint every role serves (MindIE: ModelConfig's modelName and modelWeightPath)."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    name: str | None = Field(None, alias="modelName", description="model id at /v1/models")
    path: str = Field(..., alias="modelWeightPath", min_length=1, description="checkpoint directory")


class ClusterFile(BaseModel):
    """A whole deployment. ``prefill``/``decode`` are the two roles' server sections."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    version: Literal["v1.0"] = "v1.0"
    deploy_config: DeployConfig = Field(default_factory=DeployConfig)
    model: ModelSection
    controller: ControllerSection = Field(
        default_factory=ControllerSection,
        validation_alias=AliasChoices("controller", "mindie_ms_controller_config"),
    )
    coordinator: CoordinatorSection = Field(
        default_factory=CoordinatorSection,
        validation_alias=AliasChoices("coordinator", "mindie_ms_coordinator_config"),
    )
    prefill: ServerSection = Field(
        default_factory=ServerSection,
        validation_alias=AliasChoices("prefill", "mindie_server_prefill_config"),
    )
    decode: ServerSection = Field(
        default_factory=ServerSection,
        validation_alias=AliasChoices("decode", "mindie_server_decode_config"),
    )
    observability: ObservabilitySection = Field(default_factory=ObservabilitySection)
    tls_config: TlsConfig = Field(default_factory=TlsConfig)

    def server(self, role: str) -> BaseModel:
        """The server section of ``role`` (prefill or decode)."""
        return self.prefill if role == "prefill" else self.decode

    def instances(self, role: str) -> int:
        d = self.deploy_config
        return d.p_instances_num if role == "prefill" else d.d_instances_num

    def pods(self, role: str) -> int:
        """Pods of one instance of ``role``."""
        d = self.deploy_config
        return d.single_p_instance_pod_num if role == "prefill" else d.single_d_instance_pod_num

    def devices_per_pod(self, role: str) -> int:
        d = self.deploy_config
        return d.p_pod_npu_num if role == "prefill" else d.d_pod_npu_num

    def world(self, role: str) -> int:
        """Ranks of one instance of ``role`` (tp x dp)."""
        server = self.server(role)
        return server.tp * server.dp

    def check(self) -> list[str]:
        """What MindIE checks across keys: each problem as 'key.path: what is wrong'."""
        problems = []
        for role, letter in (("prefill", "p"), ("decode", "d")):
            s = self.server(role)
            if s.moe_ep * s.moe_tp not in (1, s.tp * s.dp):
                problems.append(
                    f"{role}: tp*dp ({s.tp}*{s.dp}={s.tp * s.dp}) must equal moe_ep*moe_tp "
                    f"({s.moe_ep}*{s.moe_tp}={s.moe_ep * s.moe_tp}): both are the instance's ranks "
                    "(or leave moe_ep and moe_tp 1: then moe_ep = dp, moe_tp = tp)"
                )
            pods, per_pod = self.pods(role), self.devices_per_pod(role)
            if self.world(role) != pods * per_pod:
                problems.append(
                    f"{role}: tp*dp ({self.world(role)}) must equal the instance's devices, "
                    f"deploy_config.single_{letter}_instance_pod_num*{letter}_pod_npu_num "
                    f"({pods}*{per_pod}={pods * per_pod})"
                )
            if not re.fullmatch(r"(cpu|cuda|npu)(:\d+)?", s.device):
                problems.append(f"{role}.device: {s.device!r} is not cpu, cuda or npu (cuda:N, npu:N)")
            elif ":" in s.device and pods * per_pod > 1:
                problems.append(f"{role}.device: name no index ({s.device}) for an instance of many devices")
        if self.tls_config.redis_tls_enable and not (self.deploy_config.redis_url or "").startswith(
            "rediss://"
        ):
            problems.append(
                "tls_config.redis_tls_enable: needs deploy_config.redis_url, a rediss:// URL "
                "(the Redis that pdmesh starts or deploys runs without TLS)"
            )
        for key in ("block_size", "dtype"):
            if getattr(self.prefill, key) != getattr(self.decode, key):
                problems.append(
                    f"decode.{key}: {getattr(self.decode, key)} differs from prefill.{key} "
                    f"({getattr(self.prefill, key)}); the KV cache moves between them as it is"
                )
        return problems


def _constraints(model: type[BaseModel], loc: tuple) -> str:
    """The allowed range of the numeric field at ``loc`` in words ('>= 1 and <= 16'), or ''."""
    info = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return ""
        info = next((f for n, f in model.model_fields.items() if part in (n, f.alias, *_choices(f))), None)
        if info is None:
            return ""
        model = info.annotation
    if info is None:
        return ""
    lo = hi = None
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge | annotated_types.Gt):
            lo = f">= {m.ge}" if isinstance(m, annotated_types.Ge) else f"> {m.gt}"
        if isinstance(m, annotated_types.Le | annotated_types.Lt):
            hi = f"<= {m.le}" if isinstance(m, annotated_types.Le) else f"< {m.lt}"
    return " and ".join(filter(None, [lo, hi]))  # a Literal's choices are in pydantic's message


def _choices(info: FieldInfo) -> tuple[str, ...]:
    alias = info.validation_alias
    return tuple(a for a in alias.choices if isinstance(a, str)) if isinstance(alias, AliasChoices) else ()


def describe_errors(exc: ValidationError, model: type[BaseModel] = None) -> str:
    """One line: each error as 'key.path: message (allowed: range; got value)'."""
    model = model or ClusterFile
    parts = []
    for err in exc.errors():
        path = ".".join(map(str, err["loc"])) or "(top level)"
        allowed = _constraints(model, err["loc"]) if err["type"] != "extra_forbidden" else ""
        extra = f"allowed: {allowed}; " if allowed else ""
        got = "" if err["type"] in ("missing", "value_error") else f"got {err['input']!r}"
        detail = f" ({extra}{got})".replace("; )", ")") if (extra or got) else ""
        parts.append(f"{path}: {err['msg']}{detail}")
    return "; ".join(parts)


def parse_cluster_file(data: Any, source: str = "cluster file") -> ClusterFile:
    """Validates a loaded document; ClusterFileError names every bad key with its allowed range."""
    if not isinstance(data, dict):
        raise ClusterFileError(f"{source}: the top level must be a mapping, not {type(data).__name__}")
    try:
        cluster = ClusterFile.model_validate(data)
    except ValidationError as exc:
        raise ClusterFileError(f"{source}: {describe_errors(exc)}") from None
    problems = cluster.check()
    if problems:
        raise ClusterFileError(f"{source}: " + "; ".join(problems))
    return cluster


def load_cluster_file(path: str | Path) -> ClusterFile:
    """Reads JSON (or YAML for .yaml/.yml) and validates it; ClusterFileError with one line if bad."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ClusterFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ClusterFileError(f"{path}: not valid YAML: {_one_line(exc)}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ClusterFileError(f"{path}: not valid JSON: {_one_line(exc)}") from None
    return parse_cluster_file(data, str(path))


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
