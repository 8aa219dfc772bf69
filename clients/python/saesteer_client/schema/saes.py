"""The loaded SAEs and their latents (``GET /v1/saes``, ``GET /v1/saes/{sae}/latents/{latent}``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class SAEInfo(BaseModel):
    """One loaded SAE, as listed by ``GET /v1/saes``."""

    id: str
    hook_point: str
    architecture: str
    d_in: int
    d_sae: int
    k: float | None = None
    model_name: str = ""
    source: str = ""
    latent_stats: bool = Field(False, description="statistics saved with the SAE: unit 'typical' and GET .../latents/{i} work")


class SAEList(BaseModel):
    saes: list[SAEInfo]


class LatentContext(BaseModel):
    """A top activating context: ``text`` with the activating token marked ``«token»``."""

    activation: float
    text: str
    token: str


class LatentInfo(BaseModel):
    """``GET /v1/saes/{sae}/latents/{latent}``: what a latent does, from the SAE's statistics.

    ``typical_activation`` (mean when it fires) is the unit of ``"unit": "typical"`` strengths.
    """

    sae: str
    latent: int
    frequency: float = Field(description="fraction of tokens where it fires")
    typical_activation: float
    max_activation: float
    contexts: list[LatentContext] = Field(default_factory=list, description="top activating contexts, best first")
    output_score: float | None = Field(None, description="how strongly adding its decoder direction promotes its own top "
                                       "tokens (Arad et al. 2025), where saved with the SAE")
    top_tokens: list[str] = Field(default_factory=list, description="the tokens its decoder direction promotes most "
                                  "(logit lens), where saved with the SAE")
