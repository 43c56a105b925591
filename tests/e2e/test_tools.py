"""Tool calling end to end (real processes), driven by the official openai client: forced calls
(``tool_choice`` required and named) parse and validate against the functions' parameters whatever
the random model writes, streamed deltas reassemble to the same calls, ``none`` answers text, the
history with calls and tool results renders through the checkpoint's own template, and PD and mixed
stacks give the same calls at temperature 0."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest
from openai import BadRequestError, OpenAI

from tests.e2e.conftest import start_stack

pytestmark = pytest.mark.timeout(240)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [
    {
        "type": "function",
        "function": {"name": name, "description": f"{name} of a place", "parameters": schema},
    }
    for name, schema in PARAMETERS.items()
]
MESSAGES = [{"role": "user", "content": "Will it rain in Paris tomorrow?"}]
GREEDY = {"messages": MESSAGES, "tools": TOOLS, "temperature": 0, "max_tokens": 160}


@pytest.fixture(scope="module")
def long_qwen3(model_factory):
    # the tools' descriptions take ~600 tokens of this small vocabulary: more than tiny's 512 positions
    return model_factory("qwen3", "tiny", max_position_embeddings=2048)


def _stack(model_dir, tmp_path_factory, mode: str) -> Iterator:
    stack = start_stack(model_dir, tmp_path_factory, prefill=1, decode=1 if mode == "pd" else 0, mode=mode)
    try:
        yield OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def pd(long_qwen3, tmp_path_factory) -> Iterator[OpenAI]:
    yield from _stack(long_qwen3, tmp_path_factory, "pd")


@pytest.fixture(scope="module")
def mixed(long_qwen3, tmp_path_factory) -> Iterator[OpenAI]:
    yield from _stack(long_qwen3, tmp_path_factory, "mixed")


def calls(message) -> list[tuple[str, str]]:
    """The calls' names and arguments; each valid against its function's parameters."""
    found = []
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
        found.append((call.function.name, call.function.arguments))
    return found


def streamed_calls(client: OpenAI, **body) -> tuple[list[tuple[str, str]], str | None, str]:
    """Streams; reassembles the calls from their deltas (the first of each names it and has its id)."""
    assembled: dict[int, list[str]] = {}
    content, reason = "", None
    for chunk in client.chat.completions.create(model=_model(client), stream=True, **body):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        reason = choice.finish_reason or reason
        for delta in choice.delta.tool_calls or []:
            if delta.index not in assembled:
                assert delta.id and delta.type == "function" and delta.function.name
                assembled[delta.index] = [delta.function.name, ""]
            else:
                assert delta.id is None and delta.function.name is None
            assembled[delta.index][1] += delta.function.arguments or ""
    return [tuple(assembled[i]) for i in sorted(assembled)], content or None, reason


def _model(client: OpenAI) -> str:
    return client.models.list().data[0].id


def test_required_calls_validate_stream_the_same_and_match_across_pd_and_mixed(pd, mixed) -> None:
    # Greedy, a random model repeats its first call until max_tokens; the penalty lets it end the list.
    body = {**GREEDY, "tool_choice": "required", "frequency_penalty": 1.0}
    replies = [c.chat.completions.create(model=_model(c), **body) for c in (pd, mixed)]
    choice = replies[0].choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    expected = calls(choice.message)
    assert len(expected) >= 2 and expected == calls(replies[1].choices[0].message)
    assert streamed_calls(pd, **body) == (expected, None, "tool_calls")


def test_named_function_is_called(pd, mixed) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    results = []
    for client in (pd, mixed):
        reply = client.chat.completions.create(model=_model(client), tool_choice=named, **GREEDY)
        found = calls(reply.choices[0].message)
        assert [name for name, _ in found] == ["get_time"]
        results.append(found)
    assert results[0] == results[1]
    assert streamed_calls(pd, tool_choice=named, **GREEDY) == (results[0], None, "tool_calls")


def test_each_of_n_sampled_choices_is_a_call(pd) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = {**GREEDY, "temperature": 1.0, "seed": 7, "n": 2}
    reply = pd.chat.completions.create(model=_model(pd), tool_choice=named, **body)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        assert [name for name, _ in calls(choice.message)] == ["get_weather"]


def test_one_call_when_parallel_calls_are_off(pd) -> None:
    reply = pd.chat.completions.create(
        model=_model(pd), tool_choice="required", parallel_tool_calls=False, **GREEDY
    )
    assert len(calls(reply.choices[0].message)) == 1


def test_tool_choice_none_answers_text_with_the_tools_in_the_prompt(pd) -> None:
    plain = pd.chat.completions.create(model=_model(pd), messages=MESSAGES, max_tokens=4, temperature=0)
    reply = pd.chat.completions.create(model=_model(pd), tool_choice="none", **{**GREEDY, "max_tokens": 4})
    choice = reply.choices[0]
    assert isinstance(choice.message.content, str) and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # the tools were rendered


def test_history_with_calls_and_results_renders_with_the_models_template(pd, long_qwen3) -> None:
    from transformers import AutoTokenizer

    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call-1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call-1", "content": "light rain"},
    ]
    reply = pd.chat.completions.create(model=_model(pd), messages=history, tools=TOOLS, max_tokens=2)
    template_history = [{**m, "content": m["content"] or ""} for m in history]
    expected = AutoTokenizer.from_pretrained(long_qwen3).apply_chat_template(
        template_history, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert reply.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ],
)
def test_bad_tool_requests_are_400(pd, body, param) -> None:
    with pytest.raises(BadRequestError) as caught:
        pd.chat.completions.create(model=_model(pd), messages=MESSAGES, max_tokens=2, **body)
    assert caught.value.body["param"] == param
