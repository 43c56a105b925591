"""Tool calls out of generated text: the Hermes parser, and the parsers of forced calls, whole and streamed."""

from __future__ import annotations

import json

import pytest

from services.coordinator.tool_parser import HermesParser, NamedParser, RequiredParser

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'


def calls_of(parsed) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in parsed[1]]


def stream(parser, text: str, step: int) -> tuple[str | None, list[tuple[str, str]], list]:
    """Feeds ``text`` ``step`` characters at a time; reassembles content and calls as a client does."""
    content, calls, deltas = "", {}, []
    pieces = [text[i : i + step] for i in range(0, len(text), step)] or [""]
    for n, piece in enumerate(pieces):
        more, call_deltas = parser.feed(piece, final=n == len(pieces) - 1)
        content += more
        deltas += call_deltas
        for d in call_deltas:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name  # the first piece names it
                calls[d.index] = [d.function.name, ""]
            else:
                assert d.id is None and d.function.name is None
            calls[d.index][1] += d.function.arguments or ""
    return content or None, [tuple(calls[i]) for i in sorted(calls)], deltas


def whole(parsed) -> tuple[str | None, list[tuple[str, str]]]:
    return parsed[0], [(c.function.name, c.function.arguments) for c in parsed[1]]


@pytest.mark.parametrize(
    "text",
    [
        "Let me look.\n" + WEATHER,
        WEATHER + "\n" + TIME,
        "A " + WEATHER + " B " + TIME + "\n\n",
        WEATHER + '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": ',  # cut: stays text
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}',  # left open at the end
        "no calls here <tool_ca",
        "  spaced  ",
        '<tool_call>{"name": "x", "arguments": {bad json}}</tool_call> then ' + TIME,
    ],
)
@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_hermes_streamed_deltas_add_up_to_the_parsed_message(text, step) -> None:
    content, calls, _ = stream(HermesParser(), text, step)
    assert (content, calls) == whole(HermesParser.parse(text))


def test_hermes_parses_several_calls_and_the_content_around_them() -> None:
    parsed = HermesParser.parse("Let me check both.\n" + WEATHER + "\n" + TIME + "\n")
    assert parsed[0] == "Let me check both."
    assert calls_of(parsed) == [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "CET"})]
    assert len({c.id for c in parsed[1]}) == 2 and parsed[1][0].id.startswith("chatcmpl-tool-")


def test_hermes_only_calls_leave_no_content() -> None:
    assert HermesParser.parse(WEATHER + "\n")[0] is None


def test_hermes_leaves_malformed_json_as_text() -> None:
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'
    assert HermesParser.parse(bad) == (bad, [])
    parsed = HermesParser.parse(bad + "\n" + TIME)
    assert parsed[0] == bad and calls_of(parsed) == [("get_time", {"zone": "CET"})]


@pytest.mark.parametrize(
    "body",
    ['{"arguments": {}}', '["get_weather"]', '{"name": "f", "arguments": [1]}', '{"name": 3}', ""],
)
def test_hermes_blocks_that_hold_no_call_stay_text(body) -> None:
    text = f"<tool_call>{body}</tool_call>"
    assert HermesParser.parse(text) == (text, [])


def test_hermes_accepts_arguments_written_as_a_json_string_and_missing_arguments() -> None:
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call><tool_call>{"name": "g"}</tool_call>'
    assert calls_of(HermesParser.parse(text)) == [("f", {"a": 1}), ("g", {})]


def test_hermes_plain_text_is_untouched() -> None:
    assert HermesParser.parse("  just text <tool  ") == ("  just text <tool  ", [])


def test_streamed_call_is_sent_once_its_block_closes() -> None:
    parser = HermesParser()
    assert parser.feed("Hi <tool_c", final=False) == ("Hi", [])
    assert parser.feed('all>{"name": "f", "arguments": {}}', final=False) == ("", [])
    content, deltas = parser.feed("</tool_call>", final=False)
    assert content == "" and [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (0, "f", "{}")
    ]


REQUIRED = '[{"name": "get_weather", "parameters": {"city": "Par\\"is", "days": 2}}, {"name": "get_time", "parameters": {}}]'


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_required_streams_arguments_pieces_that_add_up_to_the_parsed_calls(step) -> None:
    content, calls, deltas = stream(RequiredParser(), REQUIRED, step)
    assert content is None
    assert calls == whole(RequiredParser.parse(REQUIRED))[1]
    assert calls == [("get_weather", '{"city": "Par\\"is", "days": 2}'), ("get_time", "{}")]
    if step == 1:  # arguments arrive in pieces, after the piece that names the call
        assert len([d for d in deltas if d.index == 0]) > 2


def test_required_parameters_before_name_and_scalar_parameters() -> None:
    text = '[{"parameters": {"a": [1, {"b": "}"}]}, "name": "f"}, {"name": "g", "parameters": 3}]'
    content, calls, _ = stream(RequiredParser(), text, 1)
    assert calls == whole(RequiredParser.parse(text))[1] == [("f", '{"a": [1, {"b": "}"}]}'), ("g", "3")]


@pytest.mark.parametrize("text", ['[{"name": "f", "parameters": {"a": ', "not json", '{"name": "f"}'])
def test_required_output_that_is_no_call_array_is_content(text) -> None:
    assert RequiredParser.parse(text) == (text, [])


def test_named_call_is_the_whole_text() -> None:
    text = '{"city": "Paris"}'
    parsed = NamedParser("get_weather").parse(text)
    assert parsed[0] is None and whole(parsed)[1] == [("get_weather", text)]
    content, calls, _ = stream(NamedParser("get_weather"), text, 4)
    assert content is None and calls == [("get_weather", text)]
    assert NamedParser("f").parse('{"city": ') == ('{"city": ', [])
