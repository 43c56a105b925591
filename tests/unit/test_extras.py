"""A missing optional dependency is one line that names the extra installing it."""

from __future__ import annotations

import sys

import pytest

from pdmesh.bench import compare_plot
from pdmesh.extras import MissingExtra, require

pytestmark = pytest.mark.timeout(30)


def test_a_missing_module_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on an image without pdmesh[bench]
    with pytest.raises(
        MissingExtra, match=r"the comparison's plot needs matplotlib.*pip install 'pdmesh\[bench\]'"
    ):
        compare_plot.write_plot({}, "unused.png")
    assert require("json", "bench", "anything").dumps([]) == "[]"
