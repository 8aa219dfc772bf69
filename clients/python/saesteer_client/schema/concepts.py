"""Named concepts (``/v1/concepts``), concept search (``POST /v1/concepts/search``) with its
suggested mixes' defaults, and the features read-out (``POST /v1/features``)."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, Field, model_validator

from .common import ChatMessage, _Strict
from .interventions import CONCEPT_NAME, MAX_INTERVENTIONS, LatentIntervention, PositionKind, StoredEdit

DEFAULT_MIX_LATENTS = 128
"""Latents in the mix a concept search suggests (``ConceptSearchMix``): the top 128 latents of the SAE
code difference carry cos 0.78-0.88 of the mean-difference vector on the default SAE."""
DEFAULT_MIX_STRENGTH = 0.5
"""The suggested mix's norm in mean residual norms, at its default positions (the prompt's tokens):
the strength where it steered most answers within the fluency budget on 12 everyday concepts
(0.5 on 6 of them, 0.4 on 4; ``docs/general_sae.md``). Steering every position, 0.25-0.3 is the
useful range: the generated tokens are steered at every step, so less goes further."""
MixSigns = Literal["positive", "both"]
MIX_SIGNS = get_args(MixSigns)
"""Which latents a mix takes: those the concept turns up (``"positive"``), or those it turns up or
down (``"both"``: the SAE's code of the whole mean-difference vector, contrast features subtracted)."""
DEFAULT_MIX_SIGNS = "positive"
"""Adding the concept's latents without subtracting the contrast sentences' own steered more answers
at equal fluency on the default SAE (``docs/general_sae.md``)."""
DEFAULT_MIX_FIT_STEPS = 10
"""Steps that fit a suggested mix's weights to the model's output (``steering.concept_mix.fit_mix``):
the concept's sentences made most likely as answers to neutral chat prompts when the mix steers
their tokens. Fitted, the mix brought concepts into more answers at equal perplexity than the
mean-difference vector on 10 of 12 everyday concepts, though its answers repeat themselves more
(``docs/general_sae.md``). It costs (steps + 1)
forward and steps backward passes over 3 prompts x up to 12 sentences: about 35 s on two CPU cores
for SmolLM2-135M and six sentences, well under a second on a GPU; 0 skips it."""
MAX_MIX_FIT_STEPS = 50
SUGGESTED_REPETITION_PENALTY = 1.2
"""The ``repetition_penalty`` a suggested mix is meant to be decoded with (``ConceptSearchMix``):
the fitted mix's greedy answers tend to loop ("The birds were singing. The birds were singing."),
and 1.2 ended the loops (distinct bigrams 1.00) while keeping the concept; with it the mix was
ahead of the mean-difference vector on 8 of 12 everyday concepts by the strictest fluency count, and
brought 6 of 9 concepts it was never told about into most answers over HTTP (``docs/general_sae.md``)."""
DEFAULT_MIX_POSITIONS = "prompt"
"""Where the suggested mix applies: on the prompt's tokens only, the generated ones then read the
concept from the steered prompt's keys and values. At equal fluency that nearly doubled the concept
rate of both the mix and the mean-difference vector on 12 everyday concepts (``docs/general_sae.md``)."""


class Concept(_Strict):
    """A named concept: the edits that steer it (latents with their values, and/or a vector), saved
    by ``POST /v1/concepts`` and applied by ``{"op": "concept", "concept": name}``. Its edits are
    stored with the default ``positions`` and no ``when``: a request sets those."""

    name: str = Field(pattern=CONCEPT_NAME)
    description: str = Field("", max_length=2000)
    interventions: list[StoredEdit] = Field(min_length=1, max_length=MAX_INTERVENTIONS,
                                            description="latent edits and/or raw vectors, as in /v1/generate")

    @model_validator(mode="after")
    def _plain_edits(self):
        for i, iv in enumerate(self.interventions):
            if iv.positions != "all" or iv.when is not None:
                raise ValueError(f"interventions[{i}]: a concept's edits take no positions or when; "
                                 "give them where the concept is applied")
        return self


class ConceptList(BaseModel):
    concepts: list[Concept]


Sentence = Annotated[str, Field(min_length=1, max_length=2000)]


class ConceptSearchRequest(_Strict):
    """``POST /v1/concepts/search``: which latents stand for a concept given as example sentences
    and/or words (at least one of ``positive`` or ``words``)."""

    positive: list[Sentence] = Field(default_factory=list, max_length=64, description="sentences that carry the concept")
    negative: list[Sentence] = Field(default_factory=list, max_length=64,
                                     description="sentences without it (default: the server's neutral set)")
    words: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=32, description="words naming the concept (their tokens score the output side)")
    sae: str | None = Field(None, min_length=1, max_length=256, description="search this SAE only (default: every attached one)")
    top_k: int = Field(10, ge=1, le=50, description="latents returned, best first")
    mix_latents: int = Field(DEFAULT_MIX_LATENTS, ge=0, le=MAX_INTERVENTIONS,
                             description="latents in each suggested mix (0: no mixes; needs positive sentences)")
    mix_strength: float = Field(DEFAULT_MIX_STRENGTH, gt=0, le=2,
                                description="the suggested mix's norm in mean residual norms at the hook point")
    mix_signs: MixSigns = Field(
        DEFAULT_MIX_SIGNS, description="the mix's latents: those the concept turns up (positive), or up and down (both)")
    mix_positions: PositionKind = Field(
        DEFAULT_MIX_POSITIONS, description="the positions the suggested mix's edits apply at")
    mix_fit_steps: int = Field(DEFAULT_MIX_FIT_STEPS, ge=0, le=MAX_MIX_FIT_STEPS,
                               description="steps fitting the mix's weights to the model's output (0: the contrast weights)")

    @model_validator(mode="after")
    def _something_to_search(self):
        if not self.positive and not self.words:
            raise ValueError("give at least one positive sentence or one word")
        return self


