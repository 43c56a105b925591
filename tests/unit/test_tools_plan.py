"""Tools before generation: the Qwen checkpoints' template renders tools as transformers does, and
``plan_tools`` turns a request's tools into a prompt, a constraint, or a 400 naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdmesh.modelgen.chat_templates import CHATML_TEMPLATE, QWEN_TOOLS_TEMPLATE, chat_template_for
from pdmesh.modelgen.tokenizer import write_tokenizer
from pdmesh.structured import check
from pdmesh.tokenizer import Tokenizer
from services.coordinator import openai_api as api
from services.coordinator.http_errors import ApiError
from services.coordinator.tools import plan_tools

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": PARAMS}},
    {"type": "function", "function": {"name": "now"}},
]
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Rain in Paris?"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": "a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "b", "type": "function", "function": {"name": "now", "arguments": {}}},
        ],
    },
    {"role": "tool", "tool_call_id": "a", "content": "rain"},
    {"role": "tool", "tool_call_id": "b", "content": "noon"},
    {"role": "assistant", "content": "Rain at noon."},
    {"role": "system", "content": "Late system note."},
    {"role": "user", "content": "Thanks"},
]


def _dir(tmp_path: Path, template: str) -> Path:
    write_tokenizer(tmp_path, chat_template=template)
    return tmp_path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(_dir(tmp_path_factory.mktemp("qwen"), QWEN_TOOLS_TEMPLATE))


@pytest.mark.parametrize("tools", [TOOLS, None])
@pytest.mark.parametrize("messages", [HISTORY, HISTORY[1:2], HISTORY[:2]])
def test_qwen_template_renders_tools_and_history_as_transformers(tmp_path, tools, messages) -> None:
    from transformers import AutoTokenizer

    model_dir = _dir(tmp_path, QWEN_TOOLS_TEMPLATE)
    ours = Tokenizer.from_dir(model_dir).apply_chat_template(messages, tools=tools)
    assert ours == AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    if tools:
        assert "<tools>\n" + json.dumps(TOOLS[0]) in ours
    if len(messages) > 2:
        assert '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>' in ours
        assert "<|im_start|>user\n<tool_response>\nrain\n</tool_response>\n<tool_response>\nnoon" in ours


def test_without_tools_qwen_template_is_plain_chatml(tmp_path, qwen) -> None:
    chatml = Tokenizer.from_dir(_dir(tmp_path, CHATML_TEMPLATE))
    plain = [m for m in HISTORY if "tool_calls" not in m and m["role"] != "tool"]
    assert qwen.apply_chat_template(plain) == chatml.apply_chat_template(plain)
    assert (
        chat_template_for("qwen3_moe") == QWEN_TOOLS_TEMPLATE
        and chat_template_for("llama") == CHATML_TEMPLATE
    )


def request(**fields) -> api.ChatCompletionRequest:
    return api.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_auto_is_the_default_and_none_still_renders_the_tools(qwen) -> None:
    auto = plan_tools(request(tools=TOOLS), qwen)
    assert auto.choice == "auto" and auto.schema is None and auto.template_vars()["tools"] == TOOLS
    assert plan_tools(request(tools=TOOLS, tool_choice="none"), qwen).choice == "none"
    assert plan_tools(request(), qwen) is None and plan_tools(request(tool_choice="none"), qwen) is None


def test_forced_calls_get_a_schema_the_grammar_engine_compiles(qwen) -> None:
    from pdmesh.generation import StructuredOutput

    named = plan_tools(
        request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}), qwen
    )
    assert named.schema == PARAMS
    required = plan_tools(request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), qwen)
    assert required.schema["minItems"] == required.schema["maxItems"] == 1
    assert [c["properties"]["name"]["enum"] for c in required.schema["items"]["anyOf"]] == [
        ["get_weather"],
        ["now"],
    ]
    for plan in (named, required):
        check(StructuredOutput(kind="json_schema", spec=json.dumps(plan.schema)))


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
            "'x'",
        ),
        ({"tools": TOOLS + TOOLS[:1]}, "tools", "unique"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}],
                "tool_choice": "required",
            },
            "tools",
            "JSON schema",
        ),
    ],
)
def test_bad_tools_are_refused_naming_the_field(qwen, fields, param, words) -> None:
    with pytest.raises(ApiError) as caught:
        plan_tools(request(**fields), qwen)
    assert caught.value.status == 400 and caught.value.param == param and words in caught.value.message


def test_a_model_whose_tool_format_is_unknown_refuses_tools(tmp_path) -> None:
    chatml = Tokenizer.from_dir(_dir(tmp_path, CHATML_TEMPLATE))
    with pytest.raises(ApiError) as caught:
        plan_tools(request(tools=TOOLS), chatml)
    assert caught.value.param == "tools" and "tool-call format" in caught.value.message
    assert plan_tools(request(), chatml) is None  # no tools: nothing to refuse
