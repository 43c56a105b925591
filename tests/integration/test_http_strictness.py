"""Never silently ignore (issue 14): the HTTP front refuses every field it does not honor, by name, and
serves /tokenize, /detokenize and the native endpoints' validation as documented in docs/api.md.

These run over the echoing backend (http_harness.py); tests/e2e/test_native_endpoints.py drives the
same routes on a real PD stack with real clients.
"""

from __future__ import annotations

import openai
import pytest

from services.coordinator.api_keys import KeyLimits, KeyRing
from services.coordinator.http_app import create_app
from tests.integration.http_harness import MAX_MODEL_LEN, MODEL, assert_error, call, serve_in_thread

pytestmark = pytest.mark.timeout(60)

USER = [{"role": "user", "content": "hi"}]


def post(app, path: str, body: dict):
    return call(app, "POST", path, json=body)


# -- unknown and unsupported fields ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, "frobnicate"),
        ("/v1/chat/completions", {"messages": USER, "temperture": 0.5}, "temperture"),
        ("/v1/chat/completions", {"messages": USER, "stream": True, "stream_options": {"x": 1}}, "stream_options.x"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "b": 1}]}]},
         "messages.0.content.0.b"),
        ("/tokenize", {"prompt": "hi", "add_bos": True}, "add_bos"),
        ("/detokenize", {"tokens": [1], "skip_special_tokens": True}, "skip_special_tokens"),
        ("/infer", {"inputs": "hi", "parameters": {"max_new_token": 3}}, "parameters.max_new_token"),
        ("/generate", {"inputs": "hi", "options": {}}, "options"),
    ],
)  # fmt: skip
def test_unknown_fields_are_refused_by_name(app, backend, path, body, param) -> None:
    error = assert_error(post(app, path, body), 400, f"Unrecognized request argument supplied: {param}")
    assert error["param"] == param
    assert not backend.calls


def test_every_unknown_field_is_named(app) -> None:
    error = assert_error(post(app, "/v1/completions", {"prompt": "hi", "aa": 1, "bb": 2}), 400)
    assert error["message"] == "Unrecognized request arguments supplied: aa, bb"


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "suffix": "end"}, "suffix"),
        ("/v1/chat/completions", {"messages": USER, "include_stop_str_in_output": True}, "include_stop_str_in_output"),
        ("/v1/chat/completions", {"messages": USER, "min_tokens": 4}, "min_tokens"),
        ("/v1/chat/completions", {"messages": USER, "store": True}, "store"),
        ("/v1/chat/completions", {"messages": USER, "chat_template_kwargs": {"x": 1}}, "chat_template_kwargs"),
        ("/generate", {"inputs": "hi", "parameters": {"typical_p": 0.5}}, "parameters.typical_p"),
        ("/infer", {"inputs": "hi", "parameters": {"timeout": 10}}, "parameters.timeout"),
    ],
)  # fmt: skip
def test_known_fields_pdmesh_does_not_honor_are_refused_with_the_reason(
    app, backend, path, body, param
) -> None:
    error = assert_error(post(app, path, body), 400, f"{param} is not supported by pdmesh: ")
    assert error["param"] == param
    assert not backend.calls


def test_fields_that_ask_nothing_are_accepted(app, backend) -> None:
    """null, or pdmesh's own fixed behaviour: a client serializing every default still works."""
    body = {
        "messages": USER,
        "max_tokens": 2,
        "logit_bias": {},
        "store": False,
        "metadata": None,
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
        "user": "end-user-1",
        "prompt_cache_key": "k",
    }
    assert post(app, "/v1/chat/completions", body).status_code == 200
    native = {"inputs": "hi", "parameters": {"watermark": False, "adapter_id": "None", "typical_p": None}}
    assert post(app, "/generate", native).status_code == 200
    assert len(backend.calls) == 2


def test_the_schema_documents_refused_fields_as_null_only(app) -> None:
    schemas = call(app, "GET", "/openapi.json").json()["components"]["schemas"]
    logit_bias = schemas["CompletionRequest"]["properties"]["logit_bias"]
    assert {"type": "null"} in logit_bias["anyOf"] and "Not supported" in logit_bias["description"]
    assert schemas["CompletionRequest"]["additionalProperties"] is False
    assert "typical_p" in schemas["NativeParameters"]["properties"]


