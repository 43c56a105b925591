"""Tool calls out of generated text: Hermes-style ``<tool_call>`` blocks (``tool_choice: auto``) and
the JSON a forced call's grammar produces (``required``: an array of ``{"name", "parameters"}``;
a named function: its arguments object), whole or streamed.

Each parser has ``parse(text) -> (content, calls)`` for a finished text and ``feed(text, final)
-> (content delta, call deltas)`` for a stream; the deltas of a stream add up to what ``parse``
gives for the whole text, content and calls alike:

- Hermes: each ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the last one may be
  left open at the end) whose body is such a JSON object becomes a call, its arguments
  re-serialized; a block that is not (malformed JSON, no name) stays in the content as written.
  When calls were found, the content's trailing whitespace is dropped (no content: ``None``).
  Streamed, a block is sent once it closes (so that a malformed one can still be text), as one
  delta with its name and arguments; text that may begin ``<tool_call>`` is held back.
- Forced calls: the grammar makes the text valid JSON, so arguments stream as they are generated
  (the raw text of the arguments object, the same string ``parse`` answers); a text cut short (by
  ``max_tokens``) does not parse and is answered as content.
"""

from __future__ import annotations

import json
import re

from services.coordinator.tools_api import (
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    new_call_id,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.DOTALL)

Parsed = tuple[str | None, list[ToolCall]]
Deltas = tuple[str, list[DeltaToolCall]]


