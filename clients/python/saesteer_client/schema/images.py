"""Text-to-image requests and responses (``POST /v1/images``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from .common import FiniteFloat, _Strict
from .interventions import MAX_INTERVENTIONS, Intervention


class ImagesRequest(_Strict):
    """``POST /v1/images``: a text-to-image request with interventions on the text encoder's SAEs.

    ``branches``: ``both`` adds the steer on the conditional pass and subtracts it on the
    unconditional one (Concept Steerers); ``cond`` or ``uncond`` steers that pass alone. Width,
    height, steps and guidance_scale default to the model's.
    """

    prompt: str = Field(min_length=1, max_length=2_000)
    negative_prompt: str = Field("", max_length=2_000)
    steps: int | None = Field(None, ge=1, le=100, description="denoising steps (default: the model's)")
    guidance_scale: FiniteFloat | None = Field(None, ge=0.0, le=30.0,
                                               description="classifier-free guidance (default: the model's)")
    width: int | None = Field(None, ge=8, multiple_of=8, description="pixels, at most the server's max_image_side "
                              "(default: the model's)")
    height: int | None = Field(None, ge=8, multiple_of=8, description="pixels, at most the server's max_image_side "
                               "(default: the model's)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=8, description="images per request")
    interventions: list[Intervention] = Field(default_factory=list, max_length=MAX_INTERVENTIONS)
    branches: Literal["both", "cond", "uncond"] = "both"
    compare: bool = Field(False, description="also return the unsteered images for the same seed")


class Image(BaseModel):
    b64_png: str = Field(description="a PNG, base64-encoded")


class ImagesResponse(BaseModel):
    images: list[Image]
    unsteered: list[Image] | None = None