class ConceptSearchHit(BaseModel):
    """One latent found: its scores (``input_score`` in typical activations where the SAE has
    statistics, None without positive sentences; ``output_score`` the logit-lens probability mass on
    the concept's tokens), the tokens its decoder direction promotes, and a ready-to-send clamp."""

    sae: str
    latent: int
    score: float = Field(description="the ranking score: the sum of the scores' robust z-scores within the SAE")
    input_score: float | None
    output_score: float
    top_tokens: list[str]
    suggested: LatentIntervention


class ConceptSearchMix(BaseModel):
    """A mix of latents suggested for the concept on one SAE: the ``mix_latents`` latents whose mean
    code rises most from the negative to the positive sentences (``mix_signs="both"``: rises or falls
    most), each added in proportion to that difference, together adding ``strength`` mean residual
    norms, at the request's ``mix_positions``. ``suggested`` is ready to send as a request's
    interventions; asked with ``mix_positions="all"`` it can also be saved as a named concept (then
    scale it with the concept's ``strength`` and give the positions where it is applied);
    ``mean_diff_cos`` is the cosine of what it adds with the mean-difference vector of the same
    sentences. With ``mix_fit_steps`` > 0 the same latents' weights were then fitted to the model's
    output (``DEFAULT_MIX_FIT_STEPS``); ``fit_nll_start`` and ``fit_nll_end`` are the fit's objective
    (nats per token of the positive sentences as answers) before and after."""

    sae: str
    strength: float
    mean_diff_cos: float
    suggested: list[LatentIntervention]
    fit_steps: int = 0
    fit_nll_start: float | None = None
    fit_nll_end: float | None = None
    repetition_penalty: float = Field(1.0, description="send it as the generate request's repetition_penalty with "
                                      "``suggested``: the decoding the suggestion was measured with "
                                      "(SUGGESTED_REPETITION_PENALTY; 1: none)")


class ConceptSearchResponse(BaseModel):
    latents: list[ConceptSearchHit]
    mixes: list[ConceptSearchMix] = Field(default_factory=list, description="one per searched SAE, when positive "
                                          "sentences were given and mix_latents > 0 (none on a text-to-image server)")


class FeaturesRequest(_Strict):
    """``POST /v1/features``: what an SAE reads at every token of a prompt (and a completion).

    The text is ``prompt`` (raw) or ``messages`` (chat template, assistant turn opened), followed by
    ``completion`` if given; it is run through the model up to the SAE's hook point (no generation).
    """

    prompt: str | None = Field(None, max_length=100_000, description="raw prompt text (no chat template)")
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256, description="chat messages")
    completion: str | None = Field(None, max_length=100_000, description="text appended after the rendered prompt")
    sae: str = Field(min_length=1, description="id of a loaded SAE (see GET /v1/saes)")
    top_k: int = Field(8, ge=0, le=64, description="latents reported per token, largest activation first")
    latents: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, max_length=256, description="latents whose activation is reported at every token"
    )

    @model_validator(mode="after")
    def _prompt_xor_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt is empty")
        return self


class LatentActivation(BaseModel):
    latent: int
    activation: float


class TokenFeatures(BaseModel):
    """One token: its position in the text, id and text, and its top latents (firing ones only,
    largest first). ``sink``: an attention-sink position (position 0, or a massive-activation
    token), outside what the SAE was trained on; its latents are not reported."""

    position: int
    token_id: int
    token: str
    sink: bool = False
    top: list[LatentActivation] = Field(default_factory=list)


class LatentTrace(BaseModel):
    """A requested latent's activation at every token (0 where it does not fire; 0 at sinks)."""

    latent: int
    activations: list[float]


class FeaturesResponse(BaseModel):
    sae: str
    hook_point: str
    prompt_tokens: int = Field(description="tokens of the rendered prompt; the completion's follow")
    tokens: list[TokenFeatures]
    latents: list[LatentTrace] = Field(default_factory=list)
