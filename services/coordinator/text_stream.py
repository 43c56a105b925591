"""Generated token ids -> text deltas for one request: detokenizing, stop strings, token counts,
and which tokens' logprobs the released text covers."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pdmesh.tokenizer import IncrementalDetokenizer, Tokenizer
from services.coordinator.backend import GenerationChunk, TokenLogprobs


@dataclass
class TokenEntry:
    """A generated token with logprobs: its id, where its text starts in the completion, its logprobs."""

    token_id: int
    offset: int
    logprobs: TokenLogprobs


def per_token(chunk: GenerationChunk) -> Iterator[GenerationChunk]:
    """``chunk`` as one chunk per token (the last one carrying the end); a chunk without tokens as is.

    The engine may hand over several tokens at once (the first output of a decode, multi-step or
    speculative decoding); a stream still sends one event per token, as OpenAI's and vLLM's do."""
    ids, lps = chunk.token_ids, chunk.logprobs
    if len(ids) <= 1:
        yield chunk
        return
    last = len(ids) - 1
    for i, token in enumerate(ids):
        end = chunk.finished and i == last
        lp = [lps[i]] if lps is not None and i < len(lps) else None
        prompt = chunk.prompt_logprobs if i == 0 else None
        yield GenerationChunk([token], end, chunk.finish_reason if end else None, lp, prompt)


class TextStream:
    """Feeds backend chunks, returns the text safe to show.

    With stop strings, text that could still turn out to begin one is held back until it cannot (or
    the request ends); the first stop string found ends the text (itself excluded) with
    ``finish_reason`` "stop". A final token that is in ``drop_ids`` (a stop token or an
    end-of-sequence id ending the request with "stop") is counted but not rendered.

    Each token's text starts where the decoded text stood before it; ``take_logprobs`` hands out the
    logprobs of the tokens whose text has been released (all of them once the request ends, the
    dropped final token included), except tokens starting at or past a stop string's cut;
    ``take_fed_logprobs`` those of every token fed since (a stream's per-token chunks), with the same
    exception once a stop string has been found.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Iterable[str] = (), drop_ids: Iterable[int] = ()) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = [s for s in stops if s]
        self.drop_ids = set(drop_ids)
        self.pending = ""  # decoded but not yet released
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.done = False
        self.stopped_at_string = False
        self._decoded = 0  # characters decoded so far (released + pending)
        self._released = 0  # characters released so far
        self._ids: list[int] = []  # every generated token
        self._starts: list[int] = []  # where each one's text starts
        self._logprobs: list[TokenLogprobs | None] = []
        self._taken = 0  # tokens whose logprobs were handed out (or skipped)

    def feed(self, chunk: GenerationChunk) -> str:
        """The text this chunk releases (may be empty); sets ``done``/``finish_reason`` at the end."""
        if self.done:
            return ""
        self.completion_tokens += len(chunk.token_ids)
        ids = chunk.token_ids
        reason = (chunk.finish_reason or "stop") if chunk.finished else None
        dropped = reason == "stop" and bool(ids) and ids[-1] in self.drop_ids
        lps = chunk.logprobs or []
        for i, token in enumerate(ids):
            self._ids.append(token)
            self._starts.append(self._decoded)
            self._logprobs.append(lps[i] if i < len(lps) else None)
            if not (dropped and i == len(ids) - 1):
                self._add(self.detokenizer.add([token]))
        if chunk.finished:
            self._add(self.detokenizer.flush())
        released = self._release_until_stop()
        if not self.done and chunk.finished:
            self.done, self.finish_reason = True, reason
            released, self.pending = released + self.pending, ""
        self._released += len(released)
        return released

    def take_logprobs(self) -> list[TokenEntry]:
        """The logprobs of the tokens released since the last call (tokens without any are skipped)."""
        if self.done and not self.stopped_at_string:
            end = len(self._starts)
        else:
            end = bisect_left(self._starts, self._released)
        return self._take(end)

    def _take(self, end: int) -> list[TokenEntry]:
        taken = [
            TokenEntry(self._ids[i], self._starts[i], lp)
            for i in range(self._taken, end)
            if (lp := self._logprobs[i]) is not None
        ]
        self._taken = max(self._taken, end)
        return taken

    def take_fed_logprobs(self) -> list[TokenEntry]:
        """The logprobs of the tokens fed since the last call, whether or not their text is released
        (vLLM's streams send each token's logprobs in its own chunk)."""
        end = len(self._starts)
        if self.stopped_at_string:
            end = bisect_left(self._starts, self._released)
        return self._take(end)

    def cumulative_logprob(self) -> float:
        """The sum of the generated tokens' own logprobs (best_of ranks samples by it); 0 without any."""
        return sum(lp[0] for lp in self._logprobs if lp is not None)

    def _add(self, text: str) -> None:
        self.pending += text
        self._decoded += len(text)

    def _release_until_stop(self) -> str:
        if not self.stops:
            released, self.pending = self.pending, ""
            return released
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            released, self.pending = self.pending[: min(hits)], ""
            self.done, self.finish_reason, self.stopped_at_string = True, "stop", True
            return released
        keep = self._partial_stop_length()
        cut = len(self.pending) - keep
        released, self.pending = self.pending[:cut], self.pending[cut:]
        return released

    def _partial_stop_length(self) -> int:
        """The longest tail of ``pending`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:k]):
                    longest = k
                    break
        return longest
