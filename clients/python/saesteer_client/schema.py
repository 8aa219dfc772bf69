"""The saesteer wire schema: pydantic models of every request and response.

Defined once, here, in the torch-free SDK; the server imports these models. Everything a request
can get wrong without knowing the loaded model is checked here, so the server answers 422 before
the request is queued. Checks that need the model (SAE ids, latent ranges, vector lengths, token
counts) happen in the server and answer with the same error body::

    {"detail": [{"loc": ["body", "interventions", 0, "latent"], "msg": "...", "type": "..."}]}

Steering payloads use ``extra="forbid"``: a misspelled field is a 422, never a silent no-op.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_INTERVENTIONS = 256
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
MAX_POSITIONS = 512
MAX_STOP = 8
MAX_POSITION_INDEX = 2**20 - 1
"""Largest token index a ``positions`` list may name; the server also refuses indices past its
token limit (``max_total_tokens``)."""
MAX_ABS_VALUE = 1e5
"""Largest magnitude of a latent ``value``, a vector element or a ``strength``. Typical latent
activations are O(1-100) and residual norms O(10-1000); anything past this is far outside what a
steer can use, and near float32's range (3.4e38) products of such numbers overflow to inf."""
MIN_TEMPERATURE = 1e-2
"""Smallest non-zero temperature: below it logits / temperature overflow float32 (use 0 for greedy)."""
MIN_TOP_P = 1e-3
"""Smallest top_p; a smaller nucleus is the greedy token."""
MIN_REPETITION_PENALTY = 1e-2
"""Smallest ``repetition_penalty``: it divides positive logits, and below this they overflow as
logits / temperature would (transformers' convention: 1 is off, 1.1-1.3 usual, below 1 favours
repeats)."""
MAX_REPETITION_PENALTY = 10.0
"""Largest ``repetition_penalty``."""
MAX_OPENAI_PENALTY = 2.0
"""Largest magnitude of ``frequency_penalty`` and ``presence_penalty``, as OpenAI's API allows."""

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
BoundedFloat = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]
def _temperature_floor(v: float) -> float:
    if 0 < v < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
    return v


