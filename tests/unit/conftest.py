"""Fixtures shared by the unit tests of the native CPU kernels."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pdmesh.kernels import build

NEEDS_AVX2 = pytest.mark.skipif(
    not build.cpu_supported(), reason="needs an x86-64 CPU with AVX2 (hardware), which this one lacks"
)


@pytest.fixture(scope="module")
def cpu_kernels_built() -> Iterator[None]:
    """The CPU kernels loaded whatever PDMESH_CPU_KERNELS says. On an AVX2 machine they must build:
    a missing compiler is a failure here, not a skip."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(build.SWITCH, raising=False)
        build.load.cache_clear()
        assert build.load() is not None, "the CPU kernels did not build (see the log for the compiler error)"
        yield
    build.load.cache_clear()
