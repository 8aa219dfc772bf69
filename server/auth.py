"""API keys with scopes, and per-key rate limits (pure ASGI middlewares of the HTTP process).

Keys are kept as SHA-256 hex digests only: from a file (``api_keys_file``, YAML or JSON), the
environment (``SAESTEER_API_KEYS``, a JSON list) or, as before, one plaintext ``SAESTEER_API_KEY``
with every scope (hashed when read). A request sends ``Authorization: Bearer <key>``:

- no key or an unknown one: 401; a known key without the route's scope: 403 (JSON bodies);
- ``/health`` and ``/ready`` are open; everything else needs a key once keys are configured.

Rate limits are token buckets per key (per client address without keys): ``requests_per_minute``
and ``tokens_per_minute`` (a generate request costs ``max_new_tokens``, twice with ``compare``,
charged as it is admitted; a concept search, a read-out or an image request costs the work its
worker reports in ``middleware.COST_HEADER``, charged once it is answered, and is admitted while the
key's bucket is not in debt); over either, 429 with ``Retry-After`` (whole seconds until the bucket
holds enough).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from saesteer.config_files import read_document

from .middleware import COST_HEADER, COUNTED_PATHS, GENERATE_PATHS, body_json, field_item, send_error

Scope = Literal["generate", "images", "features", "concepts:write", "admin"]
SCOPES: tuple[str, ...] = ("generate", "images", "features", "concepts:write", "admin")
OPEN_PATHS = frozenset({"/health", "/ready"})


class ApiKey(BaseModel):
    """One API key as configured: its SHA-256 digest (``printf %s KEY | sha256sum``), never the key."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="who holds it (logs and metrics)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key")
    scopes: list[Scope] = Field(default_factory=lambda: ["generate", "features"], description="what the key may do")
    requests_per_minute: float | None = Field(None, gt=0, description="None: the server's default")
    tokens_per_minute: float | None = Field(None, gt=0, description="None: the server's default")


