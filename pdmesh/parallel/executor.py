"""One engine step on every rank of a parallel instance.

The leader's engine schedules each dp replica and prepares its ``StepInputs``; ``GroupExecutor``
sends every follower its replica's inputs (with every replica's token and logit-row counts) over
the control channel, runs replica 0's part itself, and collects the logits. Every rank runs
``run_rank_step``: its replica's step (or, idle, ``join_idle``: the MoE collectives with an empty
batch), then one gather of each rank's logits (its slice of the vocabulary, padded to the step's
most rows) to the leader, who assembles each replica's full-vocabulary logits.

A failure on any rank leaves the ranks out of step, so the executor marks the instance broken
(``GroupBroken``) and refuses every later step; the worker then takes the instance out of service
and its supervisor restarts the whole group.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

import torch

from pdmesh.engine.model_runner import ModelRunner
from pdmesh.engine.step import StepInputs
from pdmesh.parallel import comm, eplb_runtime
from pdmesh.parallel.control import ControlError, ControlHub
from pdmesh.parallel.state import ParallelState, step_context

log = logging.getLogger(__name__)


class GroupBroken(RuntimeError):
    """A rank of the instance failed or is gone; the instance cannot run another step."""


def run_rank_step(
    runner: ModelRunner, state: ParallelState, plan: StepInputs | None, tokens: list[int], rows: list[int]
) -> list[torch.Tensor] | None:
    """This rank's part of a step; on the leader every rank's logits (in rank order), else None."""
    with step_context(tokens):
        if plan is None:
            runner.model.join_idle()
            local = None
        else:
            local = runner.execute(plan)
    eplb_runtime.end_step(runner.model, state)
    if not any(rows):
        return None
    vocab = runner.model.config.vocab_size
    width = -(-vocab // state.tp)
    padded = torch.zeros((max(rows), width), dtype=torch.float32, device=runner.device)
    if local is not None:
        padded[: local.shape[0], : local.shape[1]] = local
    return comm.gather_to_leader(padded)


class GroupExecutor:
    """The leader's side of every step (``LLMEngine.executor``)."""

    def __init__(self, hub: ControlHub, state: ParallelState) -> None:
        self.hub = hub
        self.state = state
        self.runner: ModelRunner | None = None  # the leader's, set once its engine is built
        self.broken: str | None = None
        self.on_broken: Callable[[str], None] | None = None
        # hears the seconds this rank spent in collectives during each step (the worker's metrics)
        self.on_collectives: Callable[[float], None] | None = None
        self.eplb_interval = 0  # steps between two EPLB rebalances (0: only on demand)
        self._steps = 0
        self._lock = threading.Lock()
        # a step and a rebalance never overlap: both send to the followers in the order they run
        self._step_lock = threading.Lock()
        hub.on_lost = lambda rank, why: self.mark_broken(why)

    def mark_broken(self, why: str) -> None:
        """The instance cannot step any more; tells the worker once."""
        with self._lock:
            if self.broken is not None:
                return
            self.broken = why
        log.error("the instance is broken: %s", why)
        if self.on_broken is not None:
            self.on_broken(why)

    def run_step(self, plans: list[StepInputs | None]) -> list[torch.Tensor | None]:
        """Runs every replica's inputs on its ranks; each replica's logits (None where none asked)."""
        with self._step_lock:
            out = self._run_step(plans)
            self._steps += 1
            if self.eplb_interval and self._steps % self.eplb_interval == 0:
                self._rebalance()  # between two steps: the requests in flight continue after it
        return out

    def _run_step(self, plans: list[StepInputs | None]) -> list[torch.Tensor | None]:
        if self.broken is not None:
            raise GroupBroken(self.broken)
        tokens = [p.num_tokens if p is not None else 0 for p in plans]
        rows = [p.num_logit_rows if p is not None else 0 for p in plans]
        comm_before = self.state.comm_s
        try:
            self._send(plans, tokens, rows)
            parts = run_rank_step(self.runner, self.state, plans[0], tokens, rows)
        except (ControlError, RuntimeError, ValueError) as exc:
            self.mark_broken(f"step failed: {type(exc).__name__}: {exc}")
            raise GroupBroken(self.broken) from exc
        if self.on_collectives is not None:
            self.on_collectives(self.state.comm_s - comm_before)
        return self._assemble(parts, rows)

    def rebalance(self) -> dict:
        """Rebalances the routed experts on every rank between two steps; the imbalance before and
        after. Safe from any thread: it waits for a running step to end, and the next step waits
        for it (``pdmesh ctl experts --rebalance`` calls it from the worker's RPC thread)."""
        with self._step_lock:
            return self._rebalance()

    def _rebalance(self) -> dict:
        if self.broken is not None:
            raise GroupBroken(self.broken)
        try:
            for rank in range(1, self.state.layout.world):
                self.hub.send(rank, {"op": "rebalance"})
            return eplb_runtime.rebalance(self.runner.model, self.state)
        except (ControlError, RuntimeError, ValueError) as exc:
            self.mark_broken(f"rebalance failed: {type(exc).__name__}: {exc}")
            raise GroupBroken(self.broken) from exc

    def _send(self, plans: list[StepInputs | None], tokens: list[int], rows: list[int]) -> None:
        encoded = [
            json.dumps(
                {
                    "op": "step",
                    "plan": p.to_dict() if p is not None else None,
                    "tokens": tokens,
                    "rows": rows,
                },
                separators=(",", ":"),
            ).encode()
            for p in plans
        ]
        layout = self.state.layout
        for rank in range(1, layout.world):
            self.hub.send(rank, encoded[layout.place(rank).dp_rank])

    def _assemble(self, parts: list[torch.Tensor] | None, rows: list[int]) -> list[torch.Tensor | None]:
        vocab = self.runner.model.config.vocab_size
        out: list[torch.Tensor | None] = []
        for d, count in enumerate(rows):
            if not count:
                out.append(None)
                continue
            shards = [parts[r][:count] for r in self.state.layout.tp_groups[d]]
            out.append(torch.cat(shards, dim=1)[:, :vocab])
        return out

    def close(self) -> None:
        self.hub.close()