Temperature = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_temperature_floor)]
"""0 (greedy) or at least ``MIN_TEMPERATURE``."""
RepetitionPenalty = Annotated[float, Field(allow_inf_nan=False, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)]
"""transformers' (and vLLM's) repetition penalty, 1 off (``MIN_REPETITION_PENALTY``)."""
OpenAIPenalty = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_OPENAI_PENALTY, le=MAX_OPENAI_PENALTY)]
"""OpenAI's ``frequency_penalty`` or ``presence_penalty``, 0 off."""
PositionKind = Literal["all", "prompt", "generated"]
"""The named kinds of ``Positions``."""
Positions = Union[
    PositionKind,
    Annotated[list[Annotated[int, Field(ge=0, le=MAX_POSITION_INDEX)]], Field(min_length=1, max_length=MAX_POSITIONS)],
]
"""Where an intervention applies, by token index in the rendered prompt + completion:
``all`` (every position but 0), ``prompt`` (prompt positions but 0), ``generated`` (new tokens
only), or an explicit list of indices. Position 0 is the attention sink of most LLMs and is steered
only when listed explicitly."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Condition(_Strict):
    """``when``: apply an intervention only where an SAE latent fires above a threshold.

    The condition is read at each token from the activation the model computes anyway (its SAE's
    hook point, before any edit there), so an edit costs nothing where the concept is absent. The
    condition's hook point must be the edit's or an earlier one (later ones are not computed yet
    when the edit applies). ``mode``: ``token`` applies on exactly the tokens where the latent is
    above ``above``; ``once_fired`` applies from the first such token on, for the rest of the
    sequence. The attention sink (position 0) never fires a condition.
    """

    sae: str = Field(min_length=1, description="id of a loaded SAE whose latent is the condition")
    latent: int = Field(ge=0, description="latent index, 0 <= latent < d_sae")
    above: FiniteFloat = Field(0.0, ge=0.0, description="the latent must exceed this activation")
    unit: Literal["raw", "typical"] = Field("raw", description="above in raw units or in multiples of the typical activation")
    mode: Literal["token", "once_fired"] = Field("token", description="only where it fires, or from its first firing on")


class LatentIntervention(_Strict):
    """An edit of one SAE latent inside the forward pass.

    ops: ``clamp`` sets the latent to ``value``; ``ablate`` sets it to 0; ``scale`` multiplies it by
    ``value``; ``add`` adds ``value`` to it (which adds ``value`` times the latent's decoder
    direction to the hook point). The SAE's reconstruction error is kept, so only the edit
    changes the model.

    ``unit`` says what ``value`` of a clamp or add is measured in: ``raw`` latent units, or
    ``typical``, multiples of the latent's typical activation (its mean activation when it fires,
    from the statistics saved with the SAE; ``saesteer stats``). A scale factor is always raw.
    """

    op: Literal["clamp", "ablate", "scale", "add"] = Field(description="what to do to the latent")
    sae: str = Field(min_length=1, max_length=256, description="id of a loaded SAE (see GET /v1/saes)")
    latent: int = Field(ge=0, description="latent index, 0 <= latent < d_sae")
    value: BoundedFloat | None = Field(
        None, description=f"clamp target, scale factor or added amount, |value| <= {MAX_ABS_VALUE:g}; omitted for ablate")
    unit: Literal["raw", "typical"] = Field("raw", description="value in raw latent units or in multiples of the typical activation")
    positions: Positions = "all"
    when: Condition | None = Field(None, description="apply only where this latent fires (see Condition)")

    @model_validator(mode="after")
    def _value_matches_op(self):
        if self.op == "ablate" and self.value is not None:
            raise ValueError("ablate takes no value")
        if self.op != "ablate" and self.value is None:
            raise ValueError(f"{self.op} needs a value")
        if self.unit == "typical" and self.op not in ("clamp", "add"):
            raise ValueError(f"unit 'typical' applies to clamp and add, not {self.op}")
        return self


class VectorIntervention(_Strict):
    """Add a raw steering vector (d_in floats) times ``strength`` at a hook point.

    The hook point is named directly (``hook``) or as the hook point of a loaded SAE (``sae``).
    With ``unit="resid_norm"`` the vector is first scaled to unit length and ``strength`` is a
    multiple of the mean residual norm at the hook point (from the statistics of an SAE there), so
    0.5 adds half a typical activation's norm whatever the vector's own length.
    """

    op: Literal["add_vector"]
    vector: list[BoundedFloat] = Field(min_length=1, max_length=65536, description=f"d_in floats, each |x| <= {MAX_ABS_VALUE:g}")
    strength: BoundedFloat = Field(1.0, description=f"|strength| <= {MAX_ABS_VALUE:g}; the server also bounds the added vector's norm")
    unit: Literal["raw", "resid_norm"] = Field("raw", description="strength as a plain factor or as a multiple of the residual norm")
    hook: str | None = Field(None, max_length=256, description="hook point, e.g. blocks.10.hook_resid_post")
    sae: str | None = Field(None, max_length=256, description="use this SAE's hook point")
    positions: Positions = "all"
    when: Condition | None = Field(None, description="apply only where this latent fires (see Condition)")

    @model_validator(mode="after")
    def _one_target(self):
        if (self.hook is None) == (self.sae is None):
            raise ValueError("give exactly one of hook or sae")
        if self.unit == "resid_norm" and not any(v != 0 for v in self.vector):
            raise ValueError("a zero vector has no direction to scale to the residual norm")
        return self


CONCEPT_NAME = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
"""A named concept's name: lower-case letters, digits, ``_ . -``; at most 64 characters."""


