"""Prompt and completion lengths against the model's context, shared by the HTTP and gRPC fronts.

Both fronts answer the same way (OpenAI's wording): a prompt that fills the context leaves no room for
a completion; a prompt plus the requested completion may not exceed it; an unset completion budget
is the context left after the prompt, capped at ``DEFAULT_MAX_TOKENS``.
"""

from __future__ import annotations

DEFAULT_MAX_TOKENS = 256


class LengthError(ValueError):
    """A bad length; ``field`` is the one to change ("prompt" or the budget's name) and
    ``context_exceeded`` tells a request too long for the context from an empty prompt or budget."""

    def __init__(self, message: str, field: str, context_exceeded: bool = True) -> None:
        super().__init__(message)
        self.field = field
        self.context_exceeded = context_exceeded


def completion_budget(
    prompt_len: int, requested: int | None, max_model_len: int, budget_name: str = "max_tokens"
) -> int:
    """The completion's token budget: ``requested`` when it fits, else the default; raises when it does not.

    LengthError for an empty prompt, a budget below one, or a prompt (or prompt plus ``requested``)
    that does not fit ``max_model_len``.
    """
    if prompt_len == 0:
        raise LengthError("the prompt is empty", "prompt", context_exceeded=False)
    if prompt_len >= max_model_len:
        raise LengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{prompt_len} tokens, leaving no room for a completion. Please shorten the prompt.",
            "prompt",
        )
    if requested is None:
        return min(DEFAULT_MAX_TOKENS, max_model_len - prompt_len)
    if requested < 1:
        raise LengthError(
            f"{budget_name} must be at least 1, got {requested}", budget_name, context_exceeded=False
        )
    if prompt_len + requested > max_model_len:
        raise LengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
            f"Please reduce the prompt or {budget_name}.",
            budget_name,
        )
    return requested
