"""The prefill worker service: a worker process whose role starts as prefill (see services.worker)."""