class ConceptIntervention(_Strict):
    """Apply a named concept (``POST /v1/concepts``): each of its stored edits, with clamp and add
    values and vector strengths multiplied by ``strength`` (scale and ablate as stored), at these
    ``positions`` and under this ``when``."""

    op: Literal["concept"]
    concept: str = Field(pattern=CONCEPT_NAME, description="the name of a saved concept (GET /v1/concepts)")
    strength: BoundedFloat = Field(1.0, description="multiplies the concept's clamp/add values and vector strengths")
    positions: Positions = "all"
    when: Condition | None = Field(None, description="apply only where this latent fires (see Condition)")


Intervention = Annotated[Union[LatentIntervention, VectorIntervention, ConceptIntervention], Field(discriminator="op")]
StoredEdit = Annotated[Union[LatentIntervention, VectorIntervention], Field(discriminator="op")]


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


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class GenerateRequest(_Strict):
    """``POST /v1/generate``: a prompt (or chat messages) and the interventions to apply."""

    prompt: str | None = Field(None, max_length=100_000, description="raw prompt text (no chat template)")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=256, description="chat messages, rendered with the model's chat template"
    )
    max_new_tokens: int = Field(64, ge=1, le=1024)
    temperature: Temperature = Field(0.0, ge=0.0, le=5.0, description=f"0 means greedy; otherwise >= {MIN_TEMPERATURE:g}")
    top_p: FiniteFloat = Field(1.0, ge=MIN_TOP_P, le=1.0, description="nucleus sampling: keep the smallest set of tokens with this much probability")
    repetition_penalty: RepetitionPenalty = Field(1.0, description="transformers' repetition penalty: a token already in "
                                                  "the prompt or the completion has its positive logit divided by it, its "
                                                  "negative one multiplied (1: off)")
    frequency_penalty: OpenAIPenalty = Field(0.0, description="as OpenAI's: subtracted from a token's logit once per "
                                             "earlier occurrence in the completion")
    presence_penalty: OpenAIPenalty = Field(0.0, description="as OpenAI's: subtracted from a token's logit if it occurs "
                                            "in the completion so far")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default_factory=list, max_length=MAX_STOP)
    interventions: list[Intervention] = Field(default_factory=list, max_length=MAX_INTERVENTIONS)
    compare: bool = Field(False, description="also return the unsteered completion for the same seed")
    ignore_eos: bool = Field(False, description="generate max_new_tokens even past the end-of-sequence token "
                             "(benchmarks, load tests)")
    stream: bool = Field(False, description="answer with server-sent events as tokens are generated: `token` "
                         "events, then one `done` event holding the whole response (or one `error` event)")
    disable_policies: PolicyNames = Field(default_factory=list, description="safety policies to switch off for "
                                          "this request; only a key with the admin scope may (else 403)")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v):
        if v is not None and not v.strip():
            raise ValueError("prompt is empty")
        return v

    @model_validator(mode="after")
    def _prompt_xor_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        seen: dict[tuple[str, int], int] = {}
        for i, iv in enumerate(self.interventions):
            if isinstance(iv, LatentIntervention):
                key = (iv.sae, iv.latent)
                if key in seen:
                    raise ValueError(
                        f"interventions {seen[key]} and {i} both edit latent {iv.latent} of SAE {iv.sae!r}; merge them"
                    )
                seen[key] = i
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "content_filter"]
"""Why a completion ended: EOS or a stop string, ``max_new_tokens``, or a ``refuse`` safety policy."""


class Completion(BaseModel):
    """One generated continuation. ``tokens`` are the generated token ids (a stop string is cut
    from ``text`` but its tokens stay in ``tokens``)."""

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    safety: list[PolicyHit] = Field(default_factory=list, description="the server's safety policies that fired")


class GenerateResponse(Completion):
    usage: Usage
    unsteered: Completion | None = Field(None, description="with compare: the completion without interventions")


