"""How the ranks of an instance start and find each other.

Where a rank learns its place, first found wins:

1. one process per rank: ``--rank`` (``PDMESH_WORKER_RANK``) or torchrun's ``RANK`` (with
   ``WORLD_SIZE``, ``LOCAL_RANK``), the leader at ``MASTER_ADDR:MASTER_PORT`` (or the flags);
2. one process per host, which starts the host's other ranks: LeaderWorkerSet's ``LWS_GROUP_SIZE``
   hosts (pods), this one ``LWS_WORKER_INDEX``, the leader pod at ``LWS_LEADER_ADDRESS``
   (``--nnodes/--node-rank/--master-addr`` do the same by hand); rank = host index x ranks per host;
3. one host: this process is rank 0 and starts ranks 1 .. world-1 itself (``pdmesh up``, tests).

Ranks started here are children that die with their parent (``PR_SET_PDEATHSIG``) and learn their
rank and every worker setting from the environment. The rendezvous is a ``TCPStore`` held by rank
0 (on one host it takes a free port before starting the others); over it ``torch.distributed``
forms the process groups (``init_groups``), every one bounded by ``dist_timeout_s``.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pdmesh.accelerator import dist_backend, set_current_device
from pdmesh.config import WorkerConfig
from pdmesh.parallel.layout import ParallelLayout
from pdmesh.parallel.state import MoeDispatch, ParallelState, install

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500  # across hosts, where no free port can be agreed on
POLL_S = 0.2
STOP_WAIT_S = 5.0


@dataclass(frozen=True)
class RankSpec:
    """This process's rank and how to reach rank 0; ``spawn``: the ranks it starts on its host."""

    world: int
    rank: int
    local_rank: int
    master_addr: str
    master_port: int  # 0: rank 0 takes a free port (it starts every other rank itself)
    spawn: tuple[int, ...] = ()


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def rank_spec(config: WorkerConfig, environ: Mapping[str, str] | None = None) -> RankSpec:
    """Where this process sits in its instance (ValueError naming what does not fit)."""
    env = os.environ if environ is None else environ
    world = config.world_size
    addr = config.master_addr or env.get("MASTER_ADDR") or env.get("LWS_LEADER_ADDRESS")
    port = config.master_port or _int(env, "MASTER_PORT")
    explicit = config.rank if config.rank is not None else _int(env, "RANK")
    if world == 1:
        return RankSpec(1, 0, 0, "127.0.0.1", 0)
    if explicit is not None:
        size = _int(env, "WORLD_SIZE")
        if size is not None and size != world:
            raise ValueError(f"WORLD_SIZE={size} but tp x dp = {config.tp} x {config.dp} = {world}")
        if not 0 <= explicit < world:
            raise ValueError(f"rank {explicit} is outside the instance's {world} ranks (tp x dp)")
        if not addr or not port:
            raise ValueError(
                "a rank given explicitly needs rank 0's address and port "
                "(--master-addr/--master-port or MASTER_ADDR/MASTER_PORT)"
            )
        local = _int(env, "LOCAL_RANK")
        return RankSpec(world, explicit, explicit if local is None else local, addr, port)
    nnodes = config.nnodes or _int(env, "LWS_GROUP_SIZE") or 1
    node = config.node_rank if config.node_rank is not None else (_int(env, "LWS_WORKER_INDEX") or 0)
    if world % nnodes or not 0 <= node < nnodes:
        raise ValueError(f"{world} ranks on {nnodes} hosts, this one host {node}: they do not fit")
    per_host = world // nnodes
    first = node * per_host
    if nnodes > 1 and not addr:
        raise ValueError(
            "an instance across hosts needs rank 0's address (--master-addr or LWS_LEADER_ADDRESS)"
        )
    port = port or (0 if nnodes == 1 else DEFAULT_PORT)
    return RankSpec(world, first, 0, addr or "127.0.0.1", port, tuple(range(first + 1, first + per_host)))


