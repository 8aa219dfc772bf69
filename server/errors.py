"""Error answers: every 4xx body is the wire schema's ``ErrorResponse`` (FastAPI's validation layout,
``{"detail": [{"loc", "msg", "type"}]}``, or ``{"detail": "..."}`` for errors about no one field)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from saesteer_client.schema import ErrorItem
from starlette.responses import JSONResponse

from .middleware import error_body, field_item


def error_response(status: int, detail: Sequence[ErrorItem] | str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A JSON ``ErrorResponse`` with HTTP ``status``; ``detail`` the field errors, or one sentence.
    Messages are cut at ``middleware.MAX_MESSAGE_CHARS`` (an error never echoes a huge input)."""
    return JSONResponse(error_body(detail), status_code=status, headers=dict(headers or {}))


def field_error(status: int, loc: Sequence[str | int], msg: str, kind: str = "value_error") -> JSONResponse:
    """``error_response`` for one field: ``loc`` its location (e.g. ``["path", "latent"]``)."""
    return error_response(status, [field_item(loc, msg, kind)])
