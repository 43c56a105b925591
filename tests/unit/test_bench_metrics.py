"""pdmesh.bench: metric aggregation, SLO/goodput math, dataset loaders and the reports (no server)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pdmesh.bench.datasets import (
    SampleRequest,
    estimate_tokens,
    load_dataset,
    load_gsm8k,
    load_random,
    load_sharegpt,
    load_tokenizer,
)
from pdmesh.bench.metrics import (
    RequestOutput,
    compute_metrics,
    latency_stats,
    meets_slos,
    parse_goodput,
    throughput_timeline,
)
from pdmesh.bench.report import format_table, result_to_dict, write_json, write_plot
from pdmesh.bench.serve import (
    BenchConfig,
    BenchResult,
    arrival_times,
    build_parser,
    build_payload,
    config_from_args,
)

pytestmark = pytest.mark.timeout(60)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "你好，世界。机器学习很有趣。",
    "emoji 🎉🚀 café naïve",
    "def f(x):\n    return x * 2\n",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE tokenizer with special tokens, saved as <dir>/tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    out = tmp_path_factory.mktemp("tok")
    tok.save(str(out / "tokenizer.json"))
    return out


def ok(ttft: float, itl: list[float], tokens: int, prompt: int = 10, start: float = 0.0) -> RequestOutput:
    """A successful request whose chunks are ``ttft`` then ``itl`` apart; latency is their sum."""
    return RequestOutput(
        success=True,
        prompt_len=prompt,
        output_tokens=tokens,
        ttft=ttft,
        itl=list(itl),
        latency=ttft + sum(itl),
        start_time=start,
    )


def failed(status: int | None, message: str) -> RequestOutput:
    return RequestOutput(success=False, prompt_len=7, status=status, error=message)


# -- metrics ----------------------------------------------------------------------------------------


def test_parse_goodput_accepts_the_three_slos():
    assert parse_goodput(["ttft:500", "tpot:50.5", "E2EL:2000"]) == {
        "ttft": 500.0,
        "tpot": 50.5,
        "e2el": 2000.0,
    }
    assert parse_goodput(None) == {}
    assert parse_goodput([]) == {}


@pytest.mark.parametrize("item", ["ttft", "ttft=5", "foo:5", "ttft:abc", "ttft:0", "tpot:-1", "e2el:inf"])
def test_parse_goodput_rejects_bad_items(item):
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput([item])


def test_latency_stats_are_in_ms_and_zero_when_empty():
    assert latency_stats([]) == {"mean": 0.0, "median": 0.0, "std": 0.0, "p90": 0.0, "p99": 0.0}
    values = [0.001 * i for i in range(1, 101)]  # 1..100 ms
    stats = latency_stats(values)
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["median"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)


def test_tpot_excludes_the_first_token_and_needs_two_tokens():
    out = ok(0.1, [0.02, 0.03, 0.05], tokens=5)
    assert out.tpot == pytest.approx((0.2 - 0.1) / 4)
    assert ok(0.1, [], tokens=1).tpot is None
    assert failed(500, "x").tpot is None


def test_compute_metrics_aggregates_successes_only():
    outputs = [
        ok(0.100, [0.010, 0.010, 0.010], tokens=4, prompt=16, start=0.0),
        ok(0.200, [0.020, 0.040], tokens=3, prompt=16, start=0.5),
        ok(0.300, [], tokens=1, prompt=8, start=1.0),
        failed(503, "no healthy instances"),
        failed(None, "timed out after 5 s"),
    ]
    m = compute_metrics(outputs, duration_s=2.0)
    assert (m.completed, m.failed) == (3, 2)
    assert m.total_input_tokens == 40
    assert m.total_output_tokens == 8
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.0)
    assert m.input_throughput == pytest.approx(20.0)
    assert m.total_token_throughput == pytest.approx(24.0)
    assert m.request_goodput is None and m.good_completed is None
    assert m.mean_ttft_ms == pytest.approx(200.0)
    assert m.median_ttft_ms == pytest.approx(200.0)
    assert m.p99_ttft_ms == pytest.approx(np.percentile([100, 200, 300], 99))
    # TPOT: (0.13-0.1)/3 = 10 ms and (0.26-0.2)/2 = 30 ms; the 1-token request has none
    assert m.mean_tpot_ms == pytest.approx(20.0)
    assert m.median_tpot_ms == pytest.approx(20.0)
    # ITL pools every gap: 10, 10, 10, 20, 40 ms
    assert m.mean_itl_ms == pytest.approx(18.0)
    assert m.median_itl_ms == pytest.approx(10.0)
    assert m.p90_itl_ms == pytest.approx(np.percentile([10, 10, 10, 20, 40], 90))
    assert m.mean_e2el_ms == pytest.approx((130 + 260 + 300) / 3)
    assert m.errors == [
        {"status": 503, "message": "no healthy instances"},
        {"status": None, "message": "timed out after 5 s"},
    ]


def test_goodput_counts_requests_meeting_every_slo():
    outputs = [
        ok(0.100, [0.010, 0.010], tokens=3),  # ttft 100, tpot 10, e2el 120
        ok(0.400, [0.010, 0.010], tokens=3),  # ttft too slow
        ok(0.100, [0.100, 0.100], tokens=3),  # tpot 100 too slow
        ok(0.050, [], tokens=1),  # one token: tpot counts as 0
        failed(500, "boom"),
    ]
    slos = parse_goodput(["ttft:200", "tpot:50"])
    m = compute_metrics(outputs, duration_s=4.0, slos=slos)
    assert m.good_completed == 2
    assert m.request_goodput == pytest.approx(0.5)
    m = compute_metrics(outputs, duration_s=4.0, slos={"e2el": 150.0})
    assert m.good_completed == 2  # 120 ms and 50 ms
    assert not meets_slos(failed(500, "x"), {"ttft": 1e9})
    assert meets_slos(ok(0.1, [0.01], tokens=2), {})


def test_metrics_of_an_all_failed_or_empty_run_are_zero():
    m = compute_metrics([failed(500, "a"), failed(502, "b")], duration_s=1.0, slos={"ttft": 10.0})
    assert (m.completed, m.failed, m.good_completed) == (0, 2, 0)
    assert m.mean_ttft_ms == 0.0 and m.p99_e2el_ms == 0.0 and m.output_throughput == 0.0
    m = compute_metrics([], duration_s=0.0)
    assert m.request_throughput == 0.0 and not math.isnan(m.output_throughput)


def test_throughput_timeline_spreads_usage_tokens_over_chunks():
    outputs = [
        ok(0.5, [0.2, 0.2, 0.2], tokens=8, start=0.0),  # chunks at 0.5, 0.7, 0.9, 1.1: 2 tokens each
        ok(0.1, [1.0], tokens=2, start=1.5),  # chunks at 1.6, 2.6
        failed(500, "x"),
    ]
    assert throughput_timeline(outputs) == pytest.approx([6.0, 3.0, 1.0])
    assert throughput_timeline(outputs, bin_s=2.0) == pytest.approx([4.5, 0.5])
    assert throughput_timeline([failed(500, "x")]) == []
    assert compute_metrics(outputs, 3.0).peak_output_throughput == pytest.approx(6.0)


# -- datasets ---------------------------------------------------------------------------------------


def test_random_prompts_without_tokenizer_are_words():
    samples = load_random(5, 12, 7, None, seed=1)
    assert len(samples) == 5
    assert all(
        len(s.prompt.split()) == 12 and s.prompt_len == 12 and s.expected_output_len == 7 for s in samples
    )
    assert load_random(5, 12, 7, None, seed=1) == samples
    assert load_random(5, 12, 7, None, seed=2) != samples


def test_random_prompts_with_tokenizer_have_exact_lengths(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    samples = load_random(20, 16, 8, tok, seed=0)
    special = set(SPECIAL_TOKENS)
    for s in samples:
        ids = tok.encode(s.prompt, add_special_tokens=False).ids
        assert len(ids) == 16 == s.prompt_len
        assert not special & {tok.id_to_token(i) for i in ids}
    assert len({s.prompt for s in samples}) == 20


def test_load_tokenizer_takes_a_directory_or_the_file(tokenizer_dir, tmp_path):
    assert load_tokenizer(None) is None
    assert load_tokenizer(tokenizer_dir / "tokenizer.json").get_vocab_size() > 0
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)


def write_sharegpt(path: Path) -> Path:
    long_text = "word " * 40
    data = [
        {"conversations": [{"from": "human", "value": long_text}, {"from": "gpt", "value": long_text * 2}]},
        {
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": long_text}]
        },  # too short
        {"conversations": [{"from": "human", "value": long_text}]},  # no reply
        {
            "conversations": [
                {"from": "system", "value": "x"},
                {"from": "human", "value": long_text + "?"},
                {"from": "gpt", "value": "a fine answer here"},
            ]
        },
        {"id": "no conversations"},
    ]
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_takes_first_human_turn_and_reply_length(tmp_path):
    path = write_sharegpt(tmp_path / "sharegpt.json")
    samples = load_sharegpt(path, 2, None, seed=0)
    assert sorted(s.prompt for s in samples) == sorted(["word " * 40, "word " * 40 + "?"])
    lens = {s.prompt: s.expected_output_len for s in samples}
    assert lens["word " * 40] == estimate_tokens("word " * 80) == 100
    assert lens["word " * 40 + "?"] == estimate_tokens("a fine answer here")


def test_sharegpt_output_len_override_and_reuse(tmp_path, caplog):
    path = write_sharegpt(tmp_path / "sharegpt.json")
    samples = load_dataset("sharegpt", 7, path=path, output_len=5, seed=3)
    assert len(samples) == 7
    assert {s.expected_output_len for s in samples} == {5}
    assert "hi" in {s.prompt for s in samples}  # the override keeps short pairs, as vLLM does
    assert "reusing entries" in caplog.text


def test_sharegpt_with_tokenizer_counts_tokens(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    path = write_sharegpt(tmp_path / "sharegpt.json")
    for s in load_sharegpt(path, 2, tok, seed=0):
        assert s.prompt_len == len(tok.encode(s.prompt, add_special_tokens=False).ids)


def test_gsm8k_uses_question_and_answer_length(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    rows = [
        {
            "question": "Natalia sold clips to 48 friends?",
            "answer": "She sold 48/2 = <<48/2=24>>24.\n#### 72",
        },
        {"question": "Weng earns $12 an hour?", "answer": "#### 10"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    samples = load_gsm8k(path, 2, None, seed=0)
    assert {s.prompt for s in samples} == {r["question"] for r in rows}
    by_prompt = {s.prompt: s for s in samples}
    for r in rows:
        assert by_prompt[r["question"]].expected_output_len == estimate_tokens(r["answer"])
        assert by_prompt[r["question"]].prompt_len == estimate_tokens(r["question"])
    assert [s.expected_output_len for s in load_gsm8k(path, 3, None, output_len=9)] == [9, 9, 9]


def test_gsm8k_reports_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_gsm8k(path, 1, None)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="dataset-path"):
        load_dataset("sharegpt", 3)
    with pytest.raises(FileNotFoundError):
        load_dataset("gsm8k", 3, path=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("alpaca", 3)
    with pytest.raises(ValueError, match="num-prompts"):
        load_dataset("random", 0)
    assert [s.expected_output_len for s in load_dataset("random", 2, input_len=4)] == [128, 128]


# -- load shape, payloads, CLI ----------------------------------------------------------------------


def test_arrival_times_are_poisson_or_all_at_once():
    assert arrival_times(4, math.inf, 0).tolist() == [0.0, 0.0, 0.0, 0.0]
    times = arrival_times(2000, 10.0, seed=0)
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    assert np.mean(np.diff(times)) == pytest.approx(0.1, rel=0.1)
    assert np.array_equal(times, arrival_times(2000, 10.0, seed=0))


def test_payloads_stream_with_usage():
    sample = SampleRequest("hello there", 2, 8)
    body = build_payload(BenchConfig(ignore_eos=True), "m", sample)
    assert body == {
        "model": "m",
        "max_tokens": 8,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "prompt": "hello there",
        "ignore_eos": True,
    }
    chat = build_payload(BenchConfig(endpoint="/v1/chat/completions"), "m", sample)
    assert chat["messages"] == [{"role": "user", "content": "hello there"}]
    assert "prompt" not in chat and "ignore_eos" not in chat


def test_cli_flags_map_to_the_config():
    args = build_parser().parse_args(
        ["--base-url", "http://h:1", "--request-rate", "inf", "--max-concurrency", "4", "--goodput", "ttft:100",
         "tpot:20", "--random-input-len", "16", "--output-len", "8", "--ignore-eos", "--timeout", "30"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.request_rate == math.inf and config.max_concurrency == 4
    assert config.goodput == {"ttft": 100.0, "tpot": 20.0}
    assert (config.input_len, config.output_len, config.ignore_eos, config.timeout_s) == (16, 8, True, 30.0)
    with pytest.raises(ValueError):
        BenchConfig(request_rate=0).validate()
    with pytest.raises(ValueError):
        BenchConfig(endpoint="/v1/embeddings").validate()


# -- reports ----------------------------------------------------------------------------------------


def make_result(outputs: list[RequestOutput], slos: dict[str, float] | None = None) -> BenchResult:
    config = BenchConfig(num_prompts=len(outputs), max_concurrency=4, goodput=slos or {})
    metrics = compute_metrics(outputs, 2.0, config.goodput)
    return BenchResult(config, "tiny", metrics, outputs, "2026-01-01T00:00:00+00:00")


def test_table_json_and_plot(tmp_path):
    outputs = [ok(0.1 + 0.01 * i, [0.02] * 7, tokens=8, start=0.1 * i) for i in range(6)]
    outputs.append(failed(500, "internal error"))
    result = make_result(outputs, {"ttft": 130.0})
    table = format_table(result)
    for label in ("Successful requests:", "Failed requests:", "Benchmark duration (s):", "Total input tokens:",
                  "Total generated tokens:", "Request throughput (req/s):", "Request goodput (req/s)",
                  "Output token throughput (tok/s):", "Total token throughput (tok/s):", "Mean TTFT (ms):",
                  "Median TPOT (ms):", "P90 ITL (ms):", "P99 E2EL (ms):", "internal error"):  # fmt: skip
        assert label in table, label
    data = json.loads(write_json(result, tmp_path / "out" / "r.json").read_text())
    assert data["completed"] == 6 and data["failed"] == 1
    assert data["errors"] == [{"status": 500, "message": "internal error"}]
    assert data["good_completed"] == 4  # ttft 100..130 ms
    assert data["request_goodput"] == pytest.approx(2.0)
    assert data["request_rate"] == "inf" and data["model"] == "tiny" and data["max_concurrency"] == 4
    assert "api_key" not in data
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p90", "p99"):
            assert isinstance(data[f"{stat}_{name}_ms"], float)
    assert data["per_request"]["output_lens"] == [8] * 6
    assert result.to_dict() == data == result_to_dict(result)
    png = write_plot(result, tmp_path / "plots" / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_of_an_all_failed_run(tmp_path):
    result = make_result([failed(None, "connection refused")])
    assert "Request goodput" not in format_table(result)
    assert write_plot(result, tmp_path / "r.png").stat().st_size > 0
