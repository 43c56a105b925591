"""Fuzzes the coordinator's HTTP API from its own OpenAPI schema (schemathesis) over a real PD stack.

Every operation the coordinator documents at ``/openapi.json`` gets schemathesis's coverage phase
(boundary values, missing and mistyped fields, undeclared methods) and ``PDMESH_FUZZ_EXAMPLES``
Hypothesis examples, valid and invalid. Requests that pass validation generate on the real prefill and
decode workers. Each answer must be:

- never a 5xx: one prefill and one decode instance stay healthy, so not even a 503 is acceptable;
- within ``CALL_TIMEOUT_S`` (no hang);
- what the schema documents (status, content type, body), schema-violating input refused with a 4xx,
  every 4xx an OpenAI error object, every event stream free of ``error`` events and ended by
  ``[DONE]``;

and afterwards the server still answers a normal request. The suite runs a fixed, derandomized set of
examples; ``make fuzz`` runs many more with a random seed (docs/operations.md, "Fuzzing the HTTP API").
"""

from __future__ import annotations

import json
import os
from collections import Counter

import httpx
import pytest
import schemathesis
from schemathesis.core.transport import Response

EXAMPLES = int(os.environ.get("PDMESH_FUZZ_EXAMPLES", "25"))  # per operation, besides the coverage phase
RANDOM = "PDMESH_FUZZ_EXAMPLES" in os.environ  # make fuzz explores; the suite repeats one fixed set
# No hang: the longest legitimate answer generates MAX_TOKENS tokens on the tiny model (milliseconds);
# 30 s leaves room for a loaded 2-core machine and still fails a request that never ends.
CALL_TIMEOUT_S = 30.0
# Generation time must not explode: a valid max_tokens (or max_completion_tokens) above MAX_TOKENS is
# lowered to it, and a request naming neither gets max_tokens = MAX_TOKENS (the default would be up to
# 256 tokens). Larger values than the context stay as sent: the server must refuse them.
MAX_TOKENS = 16
MAX_SEQUENCES = 2  # n, best_of and prompt lists beyond this add run time, not coverage
BUDGETS = ("max_tokens", "max_completion_tokens")

# What the fuzzing saw, by outcome, so that the last test can tell the fuzz reached the workers.
OUTCOMES: Counter = Counter()

# The fuzz runs EXAMPLES per operation plus a fixed coverage phase (a few hundred requests each); each
# request takes milliseconds, a second at most on a loaded machine. One test runs every operation (13
# since /tokenize, /detokenize, /infer, /generate and /generate_stream: 100 s in all at a load of 11 on
# 2 cores), so the bound is about 15 s per operation.
pytestmark = pytest.mark.timeout(200 + EXAMPLES)


@pytest.fixture(scope="module")
def max_model_len(pd_stack) -> int:
    return httpx.get(f"{pd_stack.base_url}/v1/models", timeout=10).json()["data"][0]["max_model_len"]


@pytest.fixture(scope="module")
def api_schema(pd_stack):
    config = schemathesis.Config.from_dict(
        {
            "request-timeout": CALL_TIMEOUT_S,
            "generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": not RANDOM},
            # A schema-valid body may still be refused (a prompt longer than the context, n > 1,
            # top_logprobs without logprobs): those refusals are checked to be 4xx OpenAI errors.
            "checks": {"positive_data_acceptance": {"enabled": False}},
            "phases": {"stateful": {"enabled": False}},
        }
    )
    return schemathesis.openapi.from_url(f"{pd_stack.base_url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


def bound_generation(case, max_model_len: int) -> None:
    """Caps the completion budget of a generation request at MAX_TOKENS (see MAX_TOKENS), and the
    sequences it asks for (n, best_of, a list of prompts) at MAX_SEQUENCES: the server accepts up to
    1024, which random examples would otherwise ask for at full length."""
    body = case.body
    if case.method != "POST" or not isinstance(body, dict):
        return
    for name in ("n", "best_of"):
        if type(body.get(name)) is int and body[name] > MAX_SEQUENCES:
            body[name] = MAX_SEQUENCES
    if isinstance(body.get("prompt"), list) and body["prompt"] and isinstance(body["prompt"][0], str | list):
        body["prompt"] = body["prompt"][:MAX_SEQUENCES]
    if "inputs" in body:  # /infer, /generate: max_new_tokens in parameters (20 when unset)
        params = body.get("parameters")
        if not isinstance(params, dict):
            return
        value = params.get("max_new_tokens")
        if value is None or (type(value) is int and MAX_TOKENS < value <= max_model_len):
            params["max_new_tokens"] = MAX_TOKENS
        return
    if all(body.get(name) is None for name in BUDGETS):
        body["max_tokens"] = MAX_TOKENS
        return
    for name in BUDGETS:
        value = body.get(name)
        if type(value) is int and MAX_TOKENS < value <= max_model_len:
            body[name] = MAX_TOKENS


def openai_errors_and_clean_streams(ctx, response: Response, case) -> None:
    """4xx answers are OpenAI error objects; a 200 event stream has no error event and ends in [DONE]
    (the OpenAI routes) or in an event with the whole ``generated_text`` (MindIE's and TGI's)."""
    content_type = response.headers.get("content-type", [""])[0]
    if 400 <= response.status_code < 500:
        try:
            error = json.loads(response.content).get("error")
        except (ValueError, AttributeError):
            error = None
        assert isinstance(error, dict), f"a {response.status_code} without an OpenAI error object"
        assert isinstance(error.get("message"), str) and error["message"], "an error without a message"
        assert isinstance(error.get("type"), str) and error["type"], "an error without a type"
    elif response.status_code == 200 and content_type.startswith("text/event-stream"):
        events = [line[6:] for line in response.content.decode().splitlines() if line.startswith("data: ")]
        if case.path.startswith("/v1/"):
            assert events and events[-1] == "[DONE]", f"a stream not ended by [DONE]: {events[-2:]}"
            events = events[:-1]
        else:
            assert events and "generated_text" in json.loads(events[-1]), (
                f"an unfinished stream: {events[-2:]}"
            )
        failures = [e for e in events if "error" in json.loads(e)]
        assert not failures, f"a stream that failed after it started: {failures[0]}"


@schema.parametrize()
def test_api_answers_any_input_without_server_errors(case, max_model_len) -> None:
    bound_generation(case, max_model_len)
    response = case.call()
    case.validate_response(response, additional_checks=[openai_errors_and_clean_streams])
    generated = response.status_code == 200 and case.method == "POST"
    OUTCOMES["generated" if generated else str(response.status_code)] += 1


def test_still_serves_after_the_fuzz(pd_stack) -> None:
    assert httpx.get(f"{pd_stack.base_url}/health", timeout=10).status_code == 200
    response = httpx.post(
        f"{pd_stack.base_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "ignore_eos": True},
        timeout=CALL_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"
    if OUTCOMES:  # the fuzz ran in this session: some of its requests generated on the workers
        assert OUTCOMES["generated"] > 0, f"no fuzzed request reached the workers: {dict(OUTCOMES)}"
        # The run's tally (shown with pytest -rA, as make fuzz runs it): requests by outcome.
        print(json.dumps({"requests": sum(OUTCOMES.values()), **dict(OUTCOMES.most_common())}))