def hash_key(key: str) -> str:
    """Hex SHA-256 of a plaintext key."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys_file(path: str) -> list[ApiKey]:
    """Keys from a YAML or JSON file: ``{"keys": [{name, sha256, scopes, ...}, ...]}`` or a bare list.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that is not YAML or JSON (``ConfigFileError``), or a malformed entry
            (pydantic's message names the field).
    """
    data = read_document(path)
    entries = data.get("keys", []) if isinstance(data, dict) else data
    return [ApiKey.model_validate(e) for e in entries or []]


def required_scope(method: str, path: str) -> str | None:
    """The scope a route needs; None: any valid key."""
    if path in GENERATE_PATHS or path == "/v1/models":
        return "generate"
    if path.startswith("/v1/saes"):
        return "features"
    if path.startswith("/v1/images"):
        return "images"
    if path == "/v1/concepts/search":
        return "features"
    if path.startswith("/v1/concepts") and method not in ("GET", "HEAD"):
        return "concepts:write"
    if path == "/metrics" or path.startswith("/v1/admin"):
        return "admin"
    return None


def _error(kind: str, msg: str) -> list:
    return [field_item(["header", "authorization"], msg, kind)]


class AuthMiddleware:
    """401/403 by API key and scope (see the module docstring); puts the matched key in
    ``scope["saesteer.key"]``.

    Args:
        app: the ASGI app.
        keys: the configured keys (digests only); empty: no authentication.
    """

    def __init__(self, app, keys: list[ApiKey]):
        self.app = app
        self.keys = [(k, bytes.fromhex(k.sha256)) for k in keys]

    def match(self, token: str) -> ApiKey | None:
        """The key whose digest matches ``token`` (every digest compared, in constant time each)."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for k, d in self.keys:
            if hmac.compare_digest(digest, d):
                found = k
        return found

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
        kind, _, token = header.partition(" ")
        key = self.match(token.strip()) if kind.lower() == "bearer" and token.strip() else None
        if key is None:
            scope["saesteer.reject"] = "unauthorized"
            return await send_error(send, 401, _error("unauthorized", "missing or invalid bearer token"),
                                   {"www-authenticate": "Bearer"})
        need = required_scope(scope.get("method", "GET"), scope["path"])
        if need is not None and need not in key.scopes and "admin" not in key.scopes:
            scope["saesteer.reject"] = "forbidden"
            return await send_error(send, 403, _error("forbidden", f"key {key.name!r} lacks the scope {need!r}"))
        scope["saesteer.key"] = key
        await self.app(scope, receive, send)


class _Bucket:
    """A token bucket holding at most ``per_minute``, refilled at ``per_minute / 60`` per second."""

    def __init__(self, per_minute: float):
        self.capacity, self.rate = per_minute, per_minute / 60.0
        self.level, self.t = per_minute, time.monotonic()

    def wait_for(self, cost: float) -> float:
        """Seconds until ``cost`` fits (0: it fits now); the bucket is not charged."""
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now
        if cost > self.capacity:
            return math.inf
        return max(0.0, (cost - self.level) / self.rate)

    def charge(self, cost: float) -> None:
        self.level -= cost


def generate_cost(d: object) -> int:
    """Tokens a generate body ``d`` (parsed JSON) may produce: ``max_new_tokens`` (default 64),
    twice with ``compare``."""
    try:
        n = int(d.get("max_new_tokens") or d.get("max_completion_tokens") or d.get("max_tokens") or 64)
        return max(1, n) * (2 if d.get("compare") else 1)
    except (ValueError, TypeError, AttributeError):
        return 1  # malformed: FastAPI refuses it, one request's worth


class RateLimitMiddleware:
    """429 with ``Retry-After`` past a key's requests or tokens per minute.

    Args:
        app: the ASGI app.
        requests_per_minute, tokens_per_minute: defaults for keys without their own; None: no limit.
    """

    def __init__(self, app, requests_per_minute: float | None, tokens_per_minute: float | None):
        self.app, self.rpm, self.tpm = app, requests_per_minute, tokens_per_minute
        self.buckets: dict[tuple[str, str], _Bucket] = {}

    def _bucket(self, who: str, kind: str, per_minute: float | None) -> _Bucket | None:
        if per_minute is None:
            return None
        b = self.buckets.get((who, kind))
        if b is None or b.capacity != per_minute:
            b = self.buckets[(who, kind)] = _Bucket(per_minute)
        return b

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        key: ApiKey | None = scope.get("saesteer.key")
        who = key.name if key is not None else f"ip:{(scope.get('client') or ('?',))[0]}"
        rpm = key.requests_per_minute if key is not None and key.requests_per_minute else self.rpm
        tpm = key.tokens_per_minute if key is not None and key.tokens_per_minute else self.tpm
        req_b = self._bucket(who, "requests", rpm)
        post = scope.get("method") == "POST"
        is_gen = scope["path"] in GENERATE_PATHS and post
        counted = scope["path"] in COUNTED_PATHS and post
        tok_b = self._bucket(who, "tokens", tpm) if is_gen or counted else None
        # generation is charged its most tokens before it starts; heavy work once done, by what the
        # worker counted (COST_HEADER), so it only needs the bucket out of debt to start
        cost = generate_cost(body_json(scope)) if is_gen and tok_b is not None else 1 if tok_b is not None else 0
        waits = [(req_b.wait_for(1), "requests") if req_b else (0.0, ""), (tok_b.wait_for(cost), "tokens") if tok_b else (0.0, "")]
        wait, what = max(waits)
        if wait > 0:
            scope["saesteer.reject"] = "rate_limited"
            if math.isinf(wait):
                return await send_error(send, 429, [field_item(
                    ["body", "max_new_tokens"], f"this request's {cost} tokens exceed the {tpm:g} tokens per minute allowed",
                    "rate_limited")])
            limit = rpm if what == "requests" else tpm
            return await send_error(
                send, 429,
                _error("rate_limited", f"over {limit:g} {what} per minute for {who!r}; retry after {math.ceil(wait)} s"),
                {"retry-after": str(max(1, math.ceil(wait)))},
            )
        if req_b:
            req_b.charge(1)
        if tok_b is not None and is_gen:
            tok_b.charge(cost)
        if tok_b is not None and counted:
            send = _charging(send, tok_b)
        await self.app(scope, receive, send)


def _charging(send, bucket: _Bucket):
    """``send`` that charges ``bucket`` the work a response reports in ``COST_HEADER`` (a bucket may
    go into debt: the key's next requests then wait, 429 with ``Retry-After``, until it refills)."""
    name = COST_HEADER.encode()

    async def counted_send(message):
        if message["type"] == "http.response.start":
            for k, v in message.get("headers") or ():
                if k.lower() == name:
                    try:
                        bucket.charge(max(0.0, float(v)))
                    except ValueError:
                        pass
        await send(message)

    return counted_send


class PolicyGuard:
    """403 for a generate request that asks to switch safety policies off (``disable_policies``)
    without a key holding the ``admin`` scope. A server without API keys has no admin, so there
    no caller may: which policies run is the operator's choice, never the body's alone.

    Args:
        app: the ASGI app; runs after the body limit, which buffers the body into
            ``scope["saesteer.body"]``.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in GENERATE_PATHS and scope.get("method") == "POST":
            asked = disabled_policies(body_json(scope))
            key: ApiKey | None = scope.get("saesteer.key")
            if asked and (key is None or "admin" not in key.scopes):
                scope["saesteer.reject"] = "forbidden"
                who = f"key {key.name!r} lacks the admin scope" if key is not None else "this server has no API keys"
                return await send_error(send, 403, [field_item(
                    ["body", "disable_policies"], f"switching safety policies off needs the admin scope; {who}", "forbidden")])
        await self.app(scope, receive, send)


def disabled_policies(d: object) -> list:
    """The ``disable_policies`` a generate body ``d`` (parsed JSON) asks for (empty if none or malformed)."""
    v = d.get("disable_policies") if isinstance(d, dict) else None
    return list(v) if isinstance(v, list) else ([v] if v else [])
