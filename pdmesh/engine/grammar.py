"""Structured outputs in the engine: one llguidance matcher per constrained sequence, applied as a
mask on its logits before sampling.

``GrammarCompiler`` builds llguidance's tokenizer from the checkpoint's ``tokenizer.json`` (through
``pdmesh.tokenizer``, the ``tokenizers`` library; no transformers) once, on the first constrained
request, and keeps compiled grammars in a small cache: a request's matcher is a copy of its
grammar's, so a schema sent again costs no compilation.

A matcher starts at the first generated token. A continued request (retry, migration) has its
already generated tokens at the end of its prompt (``StructuredOutput.resume_tokens``), and a DECODE
request the token its prefill sampled (``first_token``): the matcher consumes those first, so a
decode instance goes on exactly where the prefill instance (or the failed attempt) stopped.

Each step, ``GrammarMatcher.allowed`` gives the tokens the grammar accepts next (end-of-sequence only
where the grammar may end) and ``apply_masks`` sets every other logit to -inf, for greedy and random
rows alike; logprobs stay those of the model's raw distribution. A sequence whose grammar admits
nothing more than its end stops (``stopped``) without spending a step on the end token.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import llguidance
import torch

from pdmesh.engine.types import EngineRequest
from pdmesh.generation import RequestMode, StructuredOutput
from pdmesh.structured import check
from pdmesh.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GRAMMAR_CACHE_SIZE = 64  # compiled grammars kept (distinct schemas in use at once)
_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarMatcher:
    """A constrained sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, request_id: str) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._request_id = request_id

    def accept(self, token: int) -> bool:
        """Advances past ``token``; False (logged) when the grammar does not allow it."""
        if self._matcher.consume_token(token):
            return True
        log.error("[%s] token %d breaks the structured output: %s", self._request_id, token, self.error)
        return False

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    @property
    def stopped(self) -> bool:
        """Nothing but the end of the sequence may follow (or the matcher failed)."""
        return self._matcher.is_stopped()

    def allowed(self) -> torch.Tensor:
        """A bool ``[vocab_size]`` tensor: the tokens the grammar accepts next."""
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        bits = (words[:, None] >> _BIT_SHIFTS) & 1
        return bits.flatten()[: self._vocab_size].bool()


class GrammarCompiler:
    """Builds matchers for one engine's vocabulary; any thread may call it."""

    def __init__(self, model_dir: Path | str, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size  # the logits' width: ids the tokenizer lacks are never allowed
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                backend = Tokenizer.from_dir(self.model_dir).backend  # special tokens added as served
                self._tokenizer = llguidance.LLTokenizer(
                    backend.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None
                )
            return self._tokenizer

    def _template(self, structured: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher of the constraint (compiled once; callers copy it, never advance it)."""
        key = (structured.kind, structured.spec)
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                return template
        template = llguidance.LLMatcher(self._llg_tokenizer(), check(structured), log_level=0)
        if template.is_error():
            raise ValueError(f"invalid structured output: {' '.join(template.get_error().split())}")
        with self._lock:
            self._compiled[key] = template
            while len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return template

    def start(self, request: EngineRequest) -> GrammarMatcher | None:
        """The request's matcher, past the tokens it already generated (None: unconstrained);
        ValueError when the constraint is invalid or those tokens break it."""
        structured = request.sampling.structured
        if structured is None:
            return None
        resumed = structured.resume_tokens
        if resumed > len(request.prompt_ids):
            raise ValueError(
                f"structured output resume_tokens {resumed} exceeds the prompt's {len(request.prompt_ids)} tokens"
            )
        matcher = GrammarMatcher(self._template(structured).deep_copy(), self.vocab_size, request.request_id)
        done = request.prompt_ids[len(request.prompt_ids) - resumed :]
        if any(not matcher.accept(t) for t in done):
            raise ValueError("the prompt's resumed tokens do not follow the structured output")
        if request.mode == RequestMode.DECODE and not matcher.accept(int(request.first_token)):
            raise ValueError(f"first_token {request.first_token} does not follow the structured output")
        return matcher


def apply_masks(logits: torch.Tensor, masks: list[torch.Tensor | None], raw: torch.Tensor) -> torch.Tensor:
    """``logits`` with each masked row's disallowed tokens at -inf (a copy where ``logits`` is ``raw``,
    whose values logprobs read)."""
    rows = [i for i, m in enumerate(masks) if m is not None]
    if not rows:
        return logits
    if logits is raw:
        logits = logits.clone()
    width = logits.shape[-1]
    for i in rows:
        allowed = masks[i].to(logits.device)
        if allowed.numel() < width:  # ids beyond the grammar's vocabulary: never allowed
            allowed = torch.nn.functional.pad(allowed, (0, width - allowed.numel()))
        logits[i].masked_fill_(~allowed[:width], float("-inf"))
    return logits
