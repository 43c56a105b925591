"""Service configuration: pydantic models with bounds and descriptions.

Every field has an environment-variable twin: ``PDMESH_<SERVICE>_<FIELD>`` (for example
``PDMESH_COORDINATOR_HTTP_PORT``). Command-line flags override the environment.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# What every service takes to be observed (docs/observability.md).
MetricsPort = Annotated[
    int | None,
    Field(
        ge=0, le=65535, description="port of the Prometheus /metrics server; 0 picks a free one; unset: none"
    ),
]
OtlpEndpoint = Annotated[
    str | None,
    Field(
        pattern=r"^https?://[^/\s]+",
        description="OTLP/gRPC collector for traces, http(s)://host:port; unset: OTEL_EXPORTER_OTLP_* or no traces",
    ),
]
TraceSampleRatio = Annotated[
    float,
    Field(ge=0, le=1, description="fraction of requests traced (a traced request is traced everywhere)"),
]

# Mutual TLS on the service's gRPC links (docs/security.md): on when tls_cert is set.
TlsCa = Annotated[str | None, Field(description="TLS: the CA bundle (PEM) peers' certificates must chain to")]
TlsCert = Annotated[
    str | None,
    Field(description="TLS: this service's certificate (PEM); set: mutual TLS on (needs tls_ca and tls_key)"),
]
TlsKey = Annotated[
    str | None, Field(description="TLS: the certificate's private key (PEM, mode 0600 or stricter)")
]
TlsCrl = Annotated[
    str | None, Field(description="TLS: a CRL (PEM) of revoked certificates, re-read when it changes")
]


def check_tls_fields(config: BaseSettings) -> None:
    """TLS is on when tls_cert is set; then tls_ca and tls_key are required, and without tls_cert
    the other TLS files are an error rather than a silent plaintext service."""
    fields = {name: getattr(config, name) for name in ("tls_ca", "tls_cert", "tls_key", "tls_crl")}
    if fields["tls_cert"]:
        missing = [name for name in ("tls_ca", "tls_key") if not fields[name]]
        if missing:
            raise ValueError(f"tls_cert is set without {' and '.join(missing)} (mutual TLS needs all three)")
    else:
        given = [name for name, value in fields.items() if value]
        if given:
            raise ValueError(f"{', '.join(given)} set without tls_cert (TLS is on only with a certificate)")


class _TlsChecked(BaseSettings):
    """A service's settings whose TLS files are checked together once the fields are read."""

    @model_validator(mode="after")
    def _tls_files(self):
        check_tls_fields(self)
        return self


class ControllerConfig(_TlsChecked):
    """The controller: membership, health and the cluster view."""

    model_config = SettingsConfigDict(env_prefix="PDMESH_CONTROLLER_", extra="forbid")

    host: str = Field("127.0.0.1", description="address the gRPC server binds")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: MetricsPort = None
    otlp_traces_endpoint: OtlpEndpoint = None
    trace_sample_ratio: TraceSampleRatio = 1.0
    tls_ca: TlsCa = None
    tls_cert: TlsCert = None
    tls_key: TlsKey = None
    tls_crl: TlsCrl = None
    redis_url: str | None = Field(None, description="Redis for cluster state and KV handle invalidation")
    heartbeat_interval_s: float = Field(1.0, gt=0, le=60, description="how often workers send heartbeats")
    suspect_after_s: float = Field(
        3.0, gt=0, description="no heartbeat for this long: the instance is suspect"
    )
    dead_after_s: float = Field(6.0, gt=0, description="no heartbeat for this long: the instance is dead")
    probe_interval_s: float = Field(
        1.0, gt=0, le=60, description="how often each instance's gRPC health service is probed"
    )
    advertise_address: str | None = Field(
        None, description="host:port that standbys hand to clients; default: host and the bound port"
    )
    lease_ttl_s: float = Field(
        3.0,
        gt=0,
        le=300,
        description="HA: the active controller's Redis lease; a standby takes over within 2x",
    )
    recovery_grace_s: float | None = Field(
        None,
        gt=0,
        le=300,
        description=(
            "HA: after taking the lease over a new or emptied Redis, how long the controller takes "
            "registrations before it acts and publishes a view (at least lease_ttl_s); "
            "default: 3 heartbeat intervals"
        ),
    )
    pd_ratio: str = Field(
        "off", description="target prefill:decode ratio: 'P:D' (e.g. 2:1), 'auto' (from demand) or 'off'"
    )
    ratio_interval_s: float = Field(2.0, gt=0, description="how often the ratio is checked")
    demand_window_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="auto ratio: demand is averaged over about this long (moving average)",
    )
    flip_cooldown_s: float = Field(30.0, ge=0, description="least time between two automatic role flips")
    drain_timeout_s: float = Field(60.0, gt=0, description="longest wait for a flipping worker to drain")
    prefill_capacity_tokens_per_s: float = Field(
        4000.0, gt=0, description="auto ratio: prompt tokens/s one prefill instance handles"
    )
    decode_batch_capacity: int = Field(
        64, ge=1, description="auto ratio: running sequences one decode instance handles well"
    )
    planner_profile: str | None = Field(
        None,
        description="auto ratio: a `pdmesh profile` JSON; capacities then come from the planner's model",
    )
    planner_tpot_ms: float = Field(50.0, gt=0, description="auto ratio with a profile: the TPOT target")
    planner_context_len: int = Field(
        1024, ge=1, description="auto ratio with a profile: typical context length"
    )
    actuator: Literal["local", "kubernetes"] = Field(
        "local",
        description=(
            "what switches a flipped worker: local (its SetRole RPC) or kubernetes (SetRole, and the "
            "pods' role label through the Kubernetes API; in-cluster or $KUBECONFIG)"
        ),
    )


