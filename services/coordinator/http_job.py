"""``Job``: one validated request of the OpenAI routes, ready for the backend (http_app.py builds it;
http_fanout.py, echo.py, tools.py and native_routes.py read it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdmesh.generation import SamplingParams
from pdmesh.observability.coordinator_metrics import Outcome

if TYPE_CHECKING:
    from services.coordinator.backend import GenerationBackend
    from services.coordinator.echo import PromptEcho
    from services.coordinator.tools import ToolPlan


@dataclass
class Job:
    """One validated request, ready for the backend."""

    request_id: str  # X-Request-Id (logs)
    response_id: str  # cmpl-.../chatcmpl-... (the backend's request id)
    prompt_ids: list[int]
    sampling: SamplingParams
    top_logprobs: int | None  # top tokens to answer per token; None: no logprobs
    stops: list[str]
    include_usage: bool
    chat: bool
    stream: bool
    created: int
    outcome: Outcome = field(default_factory=Outcome)  # what requests_total records
    backend: GenerationBackend | None = None  # n > 1: the samples' shared prompt (http_fanout.py)
    tools: ToolPlan | None = None  # tools: calls parsed out of the output (tools.py)
    echo: PromptEcho | None = None  # echo and prompt logprobs (echo.py)
