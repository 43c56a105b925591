"""Structured outputs in the engine: every family's random checkpoint, whose weights know nothing of
JSON, produces text that follows its constraint (the mask does all the work), greedy and sampled, in
one batch with unconstrained requests; a PREFILL -> DECODE hand-over and a resumed request continue
the matcher; bad constraints are refused with words that name the fault."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import FinishReason, RequestMode, SamplingParams, StructuredOutput
from pdmesh.modelgen import ARCH_WRITERS
from pdmesh.structured import check
from pdmesh.tokenizer import Tokenizer
from tests.structured_cases import SCHEMA

pytestmark = pytest.mark.timeout(120)

REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe so"]
GRAMMAR = 'root ::= "(" [0-9] [0-9]? ("+" [0-9] [0-9]?)? ")"'  # GBNF, as vLLM's guided_grammar takes
GRAMMAR_TEXT = re.compile(r"\([0-9]{1,2}(\+[0-9]{1,2})?\)")
MAX_TOKENS = 80


def constrained(
    kind: str, spec: str, temperature: float = 0.0, seed: int | None = None, **kw
) -> SamplingParams:
    structured = StructuredOutput(kind, spec)
    return SamplingParams(
        temperature=temperature, seed=seed, max_tokens=MAX_TOKENS, structured=structured, **kw
    )


def run(engine: LLMEngine, requests: dict[str, EngineRequest]) -> dict[str, tuple[list[int], FinishReason]]:
    for request in requests.values():
        engine.add_request(request)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    reasons: dict[str, FinishReason] = {}
    for _ in range(10 * MAX_TOKENS):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    assert set(reasons) == set(requests)
    return {rid: (tokens[rid], reasons[rid]) for rid in requests}


def assert_follows(kind: str, text: str) -> None:
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES
    else:
        assert GRAMMAR_TEXT.fullmatch(text), text


SPECS = {"json_schema": json.dumps(SCHEMA), "regex": REGEX, "choice": json.dumps(CHOICES), "grammar": GRAMMAR}


@pytest.mark.parametrize("arch", sorted(ARCH_WRITERS))
def test_every_family_follows_each_constraint(model_factory, arch: str) -> None:
    model = model_factory(arch, "tiny")
    tok = Tokenizer.from_dir(model)
    engine = LLMEngine(EngineConfig(model_dir=model))
    prompt = tok.encode("Describe a person as JSON:")
    requests = {
        f"{kind}-{how}": EngineRequest(f"{kind}-{how}", prompt, constrained(kind, spec, temp, seed=7))
        for kind, spec in SPECS.items()
        for how, temp in (("greedy", 0.0), ("sampled", 1.0))
    }
    requests["free"] = EngineRequest(
        "free", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )
    results = run(engine, requests)
    for rid, (tokens, reason) in results.items():
        if rid == "free":
            assert reason == FinishReason.LENGTH and len(tokens) == 8
            continue
        assert reason == FinishReason.STOP, (rid, tok.decode(tokens))
        assert_follows(rid.split("-")[0], tok.decode(tokens))


def test_json_object_and_logprobs_of_the_raw_distribution(tiny_qwen3) -> None:
    """json_object gives JSON objects (any object: random weights may open a string they never close,
    so sampled runs are parsed where they ended; this checkpoint's greedy run closes at once);
    logprobs stay the model's own (the mask only picks)."""
    tok = Tokenizer.from_dir(tiny_qwen3)
    engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3))
    prompt = tok.encode("hello world")
    requests = {
        f"s{seed}": EngineRequest(f"s{seed}", prompt, constrained("json_object", "", 1.0, seed, logprobs=5))
        for seed in range(8)
    }
    requests["greedy"] = EngineRequest("greedy", prompt, constrained("json_object", ""))
    results = run(engine, requests)
    assert results["greedy"][1] == FinishReason.STOP
    ended = [tok.decode(tokens) for tokens, reason in results.values() if reason == FinishReason.STOP]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)
    assert all(tok.decode(tokens).startswith("{") for tokens, _ in results.values())
    engine.add_request(EngineRequest("lp", prompt, constrained("json_object", "", logprobs=5)))
    first = engine.step()[0]
    chosen, top = first.logprobs[0]
    assert tok.decode(first.token_ids) == "{"
    assert max(top.values()) >= chosen and top.get(first.token_ids[0], chosen) == chosen


