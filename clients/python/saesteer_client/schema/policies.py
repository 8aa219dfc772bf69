"""The server's safety policies on the wire: names to switch off, what fired, what is in force."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

POLICY_NAME = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
PolicyNames = Annotated[list[Annotated[str, Field(pattern=POLICY_NAME)]], Field(max_length=32)]
"""Names of server safety policies (``disable_policies``)."""


class HitToken(BaseModel):
    """One token where a safety policy's detector fired."""

    position: Literal["prompt", "generated"] = Field(description="in the prompt or in the completion")
    index: int = Field(description="the token's index in the prompt tokens or in the completion's tokens")
    score: float = Field(description="the detector's score (a probe's probability, a concept's largest latent activation)")


class PolicyHit(BaseModel):
    """A safety policy that fired on a completion (its prompt or its tokens) and what was done."""

    policy: str
    action: Literal["flag", "steer", "refuse"] = Field(description="flag: reported only; steer: the concept was "
                                                       "steered away from the first hit on; refuse: the completion stops before the first "
                                                       "hit in it (finish_reason content_filter)")
    hits: int = Field(description="tokens over the threshold")
    max_score: float
    tokens: list[HitToken] = Field(description="the first hits (at most 16)")


class PolicyInfo(BaseModel):
    """One of the server's safety policies (``GET /v1/admin/policies``)."""

    name: str
    action: Literal["flag", "steer", "refuse"]
    detector: Literal["concept", "sae_probe", "raw_probe"]
    threshold: float
    watch: list[Literal["prompt", "generated"]]


class PolicyList(BaseModel):
    """The safety policies in force: the policies file's name, how many reloads so far, the policies."""

    file: str | None
    generation: int
    policies: list[PolicyInfo]
