"""The decode worker service: a worker process whose role starts as decode (see services.worker)."""
