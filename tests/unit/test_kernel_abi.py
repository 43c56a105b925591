"""The CPU kernels' interface check at load: a library whose structs or version differ from the
ctypes mirror (``pdmesh/kernels/abi.py``) is refused with the reason logged, and the models keep
their PyTorch expressions."""

from __future__ import annotations

import ctypes
import logging
import subprocess

import pytest
import torch

from pdmesh.kernels import abi, build, cpu
from tests.unit.conftest import NEEDS_AVX2

pytestmark = [NEEDS_AVX2, pytest.mark.usefixtures("cpu_kernels_built"), pytest.mark.timeout(120)]


def library() -> ctypes.CDLL:
    return ctypes.CDLL(str(build.build(build.compiler())))


def refused_at_load(caplog: pytest.LogCaptureFixture) -> str:
    """Loads the kernels afresh; asserts they were refused and returns what was logged."""
    build.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=build.__name__):
            assert build.load() is None
        assert not cpu.enabled(torch.zeros(1))
    finally:
        build.load.cache_clear()
    return caplog.text


def test_the_built_library_matches_its_mirror() -> None:
    lib = library()
    assert abi.mismatch(lib) is None
    assert lib.pdm_abi_version() == abi.ABI_VERSION


def test_a_field_of_another_size_is_refused(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    fields = [(name, ctypes.c_int32 if name == "width" else kind) for name, kind in abi.StepStruct._fields_]
    narrow = type("NarrowStep", (ctypes.Structure,), {"_fields_": fields})
    monkeypatch.setitem(abi.MIRRORS, "pdm_decode_step", narrow)
    offset = abi.StepStruct.width.offset
    assert abi.mismatch(library()) == (
        f"pdm_decode_step.width is 8 bytes at offset {offset} in C but 4 bytes at offset {offset} in Python"
    )
    assert "CPU kernels refused" in refused_at_load(caplog) and "pdm_decode_step.width" in caplog.text


def test_fields_in_another_order_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = list(abi.LayerStruct._fields_)
    fields[0], fields[1] = fields[1], fields[0]
    monkeypatch.setitem(
        abi.MIRRORS, "pdm_layer_weights", type("Swapped", (ctypes.Structure,), {"_fields_": fields})
    )
    assert abi.mismatch(library()).startswith("pdm_layer_weights has fields ['hidden', 'heads'")


def test_another_version_is_refused(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setattr(abi, "ABI_VERSION", abi.ABI_VERSION + 1)
    assert "the library's ABI version is" in refused_at_load(caplog)


def test_a_library_without_the_report_is_refused(tmp_path) -> None:
    source = tmp_path / "old.c"
    source.write_text("int pdm_argmax(void) { return 0; }\n")
    target = tmp_path / "old.so"
    subprocess.run(
        [build.compiler(), "-shared", "-fPIC", "-o", str(target), str(source)], check=True, timeout=60
    )
    assert "exports no ABI report" in abi.mismatch(ctypes.CDLL(str(target)))
