"""saesteer client SDK: the wire schema and HTTP clients (httpx + pydantic only)."""

from .client import AsyncClient, Client, SaesteerError, ablate, add, add_vector, clamp, concept, scale, when
from .schema import (
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Concept,
    ConceptIntervention,
    DoneEvent,
    ErrorEvent,
    Condition,
    FeaturesRequest,
    FeaturesResponse,
    ImagesRequest,
    ImagesResponse,
    GenerateRequest,
    GenerateResponse,
    LatentInfo,
    LatentIntervention,
    PolicyHit,
    PolicyList,
    SAEInfo,
    TokenEvent,
    Usage,
    VectorIntervention,
)

__all__ = [
    "AsyncClient", "Client", "SaesteerError", "ablate", "add", "add_vector", "clamp", "concept", "scale", "when",
    "Concept", "ConceptIntervention",
    "Completion", "Condition", "FeaturesRequest", "FeaturesResponse", "ImagesRequest", "ImagesResponse", "GenerateRequest", "GenerateResponse", "LatentInfo", "LatentIntervention", "SAEInfo", "Usage",
    "VectorIntervention", "ChatCompletionRequest", "CompletionRequest", "TokenEvent", "DoneEvent", "ErrorEvent",
    "PolicyHit", "PolicyList",
]
__version__ = "0.1.0"
