"""``pdmesh profile`` against an engine with known costs on a fake clock, and its CLI errors."""

from __future__ import annotations

import json

import pytest

from pdmesh.generation import TokenOutput
from pdmesh.planner.model import LatencyModel
from tests.unit.test_planner import DECODE, PREFILL

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------ profile (fake engine)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class FakeEngine:
    """The engine's step API with known costs on a fake clock: one prefill step per batch, then decode."""

    def __init__(self, options: dict, clock: _Clock) -> None:
        self.options, self.clock = options, clock
        self.waiting: list = []
        self.running: dict[str, list] = {}  # id -> [context, tokens left, mode]
        self.freed: list[list[int]] = []
        self.next_block = 0

    def add_request(self, request) -> None:
        assert len(self.waiting) + len(self.running) < self.options["max_num_seqs"]
        self.waiting.append(request)

    def free_kv(self, block_ids: list[int]) -> None:
        self.freed.append(block_ids)

    def step(self) -> list:
        from pdmesh.generation import RequestMode

        if self.waiting:
            batch, self.waiting = self.waiting, []
            lens = [len(r.prompt_ids) for r in batch]
            a, b, c = PREFILL
            self.clock.now += a + b * sum(lens) + c * sum(n * n for n in lens)
            outputs = []
            for r in batch:
                left = r.sampling.max_tokens - 1
                if r.mode == RequestMode.PREFILL:
                    self.next_block += 1
                    outputs.append(
                        TokenOutput(r.request_id, [5], finished=True, kv_block_ids=[self.next_block])
                    )
                    continue
                outputs.append(TokenOutput(r.request_id, [5], finished=left == 0))
                if left:
                    self.running[r.request_id] = [len(r.prompt_ids) + 1, left]
            return outputs
        if not self.running:
            return []
        al, be, ga = DECODE
        self.clock.now += al + be * len(self.running) + ga * sum(ctx for ctx, _ in self.running.values())
        outputs = []
        for rid, state in list(self.running.items()):
            state[0] += 1
            state[1] -= 1
            outputs.append(TokenOutput(rid, [5], finished=state[1] == 0))
            if state[1] == 0:
                del self.running[rid]
        return outputs


def test_run_profile_measures_a_fake_engine(tmp_path, monkeypatch):
    from pdmesh.planner import measure as measure_mod
    from pdmesh.planner import profile as profile_mod
    from pdmesh.planner.profile_file import validate_profile

    (tmp_path / "config.json").write_text(
        json.dumps({"vocab_size": 100, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4})
    )
    clock = _Clock()
    monkeypatch.setattr(measure_mod, "time", clock)
    engines: list[FakeEngine] = []

    def factory(options):
        engines.append(FakeEngine(options, clock))
        return engines[-1]

    result = profile_mod.run_profile(
        tmp_path,
        prompt_lens=(16, 64, 256),
        batch_sizes=(1, 4),
        decode_batch_sizes=(1, 4, 16),
        context_lens=(32, 128),
        decode_steps=4,
        engine_factory=factory,
    )
    assert validate_profile(result) is result
    assert len(result["prefill"]) == 6 and len(result["decode"]) == 6
    assert engines[0].freed and not engines[0].running and not engines[0].waiting
    meta = result["metadata"]
    assert meta["max_num_seqs"] >= 16 and meta["dtype"] == "float32" and meta["device"] == "cpu"
    model = LatencyModel.from_dict(result["fit"])
    assert model.prefill.coef == pytest.approx(list(PREFILL), rel=1e-6)
    assert (model.decode.alpha, model.decode.beta, model.decode.gamma) == pytest.approx(DECODE, rel=1e-6)


def test_profile_cli_rejects_a_bad_model_dir(tmp_path, capsys):
    from pdmesh.planner.profile import main_profile

    assert main_profile(["--model", str(tmp_path), "--out", str(tmp_path / "p.json")]) == 2
    assert (
        main_profile(["--model", str(tmp_path), "--out", str(tmp_path / "p.json"), "--batch-sizes", "x"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("pdmesh profile: error:") for line in err)
