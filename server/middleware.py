"""ASGI middlewares of the HTTP process (request bodies, errors), pure ASGI so they see every
request before FastAPI parses it."""

from __future__ import annotations

import json

MAX_MESSAGE_CHARS = 300
"""Error messages longer than this are cut (with the original length said), so a megabyte-long
field value is never echoed back whole."""


def short(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters, cut)"


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
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
        too_large = {"detail": [{"loc": ["body"], "msg": f"request body is over {self.max_bytes} bytes", "type": "too_large"}]}
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > self.max_bytes:
                        return await send_json(send, 413, too_large, {"connection": "close"})
                except ValueError:
                    return await send_json(send, 400, {"detail": "bad Content-Length"})
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await send_json(send, 413, too_large, {"connection": "close"})
            chunks.append(body)
            more = msg.get("more_body", False)
        replayed = False
        whole = b"".join(chunks)

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)
