"""The HTTP and gRPC fronts' shared length rules."""

from __future__ import annotations

import pytest

from services.coordinator.limits import DEFAULT_MAX_TOKENS, LengthError, completion_budget

pytestmark = pytest.mark.timeout(10)


def test_unset_budget_is_the_context_left_capped() -> None:
    assert completion_budget(10, None, 4096) == DEFAULT_MAX_TOKENS
    assert completion_budget(4090, None, 4096) == 6
    assert completion_budget(10, 100, 4096) == 100


@pytest.mark.parametrize(
    ("prompt", "requested", "field", "exceeded", "words"),
    [
        (0, None, "prompt", False, "the prompt is empty"),
        (64, None, "prompt", True, "your prompt has 64 tokens, leaving no room"),
        (10, 0, "max_completion_tokens", False, "max_completion_tokens must be at least 1, got 0"),
        (10, 55, "max_completion_tokens", True, "you requested 65 tokens (10 in the prompt, 55 for the"),
    ],
)
def test_refusals_name_the_field(prompt, requested, field, exceeded, words) -> None:
    with pytest.raises(LengthError, match=words.replace("(", r"\(")) as caught:
        completion_budget(prompt, requested, 64, "max_completion_tokens")
    assert caught.value.field == field and caught.value.context_exceeded is exceeded
