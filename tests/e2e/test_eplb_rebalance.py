"""``pdmesh ctl experts --rebalance`` on a running stack (real processes, gloo, real Redis).

The decode instance runs Qwen3-MoE over two ranks (dp 2, moe_ep 2) with two redundant experts;
requests run without pause while the CLI asks its leader to rebalance: every request answers, with
the text one single-process engine gives, before, during and after the experts move. The prefill
instance runs on one rank: a rebalance there is refused (FAILED_PRECONDITION) with the reason.
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import start_stack
from tests.e2e.helpers import list_instances, wait_blocks_idle
from tests.e2e.test_control_plane import ctl
from tests.e2e.test_kv_plane import PROMPT_IDS
from tests.e2e.test_parallel import OTHER_PROMPT, _engine_text, text_of

pytestmark = pytest.mark.timeout(300)

MAX_TOKENS = 24
CLIENTS = 3


def _address(stack, instance_id: str) -> str:
    return next(i.address for i in list_instances(stack.controller_address) if i.instance_id == instance_id)


def test_rebalance_on_demand_while_requests_run(model_factory, tmp_path_factory) -> None:
    model = model_factory("qwen3_moe", "tiny")
    decode_args = {"dp": "2", "moe-ep": "2", "num-redundant-experts": "2"}
    stack = start_stack(model, tmp_path_factory, role_args={"decode": decode_args})
    try:
        prompts = [PROMPT_IDS, OTHER_PROMPT, PROMPT_IDS[:9], OTHER_PROMPT[:5]]
        expected = {tuple(p): _engine_text(model, p, MAX_TOKENS) for p in prompts}
        for p in prompts:  # before: and the window holds these requests' expert loads
            assert text_of(stack, p, MAX_TOKENS) == expected[tuple(p)]

        rebalanced = threading.Event()

        def client(offset: int) -> list[bool]:
            """Requests one after another until the rebalance is done, then one more."""
            matches, i = [], offset
            while not rebalanced.is_set():
                p = prompts[i % len(prompts)]
                matches.append(text_of(stack, p, MAX_TOKENS) == expected[tuple(p)])
                i += 1
            p = prompts[i % len(prompts)]
            return [*matches, text_of(stack, p, MAX_TOKENS) == expected[tuple(p)]]

        with ThreadPoolExecutor(CLIENTS) as pool:
            clients = [pool.submit(client, k) for k in range(CLIENTS)]
            try:
                metrics = stack.metrics_address("decode-0")
                done = ctl(stack, "experts", "--rebalance", _address(stack, "decode-0"), metrics)
            finally:
                rebalanced.set()
            results = [c.result() for c in clients]
        assert done.returncode == 0, done.stderr
        before, after = map(float, re.search(r"imbalance ([\d.]+) -> ([\d.]+)", done.stdout).groups())
        assert after <= before
        assert "layer 1: imbalance" in done.stdout  # and the loads, read from the metrics
        assert "experts rebalanced on request" in stack.log_tail("decode-0", 400)
        assert all(all(r) for r in results), results  # every request, during and after
        for p in prompts:
            assert text_of(stack, p, MAX_TOKENS) == expected[tuple(p)]

        refused = ctl(stack, "experts", "--rebalance", _address(stack, "prefill-0"))
        assert refused.returncode == 1
        assert "FAILED_PRECONDITION" in refused.stderr and "moe_ep 1" in refused.stderr, refused.stderr
        wait_blocks_idle(stack.controller_address)
    finally:
        stack.stop()