def test_prefill_then_decode_continues_the_matcher(tiny_qwen3) -> None:
    """A PREFILL's first token obeys the grammar; a DECODE request fed that token goes on where it
    stopped and ends with the text a mixed run gives."""
    tok = Tokenizer.from_dir(tiny_qwen3)
    engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3, num_blocks=64))
    prompt = tok.encode("A person, as JSON, with a long enough prompt to fill a block or two:")
    sampling = constrained("json_schema", SPECS["json_schema"])
    ((mixed, _),) = run(engine, {"m": EngineRequest("m", prompt, sampling)}).values()
    engine.add_request(EngineRequest("p", prompt, sampling, mode=RequestMode.PREFILL))
    (out,) = [o for _ in range(4) for o in engine.step()]
    assert tok.decode(out.token_ids).startswith("{")
    dst = engine.allocate_kv(len(prompt))
    engine.kv_pool[dst] = engine.kv_pool[out.kv_block_ids]
    engine.free_kv(out.kv_block_ids)
    decode = EngineRequest(
        "d", prompt, sampling, mode=RequestMode.DECODE, first_token=out.token_ids[0], kv_block_ids=dst
    )
    ((rest, reason),) = run(engine, {"d": decode}).values()
    assert reason == FinishReason.STOP
    assert out.token_ids + rest == mixed
    jsonschema.validate(json.loads(tok.decode(mixed)), SCHEMA)


def test_a_resumed_request_continues_after_its_generated_tokens(tiny_qwen3) -> None:
    """A retry or migration prefills prompt + the tokens already sent: the matcher consumes those
    (``resume_tokens``) and the whole output still follows the schema."""
    tok = Tokenizer.from_dir(tiny_qwen3)
    engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3))
    prompt = tok.encode("Some JSON:")
    sampling = constrained("json_schema", SPECS["json_schema"], temperature=1.0, seed=3)
    ((whole, _),) = run(engine, {"w": EngineRequest("w", prompt, sampling)}).values()
    sent = whole[:5]
    resumed = StructuredOutput("json_schema", SPECS["json_schema"], resume_tokens=len(sent))
    again = SamplingParams(temperature=1.0, seed=9, max_tokens=MAX_TOKENS, structured=resumed)
    ((rest, reason),) = run(engine, {"r": EngineRequest("r", prompt + sent, again)}).values()
    assert reason == FinishReason.STOP
    jsonschema.validate(json.loads(tok.decode(sent + rest)), SCHEMA)


def test_bad_constraints_are_refused_naming_the_fault(tiny_qwen3) -> None:
    cases = {
        (
            "json_schema",
            '{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}',
        ): "invalid JSON schema",
        ("json_schema", "[1, 2]"): "invalid JSON schema: it must be a JSON object",
        ("json_schema", "{not json"): "invalid JSON schema: not JSON",
        ("regex", "a(b"): "invalid regex: .*unclosed group",
        ("choice", "[]"): "invalid choice list",
        ("grammar", "root ::= missing"): "invalid grammar: .*missing",
        ("xml", ""): "structured output kind must be one of",
    }
    for (kind, spec), message in cases.items():
        with pytest.raises(ValueError, match=message):
            check(StructuredOutput(kind, spec))
    engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3))
    with pytest.raises(ValueError, match="invalid regex"):
        engine.check_request(EngineRequest("bad", [1, 2], constrained("regex", "a(b")))
    off_grammar = StructuredOutput("choice", SPECS["choice"], resume_tokens=2)
    request = EngineRequest("r", [5, 6, 7], SamplingParams(max_tokens=4, structured=off_grammar))
    with pytest.raises(ValueError, match="resumed tokens do not follow"):
        engine.check_request(request)
