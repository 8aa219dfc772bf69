"""Building and running the saesteer server: ``build_server(settings)`` and ``saesteer serve``.

Routes: ``POST /v1/generate`` (``GenerateAPI``), ``POST /v1/features`` (``FeaturesAPI``, unless
``features`` is off), or for a text-to-image model ``POST /v1/images`` (``ImagesAPI``) alone,
``GET /v1/saes`` (metadata read at start in the
API process; which SAEs a worker holds resident is not listed, that lives in the worker),
``GET /v1/saes/{sae_id}/latents/{latent}`` (a latent's statistics and top contexts, read from the
SAE's folder on first use, the last few SAEs' kept),
``GET /health`` (LitServe's). With ``api_key`` set every route but ``/health`` needs
``Authorization: Bearer <key>`` (``/docs`` and ``/openapi.json`` too, and the OpenAPI schema
declares the scheme); bodies over ``max_payload_bytes`` get 413, chunked or not.
"""

from __future__ import annotations

import hmac
import logging
import sys
from functools import lru_cache

import litserve as ls
from fastapi.exceptions import RequestValidationError
from saesteer_client.schema import ErrorItem, LatentInfo, SAEList
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import JSONResponse

from saesteer.sae.model import LatentRangeError, check_latent
from saesteer.sae.sources import parse_sae_spec
from saesteer.sae.stats import latent_record, load_latent_stats
from saesteer.steering.pool import SAEPool

from .api import GenerateAPI
from .features_api import FeaturesAPI
from .images_api import ImagesAPI
from .config import ServerSettings, settings_from_args
from .errors import error_response, field_error
from .middleware import BodyLimitMiddleware, short

log = logging.getLogger("saesteer.server")
OPEN_PATHS = frozenset({"/health"})


class BearerAuthMiddleware(BaseHTTPMiddleware):
    """401 unless ``Authorization: Bearer <key>`` matches (constant-time compare)."""

    def __init__(self, app, key: str):
        super().__init__(app)
        self.key = key.encode()

    async def dispatch(self, request, call_next):
        if request.url.path not in OPEN_PATHS:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.key):
                return error_response(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)


async def validation_error(_request, exc: RequestValidationError) -> JSONResponse:
    """422 with ``loc``/``msg``/``type`` per error; the offending input is not echoed (it may be
    NaN, which JSON cannot carry, or megabytes long)."""
    detail = [ErrorItem(loc=[short(x, 100) if isinstance(x, str) else x for x in e.get("loc", ())], msg=str(e.get("msg", "")),
                        type=str(e.get("type", ""))) for e in exc.errors()]
    return error_response(422, detail)


def declare_bearer(app) -> None:
    """Make the app's OpenAPI schema declare the bearer scheme on every route but the open ones."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "the server's API key"}}
            schema["security"] = [{"bearerAuth": []}]
            for path, ops in schema.get("paths", {}).items():
                if path in OPEN_PATHS:
                    for op in ops.values():
                        op["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def build_server(settings: ServerSettings) -> ls.LitServer:
    """A ready ``LitServer`` for ``settings`` (SAE metadata checked now, weights loaded in workers).

    Raises:
        ValueError, FileNotFoundError, SAEFormatError: an SAE spec that cannot be served
            (``SAEBudgetError``, a ``ValueError``: an SAE bigger than ``sae_memory_mb``).
    """
    specs = [parse_sae_spec(s) for s in settings.saes]
    pool = SAEPool(specs, budget_bytes=settings.sae_memory_bytes)  # configs only: no weights here
    listing = SAEList(saes=pool.infos())
    middlewares = [(BodyLimitMiddleware, {"max_bytes": settings.max_payload_bytes})]
    if settings.api_key is not None:
        middlewares.append((BearerAuthMiddleware, {"key": settings.api_key.get_secret_value()}))
    if settings.serves_images:
        apis, workers = [ImagesAPI(settings, pool)], {"/v1/images": settings.workers}
    else:
        apis = [GenerateAPI(settings, pool)]
        workers = {"/v1/generate": settings.workers}
        if settings.features:
            apis.append(FeaturesAPI(settings, pool))
            workers["/v1/features"] = 1
    server = ls.LitServer(
        apis,
        accelerator="cuda" if settings.device.startswith("cuda") else "cpu",
        workers_per_device=workers,
        timeout=settings.request_timeout,
        middlewares=middlewares,
        restart_workers=True,
    )

    async def list_saes() -> SAEList:
        return listing

    @lru_cache(maxsize=8)
    def stats_of(sae_id: str):
        return load_latent_stats(pool.folders[sae_id], contexts=True)

    def latent_info(sae_id: str, latent: int):  # sync: FastAPI runs it in a thread (file reads)
        if sae_id not in pool.configs:
            return field_error(404, ["path", "sae_id"], f"unknown SAE {short(repr(sae_id), 100)}; loaded SAEs: {', '.join(sorted(pool.configs))}", "not_found")
        try:
            check_latent(latent, pool.configs[sae_id].d_sae, sae_id)
        except LatentRangeError as e:
            return field_error(422, ["path", "latent"], str(e))
        stats = stats_of(sae_id)
        if stats is None:
            return field_error(404, ["path", "sae_id"], f"SAE {sae_id!r} has no latent statistics (saesteer stats)", "not_found")
        return LatentInfo(sae=sae_id, **latent_record(stats, latent))

    server.app.add_exception_handler(RequestValidationError, validation_error)
    if settings.api_key is not None:
        declare_bearer(server.app)
    server.app.add_api_route("/v1/saes", list_saes, methods=["GET"], response_model=SAEList)
    server.app.add_api_route("/v1/saes/{sae_id}/latents/{latent}", latent_info, methods=["GET"], response_model=LatentInfo)
    return server


def serve_cli(args) -> int:
    """``saesteer serve``: validate settings, build the server, run until interrupted."""
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
        server = build_server(settings)
    except (ValidationError, ValueError, FileNotFoundError) as e:
        print(f"saesteer serve: {e}", file=sys.stderr)
        return 2
    print(f"saesteer: serving on http://{settings.host}:{settings.port} "
          f"(SAEs: {', '.join(parse_sae_spec(s).id for s in settings.saes)})", flush=True)
    server.run(host=settings.host, port=settings.port, generate_client_file=False)
    return 0
