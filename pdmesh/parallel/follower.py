"""A follower rank: its shard of the model and its part of the KV pool, driven by the leader.

It joins the groups, builds the same engine as the leader (model shard, pool of the same number of
blocks, model runner; no scheduler of its own is used), starts a KV transfer server over its pool
and connects to the leader's control hub. Then, on one thread, it runs every step the leader sends
(its replica's inputs, or an idle step that only joins the MoE collectives); a reader thread applies
KV exposures at once and runs pulls beside the steps, answering each with an ack.

It exits when the leader says stop (status 0), and with status 1 when the leader is gone or
anything fails: a rank that cannot follow must not linger, its instance restarts as a whole.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pdmesh.config import WorkerConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.step import StepInputs
from pdmesh.kv.transfer import secure
from pdmesh.kv.transfer.base import make_transfer_server
from pdmesh.kv.transfer.errors import TransferError
from pdmesh.kv.transfer.sharded import RankHeads, ShardedPuller, plan_pull
from pdmesh.kv.types import KVHandle
from pdmesh.parallel import eplb_runtime
from pdmesh.parallel.control import ControlError, ControlLink
from pdmesh.parallel.executor import run_rank_step
from pdmesh.parallel.instance import CONTROL_KEY, InstancePlan, Joined, join

log = logging.getLogger(__name__)

PULL_THREADS = 4


class Follower:
    """One follower rank's engine, transfer server and control link."""

    def __init__(
        self,
        config: WorkerConfig,
        engine: LLMEngine,
        joined: Joined,
        link_address: tuple[str, int],
        token: str,
    ) -> None:
        self.config = config
        self.engine = engine
        self.joined = joined
        self.state = joined.state
        pool, layout = engine.kv_pool, engine.kv_layout
        port = config.transfer_port + self.state.rank if config.transfer_port else 0
        server_tls, client_tls = secure.worker_contexts(config)
        self.server = make_transfer_server(
            config.transfer_backend, pool, layout, config.host, port, server_tls
        )
        self.server.start()
        self.puller = ShardedPuller(config.transfer_backend, pool, layout, ssl_context=client_tls)
        first, count = self.state.layout.kv_heads(self.state.rank)
        self.heads = RankHeads(first, count, self.state.layout.dims.num_kv_heads)
        self.steps: queue.Queue[dict | None] = queue.Queue()
        self.pulls = ThreadPoolExecutor(PULL_THREADS, thread_name_prefix="kv-pull")
        hello = {
            "rank": self.state.rank,
            "token": token,
            "endpoint": self.server.endpoint,
            "num_blocks": int(pool.shape[0]),
            "pid": os.getpid(),
        }
        self.link = ControlLink(link_address, hello, config.dist_timeout_s)

    def read_forever(self) -> None:
        """The reader thread: steps to the stepping thread, exposures and pulls handled here."""
        try:
            while True:
                message = self.link.recv()
                op = message.get("op")
                if op in ("step", "stop", "rebalance"):
                    self.steps.put(message)
                    if op == "stop":
                        return
                elif op == "expose":
                    self.server.expose(message["handle_id"], message["block_ids"], message.get("secret", ""))
                    self.link.ack(message["id"])
                elif op == "withdraw":
                    self.server.withdraw(message["handle_id"])
                elif op == "pull":
                    self.pulls.submit(self._pull, message)
        except (ControlError, OSError) as exc:
            log.error("the leader is gone: %s", exc)
            self.steps.put(None)

    def _pull(self, message: dict) -> None:
        handle = KVHandle.from_dict(message["handle"])
        error = None
        try:
            steps = plan_pull(handle, self.engine.kv_layout, self.heads, self.state.tp_rank)
            self.puller.pull(handle, steps, message["dst"], message["timeout_s"])
        except TransferError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - the leader must hear of any failure
            log.exception("[%s] KV pull failed", handle.request_id)
            error = f"{type(exc).__name__}: {exc}"
        try:
            self.link.ack(message["id"], error)
        except OSError:
            pass  # the leader is gone; the reader thread ends the process

    def step_forever(self) -> int:
        """Runs the leader's steps in order until stop (0) or the leader is gone (1)."""
        while True:
            message = self.steps.get()
            if message is None:
                return 1
            if message["op"] == "stop":
                return 0
            if message["op"] == "rebalance":
                eplb_runtime.rebalance(self.engine.runner.model, self.state)
                continue
            plan = StepInputs.from_dict(message["plan"]) if message["plan"] is not None else None
            run_rank_step(self.engine.runner, self.state, plan, message["tokens"], message["rows"])

    def close(self) -> None:
        self.pulls.shutdown(wait=False, cancel_futures=True)
        self.server.stop()
        self.puller.close()
        self.link.close()
        if self.joined.local_ranks is not None:
            self.joined.local_ranks.stop()


def run(config: WorkerConfig, plan: InstancePlan, build_engine: Callable[[], LLMEngine]) -> int:
    """A follower's whole life; ``build_engine()`` makes the same engine as the leader's."""
    joined = join(config, plan)
    engine = build_engine()
    address, token = joined.store.get(CONTROL_KEY).decode().split(" ")
    host, _, port = address.rpartition(":")
    follower = Follower(config, engine, joined, (host, int(port)), token)
    if joined.local_ranks is not None:  # a host's first rank: a local rank that dies ends it too
        joined.local_ranks.on_exit = lambda rank, code: os._exit(1)
    reader = threading.Thread(target=follower.read_forever, name="control-reader", daemon=True)
    reader.start()
    log.info("rank %d follows the leader (KV transfer at %s)", plan.spec.rank, follower.server.endpoint)
    try:
        code = follower.step_forever()
    except Exception:  # noqa: BLE001 - out of step with the others: end, the group restarts
        log.exception("rank %d failed a step", plan.spec.rank)
        code = 1
    follower.close()
    return code
