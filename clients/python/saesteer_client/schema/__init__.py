"""The saesteer wire schema: pydantic models of every request and response, by area.

Defined once, here, in the torch-free SDK; the server imports these models. Everything a request
can get wrong without knowing the loaded model or the server's settings is checked here, so the
server answers 422 before the request is queued. Checks that need the model or the settings (SAE
ids, latent ranges, vector lengths, token counts and limits, image sizes) happen in the server and
answer with the same error body::

    {"detail": [{"loc": ["body", "interventions", 0, "latent"], "msg": "...", "type": "..."}]}

Steering payloads use ``extra="forbid"``: a misspelled field is a 422, never a silent no-op.

Modules: ``interventions`` (steering specs), ``generation`` (generate and OpenAI-compatible
requests, sampling, responses, stream events), ``concepts`` (named concepts, concept search,
the features read-out), ``saes``, ``policies``, ``images``, ``errors`` (error bodies) and
``common`` (what they share). Import the names from here: ``from saesteer_client.schema import X``.
"""

from .errors import ErrorItem, ErrorResponse
from .common import ChatMessage, FiniteFloat
from .interventions import (
    CONCEPT_NAME, MAX_ABS_VALUE, MAX_INTERVENTIONS, MAX_POSITIONS, MAX_POSITION_INDEX, BoundedFloat,
    ConceptIntervention, Condition, Intervention, LatentIntervention, PositionKind, Positions, StoredEdit,
    VectorIntervention,
)
from .policies import POLICY_NAME, HitToken, PolicyHit, PolicyInfo, PolicyList, PolicyNames
from .generation import (
    MAX_OPENAI_PENALTY, MAX_REPETITION_PENALTY, MAX_STOP, MIN_REPETITION_PENALTY, MIN_TEMPERATURE,
    MIN_TOP_P, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChatDelta, ChatMessageOut, Completion, CompletionRequest, DoneEvent, ErrorEvent, FinishReason,
    GenerateRequest, GenerateResponse, ModelCard, ModelList, OpenAIPenalty, RepetitionPenalty,
    StreamEvent, Temperature, TextChoice, TextCompletion, TokenEvent, Usage,
)
from .concepts import (
    DEFAULT_MIX_FIT_STEPS, DEFAULT_MIX_LATENTS, DEFAULT_MIX_POSITIONS, DEFAULT_MIX_SIGNS,
    DEFAULT_MIX_STRENGTH, MAX_MIX_FIT_STEPS, MIX_SIGNS, SUGGESTED_REPETITION_PENALTY, Concept,
    ConceptList, ConceptSearchHit, ConceptSearchMix, ConceptSearchRequest, ConceptSearchResponse,
    FeaturesRequest, FeaturesResponse, LatentActivation, LatentTrace, MixSigns, Sentence, TokenFeatures,
)
from .images import Image, ImagesRequest, ImagesResponse
from .saes import LatentContext, LatentInfo, SAEInfo, SAEList

__all__ = [
    "ErrorItem", "ErrorResponse", "ChatMessage", "FiniteFloat", "CONCEPT_NAME", "MAX_ABS_VALUE",
    "MAX_INTERVENTIONS", "MAX_POSITIONS", "MAX_POSITION_INDEX", "BoundedFloat", "ConceptIntervention",
    "Condition", "Intervention", "LatentIntervention", "PositionKind", "Positions", "StoredEdit",
    "VectorIntervention", "POLICY_NAME", "HitToken", "PolicyHit", "PolicyInfo", "PolicyList",
    "PolicyNames", "MAX_OPENAI_PENALTY", "MAX_REPETITION_PENALTY", "MAX_STOP", "MIN_REPETITION_PENALTY",
    "MIN_TEMPERATURE", "MIN_TOP_P", "ChatChoice", "ChatChunkChoice", "ChatCompletion",
    "ChatCompletionChunk", "ChatCompletionRequest", "ChatDelta", "ChatMessageOut", "Completion",
    "CompletionRequest", "DoneEvent", "ErrorEvent", "FinishReason", "GenerateRequest", "GenerateResponse",
    "ModelCard", "ModelList", "OpenAIPenalty", "RepetitionPenalty", "StreamEvent", "Temperature",
    "TextChoice", "TextCompletion", "TokenEvent", "Usage", "DEFAULT_MIX_FIT_STEPS", "DEFAULT_MIX_LATENTS",
    "DEFAULT_MIX_POSITIONS", "DEFAULT_MIX_SIGNS", "DEFAULT_MIX_STRENGTH", "MAX_MIX_FIT_STEPS",
    "MIX_SIGNS", "SUGGESTED_REPETITION_PENALTY", "Concept", "ConceptList", "ConceptSearchHit",
    "ConceptSearchMix", "ConceptSearchRequest", "ConceptSearchResponse", "FeaturesRequest",
    "FeaturesResponse", "LatentActivation", "LatentTrace", "MixSigns", "Sentence", "TokenFeatures",
    "Image", "ImagesRequest", "ImagesResponse", "LatentContext", "LatentInfo", "SAEInfo", "SAEList",
]
