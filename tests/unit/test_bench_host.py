"""pdmesh.bench.host: the CPU every benchmark JSON records."""

from __future__ import annotations

import os

import torch

from pdmesh.bench.host import FLAGS, host_info, parse_cpuinfo

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile amx_bf16

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2
"""


def test_parse_cpuinfo_takes_the_first_processor():
    model, flags = parse_cpuinfo(CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx2", "avx512f", "avx512_bf16", "amx_tile"} <= flags and "avx512_vnni" not in flags
    assert parse_cpuinfo("") == (None, set())


def test_host_info_describes_this_host():
    cpu = host_info()["cpu"]
    assert cpu["cores"] == os.cpu_count() and cpu["torch"] == torch.__version__
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(cpu["flags"]) == set(FLAGS) >= {"avx2", "avx512f", "avx512_bf16", "amx_tile", "avx512_vnni"}
    assert all(isinstance(v, bool) for v in cpu["flags"].values())
    assert isinstance(cpu["model"], str) and cpu["model"]
    if os.path.exists("/proc/cpuinfo"):  # the flags are the kernel's
        _, flags = parse_cpuinfo(open("/proc/cpuinfo").read())
        assert cpu["flags"] == {name: name in flags for name in FLAGS}


def test_host_info_is_a_copy():
    host_info()["cpu"]["flags"]["avx2"] = "changed"
    assert isinstance(host_info()["cpu"]["flags"]["avx2"], bool)
