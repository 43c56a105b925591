"""Chat templates the random checkpoints carry, chosen per family.

Qwen families get ``QWEN_TOOLS_TEMPLATE``: ChatML, as Qwen2.5/Qwen3 write it, with their tool-calling
layout (our own wording of it): the ``tools`` list goes into the system turn inside ``<tools></tools>``,
each as one JSON line; an assistant turn's ``tool_calls`` become Hermes-style blocks
``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``; consecutive ``tool`` messages are
one user turn of ``<tool_response>`` blocks. Without tools the rendering is plain ChatML, the same
as ``CHATML_TEMPLATE``. Other families keep plain ChatML, which renders no tools (so a server
refuses ``tools`` for them: their tool-call format is not known).
"""

from __future__ import annotations

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_TOOLS_SYSTEM = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call functions to answer. Their signatures, one JSON object a line,"
    " are inside <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each call, answer with a JSON object holding the function\\'s name and"
    " its arguments inside <tool_call></tool_call> tags:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <arguments-json-object>}'
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
)

_ASSISTANT_CALLS = (
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + fn.name + \'", "arguments": \' }}'
    "{%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
)

_TOOL_RESPONSE = (
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
)

QWEN_TOOLS_TEMPLATE = (
    _TOOLS_SYSTEM + "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    + _TOOL_RESPONSE
    + "{%- elif message.role == 'assistant' and message.tool_calls %}"
    + _ASSISTANT_CALLS
    + "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Families whose real checkpoints write Hermes-style tool calls (Qwen2.5, Qwen3, Qwen3-MoE).
_TOOLS_FAMILIES = ("qwen2", "qwen3", "qwen3_moe")


def chat_template_for(arch: str) -> str:
    """The chat template a random ``arch`` checkpoint carries."""
    return QWEN_TOOLS_TEMPLATE if arch in _TOOLS_FAMILIES else CHATML_TEMPLATE
