"""Generation: ``POST /v1/generate`` and its responses and stream events, the sampling fields'
bounds, and the OpenAI-compatible requests and responses (``/v1/chat/completions``, ``/v1/completions``)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from .common import ChatMessage, FiniteFloat, _Strict
from .errors import ErrorItem
from .interventions import MAX_INTERVENTIONS, Intervention, LatentIntervention
from .policies import PolicyHit, PolicyNames

MAX_STOP = 8
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


class GenerateRequest(_Strict):
    """``POST /v1/generate``: a prompt (or chat messages) and the interventions to apply."""

    prompt: str | None = Field(None, max_length=100_000, description="raw prompt text (no chat template)")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=256, description="chat messages, rendered with the model's chat template"
    )
    max_new_tokens: int = Field(64, ge=1, description="tokens to generate at most; the server bounds it (its "
                                "max_new_tokens setting, 1024 by default, and max_total_tokens with the prompt)")
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
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI; max_completion_tokens wins")
    max_completion_tokens: int | None = Field(None, ge=1, description="default 64; at most the server's "
                                              "max_new_tokens (1024 by default)")


class CompletionRequest(_OpenAIRequest):
    """``POST /v1/completions`` (OpenAI's legacy completions: a raw prompt, no chat template)."""

    prompt: str = Field(min_length=1, max_length=100_000)
    max_tokens: int = Field(16, ge=1, description="at most the server's max_new_tokens (1024 by default)")


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
