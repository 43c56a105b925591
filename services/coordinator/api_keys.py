"""API keys for the coordinator's fronts: who may call, and how much (docs/security.md "HTTP API").

- Keys come from ``--api-key`` (several), ``PDMESH_COORDINATOR_API_KEYS`` and ``--api-key-file`` (one per
  line, ``#`` comments). The file is re-read when its modification time, size or inode changes, looked
  at no more than once per ``FILE_CHECK_S``: a rotated file refuses the old key within about a second.
- A presented key is compared with every configured key with ``hmac.compare_digest`` (no early exit),
  so the answer's timing says nothing about how much of a key matched.
- Keys are never logged; a key is named by ``key_id`` (the first 8 hex digits of its SHA-256).
- Per-key limits: a token bucket of ``max_rps`` (burst: one second's worth, at least 1) and at most
  ``max_concurrency`` requests at once. A refusal names the limit and when to retry.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILE_CHECK_S = 1.0


class ApiKeyError(ValueError):
    """The key configuration cannot be used (e.g. the key file cannot be read at startup)."""


def key_id(key: str) -> str:
    """A short, non-reversible name for a key, for logs and limits."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_key_file(text: str) -> list[str]:
    """Keys of a key file: one per line; blank lines and ``#`` comments are skipped."""
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append(line)
    return keys


class KeyRing:
    """The configured keys (fixed ones plus those of a key file that may change)."""

    def __init__(self, keys: list[str], path: str | None = None, clock=time.monotonic) -> None:
        self._fixed = [k.encode() for k in keys]
        self._path = Path(path) if path else None
        self._clock = clock
        self._from_file: list[bytes] = []
        self._stamp: tuple | None = None
        self._checked_at = -math.inf
        self._lock = threading.Lock()
        if self._path is not None:
            try:
                self._load(self._stat())
            except OSError as exc:
                raise ApiKeyError(f"cannot read the API key file {self._path}: {exc.strerror}") from exc

    @property
    def enabled(self) -> bool:
        """Keys are required once any key or a key file is configured (an empty file refuses everyone)."""
        return bool(self._fixed) or self._path is not None

    def _stat(self) -> tuple:
        st = os.stat(self._path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self, stamp: tuple) -> None:
        keys = parse_key_file(self._path.read_text())
        self._from_file, self._stamp = [k.encode() for k in keys], stamp
        log.info("API key file %s: %d keys", self._path, len(keys))

    def _refresh(self) -> None:
        now = self._clock()
        if self._path is None or now - self._checked_at < FILE_CHECK_S:
            return
        with self._lock:
            if now - self._checked_at < FILE_CHECK_S:
                return
            self._checked_at = now
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._load(stamp)
            except OSError as exc:  # mid-rotation or removed: keep the last keys read
                log.warning(
                    "API key file %s unreadable (%s); keeping its last keys", self._path, exc.strerror
                )

    def match(self, presented: str | None) -> str | None:
        """The ``key_id`` of ``presented`` when it is a configured key, else None."""
        if not presented:
            return None
        self._refresh()
        given = presented.encode()
        found = False
        for key in [*self._fixed, *self._from_file]:
            found |= hmac.compare_digest(given, key)
        return key_id(presented) if found else None


@dataclass(frozen=True)
class Refusal:
    """A request over one of its key's limits."""

    limit: str  # "api_key_max_rps" or "api_key_max_concurrency"
    message: str
    retry_after_s: int


class _Bucket:
    def __init__(self, rate: float, now: float) -> None:
        self.capacity = max(1.0, rate)
        self.tokens, self.at = self.capacity, now

    def take(self, rate: float, now: float) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


class KeyLimits:
    """Per-key request rate and concurrency; ``acquire`` then (when admitted) ``release``."""

    def __init__(self, max_rps: float | None, max_concurrency: int | None, clock=time.monotonic) -> None:
        self.max_rps, self.max_concurrency, self._clock = max_rps, max_concurrency, clock
        self._buckets: dict[str, _Bucket] = {}
        self._running: dict[str, int] = {}

    def acquire(self, kid: str) -> Refusal | None:
        """Admits one request of key ``kid`` (None) or says which limit it is over."""
        if self.max_concurrency is not None and self._running.get(kid, 0) >= self.max_concurrency:
            return Refusal(
                "api_key_max_concurrency",
                f"too many requests at once for this API key (api_key_max_concurrency={self.max_concurrency})",
                1,
            )
        if self.max_rps is not None:
            now = self._clock()
            bucket = self._buckets.setdefault(kid, _Bucket(self.max_rps, now))
            wait = bucket.take(self.max_rps, now)
            if wait > 0:
                return Refusal(
                    "api_key_max_rps",
                    f"request rate over this API key's limit (api_key_max_rps={self.max_rps:g})",
                    max(1, math.ceil(wait)),
                )
        self._running[kid] = self._running.get(kid, 0) + 1
        return None

    def release(self, kid: str) -> None:
        left = self._running.get(kid, 0) - 1
        if left > 0:
            self._running[kid] = left
        else:
            self._running.pop(kid, None)


def bearer(value: str | None) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` value (scheme case-insensitive)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
