"""Error bodies: every 4xx answer's ``detail`` (FastAPI's validation layout)."""

from __future__ import annotations

from typing import Union

from pydantic import BaseModel


class ErrorItem(BaseModel):
    loc: list[Union[str, int]]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Body of every 4xx answer (FastAPI's validation layout, also used for the server's own checks)."""

    detail: list[ErrorItem] | str