def make_store(spec: RankSpec, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store: held by rank 0 (a free port when ``spec.master_port`` is 0)."""
    return dist.TCPStore(
        spec.master_addr,
        spec.master_port,
        spec.world,
        is_master=spec.rank == 0,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def init_groups(
    spec: RankSpec,
    store: dist.Store,
    layout: ParallelLayout,
    device: str,
    dispatch: MoeDispatch,
    timeout_s: float,
) -> ParallelState:
    """Joins the instance's process groups (every rank calls this, in the same order) and installs
    this rank's ``ParallelState``."""
    backend = dist_backend(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    set_current_device(torch.device(device))  # nccl/hccl bind each rank to its device
    dist.init_process_group(backend, store=store, rank=spec.rank, world_size=spec.world, timeout=timeout)
    state = ParallelState(layout, spec.rank, dispatch, world_group=dist.group.WORLD)
    place = state.place
    for d, ranks in enumerate(layout.tp_groups):
        group = dist.new_group(list(ranks), timeout=timeout, backend=backend) if len(ranks) > 1 else None
        if d == place.dp_rank:
            state.tp_group = group
    for t, ranks in enumerate(layout.dp_groups):
        group = dist.new_group(list(ranks), timeout=timeout, backend=backend) if len(ranks) > 1 else None
        if t == place.tp_rank:
            state.dp_group = group
    install(state)
    log.info(
        "rank %d of %d: tp rank %d of %d, dp rank %d of %d, ep rank %d of %d (%s, %s)",
        spec.rank, spec.world, place.tp_rank, layout.tp, place.dp_rank, layout.dp,
        place.ep_rank, layout.moe_ep, backend, dispatch,
    )  # fmt: skip
    return state


def config_env(config: WorkerConfig) -> dict[str, str]:
    """Every set field of ``config`` as its ``PDMESH_WORKER_*`` variable."""
    env = {}
    for name, value in config.model_dump().items():
        if value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        env[f"PDMESH_WORKER_{name.upper()}"] = text
    return env


def host_threads(ranks: int) -> int:
    """Math threads per rank when ``ranks`` share this host's cores (OMP_NUM_THREADS wins)."""
    given = os.environ.get("OMP_NUM_THREADS")
    return int(given) if given and given.isdigit() else max(1, (os.cpu_count() or 1) // ranks)


def _die_with_parent() -> None:
    """In a child before exec: SIGKILL when the parent dies (Linux), so no rank outlives its leader."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LocalRanks:
    """The ranks this process started on its host; ``on_exit(rank, code)`` when one ends."""

    def __init__(self, config: WorkerConfig, spec: RankSpec, master_port: int) -> None:
        self.procs: dict[int, subprocess.Popen] = {}
        self.on_exit: Callable[[int, int], None] | None = None
        self._stopping = threading.Event()
        base = {**os.environ, **config_env(config)}
        threads = host_threads(len(spec.spawn) + 1)
        for rank in spec.spawn:
            env = {
                **base,
                "PDMESH_WORKER_RANK": str(rank),
                "PDMESH_WORKER_MASTER_ADDR": spec.master_addr,
                "PDMESH_WORKER_MASTER_PORT": str(master_port),
                "LOCAL_RANK": str(rank - spec.rank),
            }
            env["OMP_NUM_THREADS"] = str(threads)
            for name in ("RANK", "WORLD_SIZE", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX"):
                env.pop(name, None)
            self.procs[rank] = subprocess.Popen(
                [sys.executable, "-m", "pdmesh.parallel.rank_main"], env=env, preexec_fn=_die_with_parent
            )
            log.info("started rank %d (pid %d)", rank, self.procs[rank].pid)
        torch.set_num_threads(threads)  # this rank shares the host's cores with them too
        self._watcher = threading.Thread(target=self._watch, name="local-ranks", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(POLL_S):
            for rank, proc in list(self.procs.items()):
                code = proc.poll()
                if code is not None and not self._stopping.is_set():
                    log.error("rank %d (pid %d) exited with code %s", rank, proc.pid, code)
                    self.procs.pop(rank)
                    if self.on_exit is not None:
                        self.on_exit(rank, code)

    def stop(self) -> None:
        """SIGTERM to every rank, a bounded wait, then SIGKILL."""
        self._stopping.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_WAIT_S)