class TokenEvent(BaseModel):
    """A streamed token (``event: token``): its id and the text it adds (text may lag a token behind
    while a character's bytes or a possible stop string are incomplete)."""

    type: Literal["token"] = "token"
    role: Literal["steered", "unsteered"] = Field("steered", description="with compare, which completion")
    token: int
    text: str


class DoneEvent(BaseModel):
    """The last event of a stream that succeeded (``event: done``): the whole response, as the
    non-streamed request would have returned it."""

    type: Literal["done"] = "done"
    response: GenerateResponse


class ErrorEvent(BaseModel):
    """The last event of a stream that failed after it started (``event: error``): the HTTP status
    it would have had and the error body's ``detail``."""

    type: Literal["error"] = "error"
    status: int
    detail: list[ErrorItem] | str


StreamEvent = Annotated[Union[TokenEvent, DoneEvent, ErrorEvent], Field(discriminator="type")]


# -- OpenAI-compatible requests and responses (POST /v1/chat/completions, /v1/completions) --------
class _OpenAIRequest(BaseModel):
    """Fields shared by the OpenAI-compatible requests. Unknown OpenAI fields (``user``,
    ``logit_bias``, ...) are accepted and ignored, as OpenAI-compatible servers do; ``steering``
    carries saesteer's interventions (the ``openai`` client sends it through ``extra_body``)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256, description="the served model's id (GET /v1/models)")
    temperature: Temperature = Field(1.0, ge=0.0, le=2.0, description=f"0 means greedy; otherwise >= {MIN_TEMPERATURE:g}")
    top_p: FiniteFloat = Field(1.0, ge=MIN_TOP_P, le=1.0)
    frequency_penalty: OpenAIPenalty = 0.0
    presence_penalty: OpenAIPenalty = 0.0
    repetition_penalty: RepetitionPenalty = Field(1.0, description="not OpenAI's: transformers' and vLLM's (1: off)")
    ignore_eos: bool = Field(False, description="not OpenAI's: vLLM's; generate max_tokens even past the "
                             "end-of-sequence token (benchmarks)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Union[Annotated[str, Field(min_length=1, max_length=256)],
                list[Annotated[str, Field(min_length=1, max_length=256)]], None] = Field(None, description="up to 8 stop strings")
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="completions per request: 1")
    steering: list[Intervention] = Field(default_factory=list, max_length=MAX_INTERVENTIONS,
                                         description="saesteer interventions, as in POST /v1/generate")
    disable_policies: PolicyNames = Field(default_factory=list, description="as in POST /v1/generate (admin scope)")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_OpenAIRequest):
    """``POST /v1/chat/completions`` (OpenAI's chat completions, text content only)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1024, description="deprecated by OpenAI; max_completion_tokens wins")
    max_completion_tokens: int | None = Field(None, ge=1, le=1024, description="default 64")


class CompletionRequest(_OpenAIRequest):
    """``POST /v1/completions`` (OpenAI's legacy completions: a raw prompt, no chat template)."""

    prompt: str = Field(min_length=1, max_length=100_000)
    max_tokens: int = Field(16, ge=1, le=1024)


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    safety: list[PolicyHit] | None = Field(None, description="saesteer: the safety policies that fired (absent if none)")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    safety: list[PolicyHit] | None = Field(None, description="saesteer, on the last chunk: the safety policies that fired")


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class TextCompletion(BaseModel):
    """A completion, or (``usage`` None) one streamed chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None
    safety: list[PolicyHit] | None = Field(None, description="saesteer: the safety policies that fired (absent if none)")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "saesteer"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


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
    width: int | None = Field(None, ge=8, le=1024, multiple_of=8)
    height: int | None = Field(None, ge=8, le=1024, multiple_of=8)
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


class ErrorItem(BaseModel):
    loc: list[Union[str, int]]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Body of every 4xx answer (FastAPI's validation layout, also used for the server's own checks)."""

    detail: list[ErrorItem] | str

ErrorEvent.model_rebuild()
