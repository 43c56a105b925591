"""``EngineConfig``: what one engine loads and how large its KV cache and batches may grow."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    """Options of an ``LLMEngine``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_dir: Path = Field(description="a Hugging Face checkpoint directory")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("cpu", description="cpu, cuda[:N] or npu[:N]")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV block")
    num_blocks: int | None = Field(None, ge=1, description="KV blocks; None: from kv_cache_memory_mib")
    kv_cache_memory_mib: int = Field(256, ge=1, description="memory for the KV cache when num_blocks is None")
    max_num_seqs: int = Field(64, ge=1, description="the most sequences decoded in one step")
    max_prefill_batch_size: int = Field(16, ge=1, description="the most prompts prefilled in one step")
    max_prefill_tokens: int = Field(
        4096, ge=1, description="prompt tokens per prefill step (one longer prompt runs alone)"
    )
    max_model_len: int | None = Field(
        None, ge=1, description="prompt + output tokens; None: the model's maximum"
    )
    decode_workspace_mib: int = Field(
        512,
        ge=0,
        description="float32 CPU decode keeps the batch's K/V densely across steps up to this size; 0: off",
    )
    enable_prefix_caching: bool = Field(True, description="reuse the KV of identical leading prompt blocks")
    seed: int = Field(0, description="seeds the generators of requests without their own seed")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (process-wide); None: leave torch's setting"
    )
    workload: Literal["prefill", "decode", "mixed"] = Field(
        "mixed", description="what this engine mostly runs (picks the CPU linear product, linear_choice)"
    )
    linear_kernel: Literal["auto", "pdmesh", "onednn", "torch"] = Field(
        "auto", description="CPU float32 linear product; auto: measured per host for the workload"
    )
