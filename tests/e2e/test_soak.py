"""A 60-second ``pdmesh bench soak`` as a user runs it: a 2P+2D stack under Poisson load while a random
worker is SIGKILLed every 15 s. Its JSON must show every invariant held (see pdmesh/bench/soak.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

DURATION_S = 60
KILL_EVERY_S = 15
# start-up of five services, the load, the settling (a restart, then at most the KV lease's bound)
# and the bounded stop, on a shared two-core machine
pytestmark = pytest.mark.timeout(360)


def test_soak_60s_keeps_every_invariant(tiny_qwen3, tmp_path):
    out = tmp_path / "soak.json"
    argv = [sys.executable, "-m", "pdmesh.cli", "bench", "soak", "--model", str(tiny_qwen3)]
    argv += ["--duration", str(DURATION_S), "--kill-every", str(KILL_EVERY_S), "--rate", "2", "--seed", "1"]
    argv += [
        "--worker-arg",
        "kv-cache-memory-mib=64",
        "--log-dir",
        str(tmp_path / "logs"),
        "--json-out",
        str(out),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=340)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert json.loads(out.read_text()) == report
    requests, end, rss = report["requests"], report["end"], report["rss"]
    summary = json.dumps({k: report[k] for k in ("failed_invariants", "requests", "end", "kills")}, indent=1)
    assert report["failed_invariants"] == [], summary + "\n" + result.stderr[-3000:]
    assert result.returncode == 0 and report["ok"]

    assert requests["sent"] == requests["completed"] + requests["unavailable_justified"]
    assert requests["completed"] > 0 and requests["streamed"] > 0
    assert requests["other_5xx"] == requests["unavailable_unjustified"] == requests["other_errors"] == 0
    assert requests["broken_streams_unjustified"] == 0

    kills = report["kills"]
    assert len(kills) == DURATION_S // KILL_EVERY_S - (DURATION_S % KILL_EVERY_S == 0)
    assert [(r["worker"], r["old_pid"], r["exit_code"]) for r in report["restarts"]] == [
        (k["worker"], k["pid"], -9) for k in kills
    ]

    assert rss["ok"] and rss["judged"] >= 4  # at least Redis, the controller, the coordinator, a worker
    assert all(e["growth"] <= rss["limit"] for e in rss["lifetimes"] if e["judged"])

    assert end["workers_back"] and end["kv_idle"]
    assert end["idle_after_s"] <= end["idle_bound_s"] and end["kv_keys_left"] == 0
    assert set(report["cpu"]["flags"]) >= {"avx2", "avx512f", "amx_tile"}