class CoordinatorConfig(_TlsChecked):
    """The coordinator: OpenAI-compatible HTTP front, gRPC Generate, routing."""

    model_config = SettingsConfigDict(env_prefix="PDMESH_COORDINATOR_", extra="forbid")

    host: str = Field("127.0.0.1", description="address the HTTP and gRPC servers bind")
    http_port: int = Field(
        8000, ge=0, le=65535, description="HTTP port for the OpenAI API; 0 picks a free one"
    )
    grpc_port: int = Field(0, ge=0, le=65535, description="gRPC port for Generate; 0 picks a free one")
    metrics_port: MetricsPort = None
    otlp_traces_endpoint: OtlpEndpoint = None
    trace_sample_ratio: TraceSampleRatio = 1.0
    tls_ca: TlsCa = None
    tls_cert: TlsCert = None
    tls_key: TlsKey = None
    tls_crl: TlsCrl = None
    controller: str = Field(
        ..., description="controller address host:port, or several (comma-separated) for HA"
    )
    model_dir: str = Field(..., description="checkpoint directory (tokenizer, chat template, config)")
    model_name: str | None = Field(
        None, description="model id served at /v1/models; default: the directory name"
    )
    request_timeout_s: float = Field(600.0, gt=0, description="a whole request's time limit")
    first_token_timeout_s: float = Field(120.0, gt=0, description="time limit until the first token")
    max_retry: int = Field(
        2, ge=0, le=10, description="new attempts on other instances when KV or an instance is lost"
    )
    max_inflight: int = Field(256, ge=1, description="requests running at once; more wait in the queue")
    max_queue: int = Field(
        1024, ge=0, description="requests waiting for a slot; more get 429 with Retry-After"
    )
    queue_timeout_s: float = Field(30.0, gt=0, description="longest wait in the queue before 429")
    prefill_policy: Literal["round_robin", "least_load", "power_of_two", "cache_aware"] = Field(
        "cache_aware", description="how a prefill instance is chosen"
    )
    decode_policy: Literal["round_robin", "least_load", "power_of_two"] = Field(
        "least_load", description="how a decode instance is chosen"
    )
    cache_imbalance: int = Field(
        4, ge=0, description="cache_aware: most extra requests the cache holder may have"
    )
    block_size: int = Field(16, ge=1, description="cache_aware: tokens per KV block, as the workers use")
    local_prefill_threshold: int = Field(
        0,
        ge=0,
        description="prompts shorter than this are prefilled by the decode instance itself (0: never)",
    )
    overflow_prefill_tokens: int = Field(
        0,
        ge=0,
        description=(
            "while every prefill instance is busy, a decode instance prefills a prompt of up to this many "
            "tokens itself instead of queueing it (one at a time per instance; 0: never)"
        ),
    )
    ready_prefill_instances: int = Field(
        0, ge=0, description="readiness: healthy prefill instances before /ready answers 200"
    )
    ready_decode_instances: int = Field(
        0, ge=0, description="readiness: healthy decode instances before /ready answers 200"
    )
    ready_mixed_instances: int = Field(
        0, ge=0, description="readiness: healthy mixed instances before /ready answers 200"
    )

    # API keys and HTTPS (docs/security.md "HTTP API"); keys are SecretStr so that no repr shows them
    api_keys: Annotated[list[SecretStr] | None, NoDecode] = Field(
        None,
        description="an API key clients must send (Authorization: Bearer KEY); repeat for several; "
        "env: a JSON list or comma-separated",
        json_schema_extra={"flag": "api-key"},
    )
    api_key_file: str | None = Field(
        None, description="a file of API keys, one per line (# comments); re-read when it changes"
    )
    api_key_max_rps: float | None = Field(None, gt=0, description="requests per second per API key")
    api_key_max_concurrency: int | None = Field(None, ge=1, description="requests at once per API key")
    http_tls_cert: str | None = Field(None, description="HTTPS on the API port: certificate (PEM)")
    http_tls_key: str | None = Field(None, description="HTTPS on the API port: private key (PEM, mode 0600)")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        """The environment gives one string: a JSON list or a comma-separated list."""
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, list):
            value = [v.strip() if isinstance(v, str) else v for v in value]
            if any(v == "" for v in value):
                raise ValueError("an API key must not be empty")
        return value

    @model_validator(mode="after")
    def _http_tls_pair(self):
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise ValueError("http_tls_cert and http_tls_key go together: give both or neither")
        return self