# -- message roles --------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["function", "robot", "System"])
def test_roles_other_than_the_five_are_refused(app, backend, role) -> None:
    body = {"messages": [{"role": role, "content": "hi"}]}
    error = assert_error(post(app, "/v1/chat/completions", body), 400, "messages.0.role")
    assert error["param"] == "messages.0.role" and "developer" in error["message"]
    assert not backend.calls


def test_a_developer_message_reaches_a_template_without_that_role_as_a_system_message(app, tok) -> None:
    developer = [{"role": "developer", "content": "Be brief."}, *USER]
    system = [{"role": "system", "content": "Be brief."}, *USER]
    as_developer = post(app, "/tokenize", {"messages": developer}).json()["tokens"]
    assert as_developer == post(app, "/tokenize", {"messages": system}).json()["tokens"]
    assert as_developer == tok.encode_chat(system, add_generation_prompt=True)


def test_the_openai_client_sees_the_refusal(app) -> None:
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=USER, extra_body={"guided_nonsense": 1})
    assert caught.value.body["param"] == "guided_nonsense"
    assert "Unrecognized request argument supplied: guided_nonsense" in caught.value.body["message"]


# -- /tokenize and /detokenize --------------------------------------------------------------------------


def test_tokenize_a_prompt_as_vllm_answers(app, tok) -> None:
    body = post(app, "/tokenize", {"prompt": "hello world", "return_token_strs": True}).json()
    ids = tok.encode("hello world")
    assert body == {
        "count": len(ids),
        "max_model_len": MAX_MODEL_LEN,
        "tokens": ids,
        "token_strs": [tok.backend.id_to_token(i) for i in ids],
    }
    plain = post(app, "/tokenize", {"prompt": "hello world", "add_special_tokens": False}).json()
    assert plain["tokens"] == tok.encode("hello world", add_special_tokens=False)
    assert plain["token_strs"] is None


def test_tokenize_messages_and_continue_the_last_one(app, tok) -> None:
    chat = [*USER, {"role": "assistant", "content": "Sure, here"}]
    opened = {"messages": chat, "add_generation_prompt": False, "continue_final_message": True}
    ids = post(app, "/tokenize", opened).json()["tokens"]
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.endswith("Sure, here") and text.startswith(tok.apply_chat_template(USER, False))
    both = {"messages": chat, "continue_final_message": True}
    assert_error(post(app, "/tokenize", both), 400, "cannot both be true")


def test_detokenize_and_its_refusals(app, tok) -> None:
    ids = tok.encode_chat(USER, add_generation_prompt=True)
    assert post(app, "/detokenize", {"tokens": ids}).json() == {"prompt": tok.decode(ids, False)}
    error = assert_error(post(app, "/detokenize", {"tokens": [tok.vocab_size]}), 400, "tokens")
    assert error["param"] == "tokens"
    assert_error(post(app, "/detokenize", {"model": "other", "tokens": [1]}), 404, "other")


# -- native endpoints: validation, API keys -------------------------------------------------------------


def test_native_lengths_are_checked_against_the_context(app, backend) -> None:
    long = {"inputs": "hi", "parameters": {"max_new_tokens": MAX_MODEL_LEN}}
    error = assert_error(post(app, "/generate", long), 400, "maximum context length")
    assert error["param"] == "parameters.max_new_tokens"
    assert_error(post(app, "/generate_stream", {"inputs": "hi", "stream": False}), 400, "always streams")
    assert_error(post(app, "/infer", {"inputs": ""}), 400, "inputs must not be empty")
    assert not backend.calls


def test_new_routes_need_an_api_key_and_count_against_its_limits(backend, tok) -> None:
    keyed = create_app(backend, MODEL, tok, MAX_MODEL_LEN, api_keys=(KeyRing(["k1"]), KeyLimits(None, None)))
    for path, body in [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]}),
                       ("/infer", {"inputs": "hi"}), ("/generate", {"inputs": "hi"}),
                       ("/generate_stream", {"inputs": "hi"})]:  # fmt: skip
        assert_error(call(keyed, "POST", path, json=body), 401, "API key")
        answer = call(keyed, "POST", path, json=body, headers={"Authorization": "Bearer k1"})
        assert answer.status_code == 200, answer.text
