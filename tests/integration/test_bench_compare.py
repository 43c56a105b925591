"""``pdmesh bench compare`` end to end: a PD stack and a colocated stack of tiny_qwen3, pinned to their
own cores, each serving the same six requests; the JSON holds both results and the ratios."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pdmesh.bench.compare import RATIOS, assign_cpus, main

pytestmark = pytest.mark.timeout(150)


def test_compare_pd_and_colocated(tiny_qwen3: Path, tmp_path: Path, capsys):
    available = sorted(os.sched_getaffinity(0))
    cores = 1 if len(available) >= 2 else 0  # one core each where there are two, else unpinned
    out_json = tmp_path / "compare.json"
    argv = [
        "--model", str(tiny_qwen3),
        "--num-prompts", "6",
        "--input-len", "16",
        "--output-len", "4",
        "--request-rate", "20",
        "--warmup", "1",
        "--goodput", "ttft:600000", "tpot:600000",
        "--cores-per-worker", str(cores),
        "--worker-arg", "kv-cache-memory-mib=16",
        "--timeout", "60",
        "--json", str(out_json),
        "--log-dir", str(tmp_path / "logs"),
        "--disable-tqdm",
    ]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "PD vs colocated" in table and "PD 1P+1D" in table and "colocated 2x mixed" in table
    data = json.loads(out_json.read_text())
    for name, mode in (("pd", "pd"), ("colocated", "mixed")):
        side = data[name]
        assert side["errors"] == [] and side["completed"] == 6, side["errors"]
        assert side["total_output_tokens"] == 24 and side["good_completed"] == 6
        assert side["deployment"]["mode"] == mode
        assert side["deployment"]["worker_cpus"] == assign_cpus(2, cores, available)
    assert set(data["ratios"]) == {name for name, *_ in RATIOS}
    assert data["ratios"]["goodput"] == pytest.approx(
        data["pd"]["request_goodput"] / data["colocated"]["request_goodput"]
    )
    assert data["ratios"]["p99_tpot"] > 0 and data["workload"]["num_prompts"] == 6


@pytest.mark.timeout(240)
def test_compare_pd_against_a_peer_server(tiny_qwen3: Path, tmp_path: Path, capsys):
    """The peer is a second, real pdmesh stack (mixed) standing in for vLLM: any OpenAI server will do."""
    from pdmesh.launcher import LocalStack, StackSpec

    spec = StackSpec(
        model_dir=tiny_qwen3, mode="mixed", prefill=1, decode=0, http_port=0,
        log_dir=tmp_path / "peer-logs", worker_args={"kv-cache-memory-mib": "16"},
    )  # fmt: skip
    out_json, out_png = tmp_path / "compare.json", tmp_path / "compare.png"
    argv = [
        "--model", str(tiny_qwen3), "--deployments", "pd", "--num-prompts", "4", "--input-len", "16",
        "--output-len", "4", "--request-rate", "20", "--warmup", "1", "--goodput", "ttft:600000",
        "--cores-per-worker", "0", "--worker-arg", "kv-cache-memory-mib=16", "--timeout", "60",
        "--json", str(out_json), "--plot", str(out_png), "--log-dir", str(tmp_path / "logs"), "--disable-tqdm",
    ]  # fmt: skip
    with LocalStack(spec) as peer:
        wrong = [*argv, "--peer-url", peer.base_url, "--model-name", "nope"]
        assert main(wrong) == 2  # refused before any deployment starts
        assert f"--model-name 'nope' is not served at {peer.base_url}" in capsys.readouterr().err
        assert not (tmp_path / "logs").exists()
        peer_args = [
            "--peer-url",
            f"{peer.base_url}/v1",
            "--peer-name",
            "vllm",
            "--model-name",
            tiny_qwen3.name,
        ]
        assert main([*argv, *peer_args]) == 0
    table = capsys.readouterr().out
    assert "PD vs vllm" in table and "PD/vllm" in table and "colocated" not in table
    data = json.loads(out_json.read_text())
    assert "colocated" not in data and "ratios" not in data and data["workload"]["deployments"] == ["pd"]
    peer_side = data["peers"]["vllm"]
    assert peer_side["deployment"] == {
        "mode": "peer",
        "label": "vllm",
        "url": peer.base_url,
        "worker_cpus": None,
    }
    for side in (data["pd"], peer_side):
        assert side["errors"] == [] and side["completed"] == 4 and side["total_output_tokens"] == 16
    assert peer_side["model"] == tiny_qwen3.name
    assert set(data["peer_ratios"]["vllm"]) == {"pd"}
    assert data["peer_ratios"]["vllm"]["pd"]["output_throughput"] == pytest.approx(
        data["pd"]["output_throughput"] / peer_side["output_throughput"]
    )
    assert set(data["cpu"]["flags"]) >= {"avx2", "avx512f", "amx_tile"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