def hermes_call(body: str) -> FunctionCall | None:
    """The call a ``<tool_call>`` block's body holds, or None when it holds none."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return FunctionCall(name=data["name"], arguments=json.dumps(arguments, ensure_ascii=False))


def _held_prefix(text: str, tag: str) -> int:
    """How many trailing characters of ``text`` may begin ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class HermesParser:
    """``<tool_call>`` blocks, as Qwen (and other Hermes-format) models write them."""

    def __init__(self) -> None:
        self.buffer = ""  # text not yet handed out
        self.inside = False  # in an open <tool_call> block
        self.calls = 0
        self.held_space = ""  # whitespace sent only if content follows (or no call comes)

    @staticmethod
    def parse(text: str) -> Parsed:
        calls: list[ToolCall] = []
        pieces, last = [], 0
        for match in _BLOCK.finditer(text):
            call = hermes_call(match.group(1))
            if call is not None:
                pieces.append(text[last : match.start()])
                last = match.end()
                calls.append(ToolCall(function=call))
        if not calls:
            return text, []
        content = ("".join(pieces) + text[last:]).rstrip()
        return content or None, calls

    def feed(self, text: str, final: bool) -> Deltas:
        self.buffer += text
        content, deltas = "", []
        while True:
            if self.inside:
                end = self.buffer.find(CLOSE)
                if end < 0 and not final:
                    break
                body = self.buffer if end < 0 else self.buffer[:end]
                self.buffer = "" if end < 0 else self.buffer[end + len(CLOSE) :]
                self.inside = False
                call = hermes_call(body)
                if call is None:
                    content += self._content(OPEN + body + ("" if end < 0 else CLOSE))
                    continue
                deltas.append(self._delta(call))
                continue
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = 0 if final else _held_prefix(self.buffer, OPEN)
                content += self._content(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            content += self._content(self.buffer[:start])
            self.buffer, self.inside = self.buffer[start + len(OPEN) :], True
        if final and self.held_space and not self.calls:
            content, self.held_space = content + self.held_space, ""
        return content, deltas

    def _content(self, text: str) -> str:
        """Releases ``text`` with the whitespace held before it; holds its own trailing whitespace."""
        if not text:
            return ""
        text = self.held_space + text
        body = text.rstrip()
        self.held_space = text[len(body) :]
        return body

    def _delta(self, call: FunctionCall) -> DeltaToolCall:
        index, self.calls = self.calls, self.calls + 1
        function = DeltaFunctionCall(name=call.name, arguments=call.arguments)
        return DeltaToolCall(index=index, id=new_call_id(), type="function", function=function)


class NamedParser:
    """A named function's call: the whole text is its arguments object."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False

    def parse(self, text: str) -> Parsed:
        try:
            valid = isinstance(json.loads(text), dict)
        except ValueError:
            valid = False
        if not valid:
            return text, []
        return None, [ToolCall(function=FunctionCall(name=self.name, arguments=text))]

    def feed(self, text: str, final: bool) -> Deltas:
        if not text:
            return "", []
        if self.started:
            return "", [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))]
        self.started = True
        function = DeltaFunctionCall(name=self.name, arguments=text)
        return "", [
            DeltaToolCall(
                index=0,
                id=new_call_id(),
                type="function",
                function=function,
            )
        ]


class _ArrayScanner:
    """Finds, in a growing JSON text ``[{...}, ...]``, each element's top-level keys and the text
    spans of their values (the last one possibly still open)."""

    def __init__(self) -> None:
        self.text = ""
        self.depth = 0
        self.in_string = self.escaped = False
        self.expect = "key"  # in an element: key, colon, value, or after (a value)
        self.key_start = 0
        self.key = ""
        self.value: tuple[str, int] | None = None  # (kind: string/nested/scalar, start) of an open value
        self.elements: list[dict[str, list]] = []  # key -> [start, end or None]

    def add(self, text: str) -> None:
        start, self.text = len(self.text), self.text + text
        for i in range(start, len(self.text)):
            self._char(i, self.text[i])

    def _char(self, i: int, c: str) -> None:
        in_element = self.depth == 2
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
                if in_element and self.expect == "key":
                    self.key, self.expect = json.loads(self.text[self.key_start : i + 1]), "colon"
                elif in_element and self.value and self.value[0] == "string":
                    self._close(i + 1)
            return
        if c == '"':
            self.in_string = True
            if in_element and self.expect == "key":
                self.key_start = i
            elif in_element and self.expect == "value":
                self._open("string", i)
        elif c in "[{":
            if in_element and self.expect == "value":
                self._open("nested", i)
            self.depth += 1
            if self.depth == 2:
                self.elements.append({})
                self.expect = "key"
        elif c in "]}":
            if in_element and self.value and self.value[0] == "scalar":
                self._close(i)
            self.depth -= 1
            if self.depth == 2 and self.value and self.value[0] == "nested":
                self._close(i + 1)
        elif in_element and c == ":":
            self.expect = "value"
        elif in_element and c == ",":
            if self.value and self.value[0] == "scalar":
                self._close(i)
            self.expect = "key"
        elif in_element and self.expect == "value" and not c.isspace():
            self._open("scalar", i)

    def _open(self, kind: str, start: int) -> None:
        self.value, self.expect = (kind, start), "after"
        self.elements[-1][self.key] = [start, None]

    def _close(self, end: int) -> None:
        self.elements[-1][self.key][1] = end
        self.value = None

    def span_text(self, element: dict, key: str) -> tuple[str, bool] | None:
        """The text of ``key``'s value so far, and whether it is complete; None before it starts."""
        if key not in element:
            return None
        start, end = element[key]
        return self.text[start : len(self.text) if end is None else end].rstrip(), end is not None


class RequiredParser:
    """``tool_choice: required``: ``[{"name": ..., "parameters": {...}}, ...]``, as the grammar writes it."""

    def __init__(self) -> None:
        self.scanner = _ArrayScanner()
        self.sent: list[int] = []  # per call: characters of its arguments sent

    @staticmethod
    def parse(text: str) -> Parsed:
        try:
            data = json.loads(text)
        except ValueError:
            return text, []
        if not isinstance(data, list) or not all(isinstance(d, dict) and "name" in d for d in data):
            return text, []
        scanner = _ArrayScanner()
        scanner.add(text)
        calls = []
        for element, item in zip(scanner.elements, data, strict=True):
            raw = scanner.span_text(element, "parameters")
            arguments = raw[0] if raw else "{}"
            calls.append(ToolCall(function=FunctionCall(name=item["name"], arguments=arguments)))
        return None, calls

    def feed(self, text: str, final: bool) -> Deltas:
        self.scanner.add(text)
        deltas = []
        for index, element in enumerate(self.scanner.elements):
            name = self.scanner.span_text(element, "name")
            if name is None or not name[1]:
                break  # calls go out in order, each once its name is known
            arguments = self.scanner.span_text(element, "parameters")
            piece = arguments[0] if arguments else ""
            if index == len(self.sent):
                self.sent.append(len(piece))
                function = DeltaFunctionCall(name=json.loads(name[0]), arguments=piece)
                call_id = new_call_id()
                deltas.append(DeltaToolCall(index=index, id=call_id, type="function", function=function))
            elif len(piece) > self.sent[index]:
                more, self.sent[index] = piece[self.sent[index] :], len(piece)
                deltas.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=more)))
        return "", deltas
