"""saesteer client SDK: the wire schema and HTTP clients (httpx + pydantic only).

The clients and the intervention helpers are here; every model of the wire schema is importable
from here too (``saesteer_client.schema`` lists them by area)."""

from . import schema
from .client import AsyncClient, Client, SaesteerError, ablate, add, add_vector, clamp, concept, scale, when
from .schema import *  # noqa: F403  (the schema's public names, as its __all__ lists them)

__all__ = ["AsyncClient", "Client", "SaesteerError", "ablate", "add", "add_vector", "clamp", "concept", "scale", "when",
           *schema.__all__]
__version__ = "0.1.0"
