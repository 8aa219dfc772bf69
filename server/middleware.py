"""ASGI middlewares of the HTTP process (request bodies, errors), pure ASGI so they see every
request before FastAPI parses it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from saesteer_client.schema import ErrorItem, ErrorResponse

GENERATE_PATHS = frozenset({"/v1/generate", "/v1/chat/completions", "/v1/completions"})
"""The routes that generate tokens: admission control, token rate limits and the generate scope."""

COUNTED_PATHS = frozenset({"/v1/concepts/search", "/v1/features", "/v1/images"})
"""The heavy routes whose work the worker counts once it is done and reports in ``COST_HEADER``:
the token rate limit charges it to the caller's key after the answer (``auth.RateLimitMiddleware``)."""

COST_HEADER = "x-saesteer-cost"
"""Response header with the work a request cost, in token forward passes (a backward pass counted as
two): a concept search's ``search_cost``, the tokens a read-out read, an image request's denoiser
passes at the model's native size (``images_api.image_cost``)."""

MAX_MESSAGE_CHARS = 300
"""Error messages longer than this are cut (with the original length said), so a megabyte-long
field value is never echoed back whole."""


def body_json(scope) -> object:
    """The request body (``scope["saesteer.body"]``, buffered by ``BodyLimitMiddleware``) parsed as
    JSON once per request for every middleware that reads it; ``{}`` if empty, None if not JSON."""
    if "saesteer.json" not in scope:
        try:
            scope["saesteer.json"] = json.loads(scope.get("saesteer.body") or b"{}")
        except (ValueError, TypeError):
            scope["saesteer.json"] = None
    return scope["saesteer.json"]


def short(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters, cut)"


def error_body(detail: Sequence[ErrorItem] | str) -> dict:
    """The JSON of the wire schema's ``ErrorResponse``: ``detail`` the field errors (FastAPI's
    ``{"loc", "msg", "type"}`` layout) or one sentence about no one field; every message cut at
    ``MAX_MESSAGE_CHARS``. Every 4xx/503 body of the server is built here."""
    if isinstance(detail, str):
        detail = short(detail)
    else:
        detail = [item.model_copy(update={"msg": short(item.msg)}) for item in detail]
    return ErrorResponse(detail=detail).model_dump(mode="json")


def field_item(loc: Sequence[str | int], msg: str, kind: str = "value_error") -> ErrorItem:
    """One ``ErrorItem``: ``loc`` the field's location (e.g. ``["header", "authorization"]``)."""
    return ErrorItem(loc=list(loc), msg=msg, type=kind)


async def send_error(send, status: int, detail: Sequence[ErrorItem] | str, headers: Mapping[str, str] | None = None) -> None:
    """Answer an ASGI request with HTTP ``status`` and an ``ErrorResponse`` body (``error_body``)."""
    await send_json(send, status, error_body(detail), headers)


async def send_json(send, status: int, body: dict, headers: Mapping[str, str] | None = None) -> None:
    """Answer an ASGI request with a JSON body."""
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


class BodyLimitMiddleware:
    """413 for a request body over ``max_bytes``, whether it declares a Content-Length or arrives
    chunked (LitServe's own limit raises inside FastAPI's body parsing, which turns a chunked
    overflow into a 400). The body is read here, up to the limit, and replayed to the app.

    Args:
        app: the ASGI app.
        max_bytes: the largest body accepted, in bytes.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = [field_item(["body"], f"request body is over {self.max_bytes} bytes", "too_large")]
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > self.max_bytes:
                        scope["saesteer.reject"] = "too_large"
                        return await send_error(send, 413, too_large, {"connection": "close"})
                except ValueError:
                    return await send_error(send, 400, [field_item(["header", "content-length"], "not an integer")])
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                scope["saesteer.reject"] = "too_large"
                return await send_error(send, 413, too_large, {"connection": "close"})
            chunks.append(body)
            more = msg.get("more_body", False)
        replayed = False
        whole = b"".join(chunks)

        scope["saesteer.body"] = whole  # for the middlewares inside this one

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)
