"""The ``device`` transfer backend: torch.distributed point to point over a group per prefill/decode pair.

The process-group backend follows the pool's device: ``gloo`` for CPU pools, ``nccl`` for CUDA,
``hccl`` for Ascend NPUs (``torch_npu``, imported only then). No global ``init_process_group`` is
made: each pair gets its own two-rank group, built straight from the backend's class over a
``PrefixStore``, so one worker can hold groups with many peers.

Rendezvous. The prefill server owns a ``TCPStore`` (a free port) and a control socket (the
endpoint ``device://host:port``). On its first pull to an endpoint the decode client opens one
long-lived control connection and sends ``{"v": 1, "op": "join", "pair": ID, "layout": ...}``; the
server checks the layout and answers ``{"ok": true, "store_port": P, "backend": "gloo"}``; then both
build the group over ``PrefixStore("pdmesh/pair/ID", store)``, prefill as rank 0, decode as rank 1.

Pulls then go over that connection one at a time (a lock per pair): the client sends the usual
pull hello, the server answers ``{"ok": true, "num_blocks": N, "runs": [count, ...]}`` and sends
each run of consecutive source blocks as one ``send`` of a slice of its pool; the client receives a
run straight into its destination blocks when they are consecutive too, else into a staging buffer
it scatters with ``index_copy_``. Every ``wait`` is bounded by the pull's timeout; any failure
drops the pair (control socket and group) and the next pull forms a new one.

Under TLS (``secure``) the control connection is mutual TLS between workers: only a peer that
passed it learns the pair id and the store's port. The ``TCPStore`` and the group's own transport
(gloo, nccl, hccl) are not encrypted (docs/security.md).
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
import uuid

import torch
import torch.distributed as dist

from pdmesh.accelerator import dist_backend
from pdmesh.kv.transfer import secure, wire
from pdmesh.kv.transfer.errors import Refused, TransferError
from pdmesh.kv.transfer.protocols import check_pool
from pdmesh.kv.transfer.tcp import advertised_host, parse_endpoint
from pdmesh.kv.types import KVHandle, KVLayout

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 30.0
SEND_TIMEOUT_S = 30.0
_TAG = 0


def dist_backend_for(device: torch.device) -> str:
    """The process-group backend for a pool on ``device`` (the accelerator module's choice)."""
    try:
        return dist_backend(device)
    except ValueError:
        raise ValueError(
            f"the device transfer backend has no process group for {device.type} pools"
        ) from None


def make_group(backend: str, store: dist.Store, rank: int, host: str, timeout_s: float, device: torch.device):
    """A two-rank process group of ``backend`` over ``store`` (blocks until both ranks joined)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, rank, 2, options)
    if backend == "nccl":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    if backend == "hccl":
        import torch_npu  # noqa: F401  (registers torch.npu and ProcessGroupHCCL)

        torch.npu.set_device(device)
        return dist.ProcessGroupHCCL(store, rank, 2, timeout)
    raise ValueError(f"unknown process-group backend {backend!r}")


def send_run(group, tensor: torch.Tensor) -> None:
    """Sends one run of blocks to the decode rank (a module function so that tests can slow it down)."""
    group.send([tensor], 1, _TAG).wait(datetime.timedelta(seconds=SEND_TIMEOUT_S))


class DeviceTransferServer(wire.ExposingServer):
    """Prefill side of ``device``: a TCPStore, a control socket, and a group per pulling peer."""

    def __init__(
        self,
        kv_pool: torch.Tensor,
        layout: KVLayout,
        host: str,
        port: int = 0,
        ssl_context: secure.TlsContext | None = None,
    ) -> None:
        check_pool(kv_pool, layout)
        self.layout = layout
        self.pool = kv_pool
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.backend = dist_backend_for(kv_pool.device)
        self._exposed = wire.ExposedTable(kv_pool.shape[0])
        self._store: dist.TCPStore | None = None
        self._control: wire.ControlServer | None = None

    @property
    def endpoint(self) -> str:
        return f"device://{advertised_host(self.host)}:{self.port}"

    def start(self) -> None:
        if self._control is not None:
            return
        self._store = dist.TCPStore(
            self.host or "0.0.0.0", 0, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S),
        )  # fmt: skip
        listener = socket.create_server((self.host, self.port), backlog=128)
        self.port = listener.getsockname()[1]
        self._control = wire.ControlServer(
            listener, self._serve_pair, f"kv-device-{self.port}", self.ssl_context
        )
        log.info("KV device (%s) transfer server on %s", self.backend, self.endpoint)

    def stop(self) -> None:
        if self._control is not None:
            self._control.stop()
            self._control = None
            self._store = None

    def _serve_pair(self, conn: socket.socket, peer) -> None:
        conn.settimeout(wire.HANDSHAKE_TIMEOUT_S)
        try:
            group = self._join(conn, peer)
            if group is None:
                return
            conn.settimeout(None)  # the peer may pull rarely; its death closes the socket
            while True:
                try:
                    message = wire.recv_frame(conn)
                except ConnectionError:
                    return
                with wire.pull_span(message, "device"):
                    self._serve_pull(conn, group, message, peer)
        except RuntimeError as exc:  # the group failed: the peer died or stalled
            log.warning("device pair with %s failed: %s", peer, exc)

    def _join(self, conn: socket.socket, peer):
        message = wire.recv_frame(conn)
        error = self._join_error(message)
        if error is not None:
            log.warning("refused a device pair with %s: %s", peer, error)
            wire.send_frame(conn, {"ok": False, "error": error})
            return None
        wire.send_frame(conn, {"ok": True, "store_port": self._store.port, "backend": self.backend})
        store = dist.PrefixStore(f"pdmesh/pair/{message['pair']}", self._store)
        host = conn.getsockname()[0]
        group = make_group(self.backend, store, 0, host, JOIN_TIMEOUT_S, self.pool.device)
        log.info("formed a %s pair with %s", self.backend, peer)
        return group

    def _join_error(self, message: dict) -> str | None:
        if (
            message.get("v") != wire.PROTOCOL_VERSION
            or message.get("op") != "join"
            or not message.get("pair")
        ):
            return f"expected a v{wire.PROTOCOL_VERSION} join, got op {message.get('op')!r}"
        try:
            return self.layout.mismatch(KVLayout.from_dict(message["layout"]))
        except (KeyError, TypeError) as exc:
            return f"malformed KV layout in request: {exc}"

    def _serve_pull(self, conn: socket.socket, group, message: dict, peer) -> None:
        admitted = self._exposed.admit(conn, message, self.layout, peer)
        if admitted is None:
            return
        block_ids, _ = admitted
        runs = wire.block_runs(list(block_ids))
        wire.send_frame(conn, {"ok": True, "num_blocks": len(block_ids), "runs": [n for _, n in runs]})
        for start, count in runs:
            send_run(group, self.pool[start : start + count])
        self._served(len(block_ids), self.layout.block_nbytes)


class _Pair:
    """The decode end of one prefill/decode pair: the control connection and the group."""

    def __init__(
        self,
        endpoint: str,
        layout: KVLayout,
        pool: torch.Tensor,
        timeout_s: float,
        ssl_context: secure.TlsContext | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.pool = pool
        host, port = parse_endpoint(endpoint)
        self.sock = socket.create_connection((host, port), timeout=min(wire.CONNECT_TIMEOUT_S, timeout_s))
        if ssl_context is not None:
            self.sock = secure.connect(self.sock, ssl_context, host, endpoint)
        try:
            self.group = self._join(host, layout, timeout_s)
        except BaseException:
            self.sock.close()
            raise

    def _join(self, host: str, layout: KVLayout, timeout_s: float):
        pair = uuid.uuid4().hex
        join = {"v": wire.PROTOCOL_VERSION, "op": "join", "pair": pair, "layout": layout.to_dict()}
        wire.send_frame(self.sock, join)
        reply = wire.recv_frame(self.sock, time.monotonic() + timeout_s)
        if not reply.get("ok"):
            raise TransferError(f"{host} refused to pair: {reply.get('error')}")
        mine = dist_backend_for(self.pool.device)
        if reply.get("backend") != mine:
            raise TransferError(
                f"process-group backend {reply.get('backend')!r} at the peer but {mine!r} here"
            )
        store = dist.TCPStore(
            host, reply["store_port"], is_master=False, timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S)
        )
        local = self.sock.getsockname()[0]
        return make_group(
            mine, dist.PrefixStore(f"pdmesh/pair/{pair}", store), 1, local, JOIN_TIMEOUT_S, self.pool.device
        )

    def pull(self, handle: KVHandle, layout: KVLayout, dst_block_ids: list[int], deadline: float) -> None:
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        wire.send_frame(self.sock, wire.hello(handle.handle_id, layout, handle.secret))
        reply = wire.recv_frame(self.sock, deadline)
        if not reply.get("ok"):
            raise wire.refused(handle, reply)
        wire.check_count(handle, reply, dst_block_ids)
        offset = 0
        for count in reply["runs"]:
            self._receive(dst_block_ids[offset : offset + count], deadline)
            offset += count

    def _receive(self, dst_ids: list[int], deadline: float) -> None:
        consecutive = dst_ids == list(range(dst_ids[0], dst_ids[0] + len(dst_ids)))
        target = self.pool[dst_ids[0] : dst_ids[0] + len(dst_ids)] if consecutive else None
        if target is None:
            target = torch.empty(
                (len(dst_ids), *self.pool.shape[1:]), dtype=self.pool.dtype, device=self.pool.device
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed before every run arrived")
        self.group.recv([target], 0, _TAG).wait(datetime.timedelta(seconds=remaining))
        if not consecutive:
            index = torch.tensor(dst_ids, dtype=torch.long, device=self.pool.device)
            self.pool.index_copy_(0, index, target)

    def close(self) -> None:
        self.sock.close()
        abort = getattr(self.group, "abort", None)
        if abort is not None:
            try:
                abort()
            except Exception:  # noqa: BLE001 - best effort on a group that already failed
                log.debug("aborting a failed pair's group failed", exc_info=True)


class DeviceTransferClient:
    """Decode side of ``device``: one pair (group) per prefill endpoint, formed on the first pull."""

    def __init__(
        self, kv_pool: torch.Tensor, layout: KVLayout, ssl_context: secure.TlsContext | None = None
    ) -> None:
        check_pool(kv_pool, layout)
        self.layout = layout
        self.pool = kv_pool
        self.ssl_context = ssl_context
        dist_backend_for(kv_pool.device)
        self._pairs: dict[str, _Pair] = {}
        self._lock = threading.Lock()

    def pull(self, handle: KVHandle, dst_block_ids: list[int], timeout_s: float) -> None:
        """Receives every block of ``handle`` into ``dst_block_ids`` or raises ``TransferError``."""
        wire.check_preconditions(self.layout, handle, dst_block_ids, self.pool.shape[0])
        deadline = time.monotonic() + timeout_s
        pair: _Pair | None = None
        try:
            with wire.pull_errors(handle, timeout_s):
                try:
                    pair = self._pair(handle.transfer_endpoint, timeout_s)
                    with pair.lock:
                        pair.pull(handle, self.layout, list(dst_block_ids), deadline)
                except RuntimeError as exc:  # torch.distributed reports a lost peer or a timeout so
                    raise TransferError(
                        f"pull of {handle.handle_id} from {handle.transfer_endpoint} failed: {exc}"
                    ) from exc
        except Refused:
            raise  # the pair is still in step
        except TransferError:
            if pair is not None:
                self._drop(handle.transfer_endpoint, pair)
            raise

    def _pair(self, endpoint: str, timeout_s: float) -> _Pair:
        with self._lock:
            pair = self._pairs.get(endpoint)
            if pair is None:
                try:
                    pair = _Pair(endpoint, self.layout, self.pool, timeout_s, self.ssl_context)
                except RuntimeError as exc:  # the group could not form
                    raise TransferError(f"could not form a device group with {endpoint}: {exc}") from exc
                self._pairs[endpoint] = pair
            return pair

    def _drop(self, endpoint: str, pair: _Pair) -> None:
        with self._lock:
            if self._pairs.get(endpoint) is pair:
                del self._pairs[endpoint]
        pair.close()

    def close(self) -> None:
        """Closes every pair."""
        with self._lock:
            pairs, self._pairs = list(self._pairs.values()), {}
        for pair in pairs:
            pair.close()
