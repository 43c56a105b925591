"""Redis URLs in logs: the password is masked, everything else is kept."""

from __future__ import annotations

from pdmesh.kv.redis_client import mask_url


def test_mask_url_hides_only_the_password():
    assert mask_url("redis://:s3cret@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert (
        mask_url("rediss://app:p%40ss@redis:6380/1?ssl_ca_certs=/tls/ca.pem")
        == "rediss://app:***@redis:6380/1?ssl_ca_certs=/tls/ca.pem"
    )
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert mask_url(None) == "None"
