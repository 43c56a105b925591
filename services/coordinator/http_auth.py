"""The HTTP front's API key check and per-key limits, as ASGI middleware (api_keys.py holds the logic).

With keys configured every path needs one except ``OPEN_PATHS`` (``/health``, ``/ready``: probes); the
metrics port is another server and stays open. A key comes as ``Authorization: Bearer KEY`` or
``x-api-key: KEY``. The dashboard, opened in a browser, cannot send headers: ``/dashboard?key=KEY``
answers a redirect to ``/dashboard`` that sets the key as an HttpOnly, SameSite=Strict cookie scoped to
``/dashboard`` (so it never rides along on ``/v1`` calls), which the page's fetches of
``/dashboard/data`` then carry. Missing or wrong key: 401; over a limit: 429 with Retry-After. The
concurrency slot is held until the response (streams included) has been sent.
"""

from __future__ import annotations

import logging
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from starlette.responses import JSONResponse, RedirectResponse

from services.coordinator import openai_api as api
from services.coordinator.api_keys import KeyLimits, KeyRing, bearer

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready"})
COOKIE = "pdmesh_api_key"
DASHBOARD = "/dashboard"


def _unauthorized(message: str) -> JSONResponse:
    body = api.error_body(message, "authentication_error", None, "invalid_api_key")
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _too_many(message: str, limit: str, retry_after_s: int) -> JSONResponse:
    body = api.error_body(message, "rate_limit_error", limit, "rate_limit_exceeded")
    return JSONResponse(body, status_code=429, headers={"Retry-After": str(retry_after_s)})


def _presented(scope) -> tuple[str | None, bool]:
    """The key a request presents and whether it came in the dashboard's ``?key=`` (to set the cookie)."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
    key = bearer(headers.get("authorization")) or headers.get("x-api-key", "").strip() or None
    if key or not scope["path"].startswith(DASHBOARD):
        return key, False
    if scope["path"] == DASHBOARD:
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key")
        if given:
            return given[0], True
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # noqa: BLE001 - a malformed cookie header is no key
        return None, False
    return (cookie[COOKIE].value if COOKIE in cookie else None), False


class ApiKeyMiddleware:
    """Refuses requests without a configured key (401) or over their key's limits (429)."""

    def __init__(self, app, ring: KeyRing, limits: KeyLimits) -> None:
        self.app, self.ring, self.limits = app, ring, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.ring.enabled or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        request_id = scope.get("state", {}).get("request_id", "-")
        key, from_query = _presented(scope)
        kid = self.ring.match(key)
        if kid is None:
            why = "no API key" if key is None else "an unknown API key"
            log.info("[%s] %s %s refused: %s", request_id, scope["method"], scope["path"], why)
            message = (
                "Missing API key: send it as 'Authorization: Bearer KEY'"
                if key is None
                else "Incorrect API key provided"
            )
            await _unauthorized(message)(scope, receive, send)
            return
        if from_query:
            await self._set_cookie(scope, receive, send, key)
            return
        refusal = self.limits.acquire(kid)
        if refusal is not None:
            log.info("[%s] key %s over %s", request_id, kid, refusal.limit)
            await _too_many(refusal.message, refusal.limit, refusal.retry_after_s)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limits.release(kid)

    async def _set_cookie(self, scope, receive, send, key: str) -> None:
        """Moves the key from the URL into a cookie the page's own fetches carry."""
        response = RedirectResponse(DASHBOARD, status_code=303)
        response.set_cookie(
            COOKIE,
            key,
            path=DASHBOARD,
            httponly=True,
            samesite="strict",
            secure=scope.get("scheme") == "https",
        )
        await response(scope, receive, send)
