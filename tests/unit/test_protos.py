"""The generated protobuf code must match the contracts in protos/."""

import pytest

from pdmesh.rpc.codegen import stale_files

pytestmark = pytest.mark.timeout(60)


def test_generated_code_is_up_to_date():
    assert stale_files() == [], "run `make protos` and commit the result"
