"""Redis connections as the URL says (password/ACL user, TLS), a startup check, and masked URLs.

Every Redis client of pdmesh takes a URL: ``redis://[user:]password@host:port/db`` for a password
(``requirepass``) or an ACL user, ``rediss://...?ssl_ca_certs=CA&ssl_certfile=CERT&ssl_keyfile=KEY``
for TLS (redis-py's URL parameters; ``ssl_cert_reqs=none`` turns verification off). ``check_redis``
runs at a service's start: a wrong or missing password, or a TLS mismatch, is a configuration error
(one line naming the Redis, password masked); a Redis that is merely down is not (the services ride
out Redis outages). ``mask_url`` is what every log line and error message shows.
"""

from __future__ import annotations

import logging
import ssl
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)


class RedisSetupError(ValueError):
    """Redis refuses this service's credentials or TLS settings (a configuration error)."""


def mask_url(url: str | None) -> str:
    """``url`` with its password replaced by ``***`` (for logs and messages)."""
    if not url:
        return str(url)
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # unparsable: show nothing of what may be a secret
        return "<unparsable Redis URL>"


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def explain(url: str, exc: BaseException) -> str | None:
    """One line saying why Redis refused us, or None when it is only unreachable (down, slow)."""
    where = f"Redis at {mask_url(url)}"
    text = str(exc).replace(urlsplit(url).password or "\0", "***")
    if isinstance(exc, AuthenticationError) or "NOAUTH" in text or "WRONGPASS" in text:
        if urlsplit(url).password is None:
            return f"{where} refused the connection: it requires a password (NOAUTH)"
        return f"{where} refused the connection: wrong user name or password ({text.strip()})"
    if isinstance(exc, ResponseError) and "AUTH" in text:
        return f"{where} refused the credentials: {text.strip()}"
    cause = _ssl_cause(exc)
    if cause is not None:
        return f"{where}: TLS failed ({cause.reason or cause}); is it a TLS port, and is the CA right?"
    if "closed by server" in text.lower() or "connection reset" in text.lower():
        if urlsplit(url).scheme == "redis":
            return f"{where} closed the connection: is it a TLS port (then use rediss://)?"
    return None


async def check_redis(url: str, timeout_s: float = 2.0) -> bool:
    """PINGs ``url`` once: True when it answers; False (with a warning) when it is unreachable;
    raises ``RedisSetupError`` when it refuses our password or TLS."""
    try:
        client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    except (ValueError, TypeError) as exc:
        raise RedisSetupError(f"bad Redis URL {mask_url(url)}: {exc}") from None
    try:
        await client.ping()
        return True
    except (RedisError, OSError) as exc:
        why = explain(url, exc)
        if why is not None:
            raise RedisSetupError(why) from None
        if not isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            raise RedisSetupError(f"Redis at {mask_url(url)}: {exc}") from None
        hint = "; a plain-text Redis port does not answer TLS" if url.startswith("rediss:") else ""
        log.warning("Redis at %s does not answer yet (%s%s); going on", mask_url(url), exc, hint)
        return False
    finally:
        await client.aclose()