class WorkerConfig(_TlsChecked):
    """A prefill, decode or mixed worker around one engine."""

    model_config = SettingsConfigDict(env_prefix="PDMESH_WORKER_", extra="forbid")

    role: Literal["prefill", "decode", "mixed"] = Field("mixed", description="the phase(s) this worker runs")
    instance_id: str | None = Field(None, description="unique id; default: role-host-port")
    host: str = Field("127.0.0.1", description="address the gRPC and transfer servers bind")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: MetricsPort = None
    otlp_traces_endpoint: OtlpEndpoint = None
    trace_sample_ratio: TraceSampleRatio = 1.0
    tls_ca: TlsCa = None
    tls_cert: TlsCert = None
    tls_key: TlsKey = None
    tls_crl: TlsCrl = None
    controller: str = Field(
        ..., description="controller address host:port, or several (comma-separated) for HA"
    )
    redis_url: str = Field(..., description="Redis holding the KV handle registry")
    model_dir: str = Field(..., description="checkpoint directory in Hugging Face layout")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weight and compute dtype"
    )
    device: str = Field("cpu", description="cpu, cuda[:N] or npu[:N]")
    transfer_backend: Literal["tcp", "shm", "device", "cuda_ipc", "mooncake"] = Field(
        "tcp",
        description=(
            "how KV moves between workers: tcp, shm (same host), device (gloo/nccl/hccl), cuda_ipc, "
            "mooncake (Mooncake Transfer Engine; needs mooncake-transfer-engine-non-cuda)"
        ),
    )
    transfer_port: int = Field(0, ge=0, le=65535, description="KV transfer port (prefill side); 0: free")
    kv_transfer_security: Literal["tls", "secret"] = Field(
        "tls",
        description=(
            "tls: with tls_cert, mutual TLS on the KV transfer too; secret: its bytes go in clear, each "
            "pull authenticated by its handle's secret from the registry (every pull presents it)"
        ),
    )
    kv_cache_memory_mib: int = Field(256, ge=1, description="memory for the paged KV cache")
    decode_workspace_mib: int = Field(
        512, ge=0, description="float32 CPU decode: the running batch's K/V kept densely, up to this; 0: off"
    )
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV block")
    max_batch_size: int = Field(64, ge=1, description="maxBatchSize: sequences in one decode batch")
    max_prefill_batch_size: int = Field(
        16, ge=1, description="maxPrefillBatchSize: prompts in one prefill batch"
    )
    max_prefill_tokens: int = Field(
        4096, ge=1, description="maxPrefillTokens: prompt tokens in one prefill batch"
    )
    kv_lease_s: float = Field(
        30.0, gt=0, description="how long a prefilled KV handle waits for its decode worker"
    )
    linear_kernel: Literal["auto", "pdmesh", "onednn", "torch"] = Field(
        "auto",
        description=(
            "CPU float32 linear product: pdmesh's kernel, oneDNN or torch; auto: measured on this host "
            "for the role (docs/benchmarks.md)"
        ),
    )
    tp: int = Field(1, ge=1, le=1024, description="tensor parallel ranks (attention and dense layers)")
    dp: int = Field(1, ge=1, le=1024, description="data parallel ranks (attention and dense layers)")
    moe_ep: int = Field(
        1, ge=1, le=1024, description="expert parallel ranks (MoE layers); with moe_tp 1: default dp"
    )
    moe_tp: int = Field(
        1, ge=1, le=1024, description="tensor parallel ranks within each expert (MoE layers); default tp"
    )
    num_redundant_experts: int = Field(
        0,
        ge=0,
        le=4096,
        description="EPLB: spare routed-expert slots over the instance, filled with replicas of the hot experts",
    )
    eplb_window_steps: int = Field(
        128, ge=1, le=100000, description="EPLB: steps of per-expert token counts the balancer looks back on"
    )
    eplb_interval_steps: int = Field(
        0, ge=0, le=10**9, description="EPLB: rebalance the routed experts every N steps (0: never)"
    )
    moe_dispatch: Literal["auto", "all_reduce", "all_gather", "all_to_all"] = Field(
        "auto",
        description=(
            "how MoE ranks combine expert outputs: all_reduce (dp 1 only), all_gather (all-gather + "
            "reduce-scatter, MindIE's ep_level 1), all_to_all (ep_level 2); auto: all_reduce at dp 1, "
            "else all_gather"
        ),
    )
    rank: int | None = Field(
        None,
        ge=0,
        description=(
            "this process's rank in its instance, one process per rank (or RANK); unset: the first "
            "rank of its node, which starts the node's other ranks"
        ),
    )
    nnodes: int | None = Field(
        None, ge=1, le=1024, description="hosts (pods) the instance spans; default LWS_GROUP_SIZE or 1"
    )
    node_rank: int | None = Field(
        None,
        ge=0,
        description="this host's index among them (0 holds the leader); default LWS_WORKER_INDEX or 0",
    )
    master_addr: str | None = Field(
        None,
        description="the leader's address for the ranks' rendezvous; default MASTER_ADDR, LWS_LEADER_ADDRESS",
    )
    master_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="the rendezvous port; default MASTER_PORT, else a free port on one host, 29500 across hosts",
    )
    dist_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="bound on every collective and on the ranks' rendezvous"
    )

    @property
    def world_size(self) -> int:
        return self.tp * self.dp

    @model_validator(mode="after")
    def _parallel_layout(self) -> WorkerConfig:
        world = self.tp * self.dp
        moe = self.moe_ep * self.moe_tp
        if moe != 1 and moe != world:
            raise ValueError(
                f"moe_ep x moe_tp = {self.moe_ep} x {self.moe_tp} = {moe} must equal tp x dp = "
                f"{self.tp} x {self.dp} = {world} (or leave both 1: moe_ep = dp, moe_tp = tp)"
            )
        if self.moe_dispatch == "all_reduce" and self.dp > 1:
            raise ValueError(
                f"moe_dispatch all_reduce needs every rank to see every token (dp 1), not dp={self.dp}"
            )
        if self.num_redundant_experts and (self.moe_ep if moe != 1 else self.dp) < 2:
            raise ValueError(
                f"num_redundant_experts {self.num_redundant_experts} needs expert parallelism (moe_ep >= 2)"
            )
        nnodes = self.nnodes or 1
        if world % nnodes:
            raise ValueError(f"{world} ranks (tp x dp) do not spread evenly over nnodes={nnodes}")
        if self.rank is not None and self.rank >= world:
            raise ValueError(f"rank {self.rank} is outside the instance's {world} ranks (tp x dp)")
        if self.node_rank is not None and self.node_rank >= nnodes:
            raise ValueError(f"node_rank {self.node_rank} is outside nnodes={nnodes}")
        return self
