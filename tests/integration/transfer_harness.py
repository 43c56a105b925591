"""A KV transfer server in a spawned process, as between two workers on one host.

The child runs ``target(conn, *args)``: it starts a server, calls ``publish_and_wait`` (expose the
handles, send the endpoint, wait for the parent's stop) and then stops as it sees fit.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable


def publish_and_wait(server, exposed: dict[str, list[int]], conn) -> None:
    """Child side: exposes ``exposed``, sends the endpoint, returns when told to stop (or orphaned)."""
    for handle_id, block_ids in exposed.items():
        server.expose(handle_id, block_ids)
    conn.send(server.endpoint)
    try:
        conn.recv()
    except EOFError:
        pass


class SpawnedServer:
    """Parent side: the spawned server's endpoint (waited for once) and a stop that always ends it."""

    def __init__(self, target: Callable, *args, start_timeout_s: float = 60.0) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.process.start()
        self.start_timeout_s = start_timeout_s
        self._endpoint: str | None = None

    @property
    def endpoint(self) -> str:
        if self._endpoint is None:
            if not self.conn.poll(self.start_timeout_s):
                self.process.kill()
                raise RuntimeError("transfer server process did not start")
            self._endpoint = self.conn.recv()
        return self._endpoint

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send("stop")
            except OSError:
                pass
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
