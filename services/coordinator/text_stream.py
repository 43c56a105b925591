"""Generated token ids -> text deltas for one request: detokenizing, stop strings, token counts."""

from __future__ import annotations

from collections.abc import Iterable

from pdmesh.tokenizer import IncrementalDetokenizer, Tokenizer
from services.coordinator.backend import GenerationChunk


class TextStream:
    """Feeds backend chunks, returns the text safe to show.

    With stop strings, text that could still turn out to begin one is held back until it cannot (or
    the request ends); the first stop string found ends the text (itself excluded) with
    ``finish_reason`` "stop". A final token that is in ``drop_ids`` (a stop token or an
    end-of-sequence id ending the request with "stop") is counted but not rendered.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Iterable[str] = (), drop_ids: Iterable[int] = ()) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = [s for s in stops if s]
        self.drop_ids = set(drop_ids)
        self.pending = ""  # decoded but not yet released
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.done = False

    def feed(self, chunk: GenerationChunk) -> str:
        """The text this chunk releases (may be empty); sets ``done``/``finish_reason`` at the end."""
        if self.done:
            return ""
        self.completion_tokens += len(chunk.token_ids)
        ids = chunk.token_ids
        reason = (chunk.finish_reason or "stop") if chunk.finished else None
        if reason == "stop" and ids and ids[-1] in self.drop_ids:
            ids = ids[:-1]
        self.pending += self.detokenizer.add(ids)
        if chunk.finished:
            self.pending += self.detokenizer.flush()
        released = self._release_until_stop()
        if self.done:
            return released
        if chunk.finished:
            self.done, self.finish_reason = True, reason
            released, self.pending = released + self.pending, ""
        return released

    def _release_until_stop(self) -> str:
        if not self.stops:
            released, self.pending = self.pending, ""
            return released
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            released, self.pending = self.pending[: min(hits)], ""
            self.done, self.finish_reason = True, "stop"
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
