"""Building and running the saesteer server: ``build_server(settings)`` and ``saesteer serve``.

A text server runs two inference workers: the text worker (``text_worker.TextWorker``: one engine
over one copy of the weights, behind every text route) and, unless ``features`` is off, the search
worker (``search_worker.SearchAPI``: concept search, which loads its own model copy on first use).
Routes: ``POST /v1/generate`` (JSON, or SSE with ``stream: true``), ``POST /v1/features``, the
OpenAI-compatible ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``
(``routes``), ``POST /v1/concepts/search``; or for a text-to-image model ``POST /v1/images``
(``ImagesAPI``) alone. Beside them ``GET /v1/saes`` (metadata read at start in the API process;
which SAEs a worker holds resident is not listed, that lives in the worker),
``GET /v1/saes/{sae_id}/latents/{latent}`` (a latent's statistics and top contexts, read from the
SAE's folder on first use, the last few SAEs' kept),
``GET /health`` (LitServe's), ``GET /ready`` (503 while loading, draining or stuck),
``GET /metrics`` (Prometheus; admin scope). With API keys configured (``server.auth``) every route but
``/health`` and ``/ready`` needs ``Authorization: Bearer <key>`` with the route's scope (``/docs``
and ``/openapi.json`` too, and the OpenAPI schema declares the scheme); bodies over
``max_payload_bytes`` get 413, chunked or not.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from functools import lru_cache

import litserve as ls
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from saesteer_client.schema import ErrorItem, LatentInfo, PolicyInfo, PolicyList, SAEList
from starlette.responses import JSONResponse, Response

from saesteer.sae.model import LatentRangeError, check_latent
from saesteer.sae.sources import parse_sae_spec
from saesteer.sae.output_scores import load_latent_output
from saesteer.sae.stats import latent_record, load_latent_stats
from saesteer.steering.policy import PolicyError, load_policies
from saesteer.steering.pool import SAEPool

from .auth import OPEN_PATHS, SCOPES, ApiKey, AuthMiddleware, PolicyGuard, RateLimitMiddleware, hash_key, load_keys_file
from .config import ServerSettings, settings_from_args
from .errors import error_response, field_error
from .search_worker import SearchAPI, install_search
from .gate import GenerateGate
from .concepts import ConceptStore
from .concepts import install as install_concepts
from .images_api import ImagesAPI
from .routes import HideInternal
from .routes import install as install_routes
from .text_worker import TEXT_PATH, TextWorker
from .middleware import BodyLimitMiddleware, short
from .observe import Metrics, ObserveMiddleware, readiness
from .runtime import PolicyReload, SharedState, share_worker_metrics

log = logging.getLogger("saesteer.server")


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


def all_keys(settings: ServerSettings) -> list[ApiKey]:
    """The configured API keys: ``api_keys``, ``api_keys_file``'s, and ``api_key`` (hashed, every scope).

    Raises:
        FileNotFoundError, ValueError: an unreadable or malformed keys file.
    """
    keys = list(settings.api_keys)
    if settings.api_keys_file:
        keys += load_keys_file(settings.api_keys_file)
    if settings.api_key is not None:
        keys.append(ApiKey(name="default", sha256=hash_key(settings.api_key.get_secret_value()), scopes=list(SCOPES)))
    return keys


def build_server(settings: ServerSettings) -> ls.LitServer:
    """A ready ``LitServer`` for ``settings`` (SAE metadata checked now, weights loaded in workers).

    The server gets ``saesteer_state`` (``runtime.SharedState``: the runtime folder of worker
    status files, in-flight count, draining flag), which ``serve_cli`` uses to shut down gracefully.

    Raises:
        ValueError, FileNotFoundError, SAEFormatError: an SAE spec that cannot be served
            (``SAEBudgetError``, a ``ValueError``: an SAE bigger than ``sae_memory_mb``), or an
            unreadable or malformed ``api_keys_file``.
    """
    specs = [parse_sae_spec(s) for s in settings.saes]
    pool = SAEPool(specs, budget_bytes=settings.sae_memory_bytes)  # configs only: no weights here
    concepts = ConceptStore(settings.concepts_dir)

    def check_policies():
        """The policies file checked against the SAEs and concepts (PolicyError if it fails)."""
        return load_policies(settings.policies, pool.configs, concepts.get, pool.units.resid_norm)

    policies = check_policies()  # a bad file stops the server here, before any worker starts
    listing = SAEList(saes=pool.infos())
    runtime_dir = settings.runtime_dir or tempfile.mkdtemp(prefix="saesteer-")
    state = SharedState(runtime_dir)
    share_worker_metrics(runtime_dir)  # before LitServe spawns the workers
    # LitServe adds these in order, each around the ones before, so a request meets them last to
    # first: request id/metrics/log, auth, the body limit (which buffers the body), rate limits
    # (which read the key and the body), then the generate gate
    hard_deadline = settings.request_timeout + settings.generation_timeout + 60
    keys = all_keys(settings)
    metrics = Metrics(state)
    middlewares: list = [
        (GenerateGate, {"state": state, "max_queue": settings.max_queue, "hard_deadline_s": hard_deadline}),
        (RateLimitMiddleware, {"requests_per_minute": settings.rate_limit_requests_per_minute,
                               "tokens_per_minute": settings.rate_limit_tokens_per_minute}),
        PolicyGuard,
        (BodyLimitMiddleware, {"max_bytes": settings.max_payload_bytes}),
        (AuthMiddleware, {"keys": keys}),
        (ObserveMiddleware, {"metrics": metrics}),
    ]
    if settings.serves_images:
        apis, workers = [ImagesAPI(settings, pool)], {"/v1/images": settings.workers}
    else:
        apis, workers = [TextWorker(settings, pool, runtime_dir)], {TEXT_PATH: 1}
        middlewares.append(HideInternal)  # outermost: the worker's own route is not for clients
        if settings.features:
            apis.append(SearchAPI(settings, pool, runtime_dir))
            workers[SearchAPI.path] = 1
    _no_mcp()
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

    @lru_cache(maxsize=8)
    def output_of(sae_id: str):
        return load_latent_output(pool.folders[sae_id], top_tokens=True)  # None where not computed

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
        extra = {}
        out = output_of(sae_id)
        if out is not None:
            extra = {"output_score": float(out[0].output_score[latent]), "top_tokens": list(out[1].get(latent, []))}
        return LatentInfo(sae=sae_id, **latent_record(stats, latent), **extra)

    server.saesteer_state = state
    stuck_after = settings.generation_timeout + 30

    async def ready():
        ok, body = readiness(state, stuck_after)
        return JSONResponse(body, status_code=200 if ok else 503)

    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    server.app.add_api_route("/ready", ready, methods=["GET"], include_in_schema=False)
    server.app.add_api_route("/metrics", prometheus_metrics, methods=["GET"], include_in_schema=False)
    server.app.add_exception_handler(RequestValidationError, validation_error)
    if keys:
        declare_bearer(server.app)
    if settings.serves_images:
        install_search(server.app, "/v1/images")  # before the concepts routes: /v1/concepts/{name} must not take it
    else:
        install_routes(server, settings, runtime_dir, settings.model_id)
    install_concepts(server.app, concepts, pool)
    install_policies(server, settings, policies, check_policies, runtime_dir)
    server.app.add_api_route("/v1/saes", list_saes, methods=["GET"], response_model=SAEList)
    server.app.add_api_route("/v1/saes/{sae_id}/latents/{latent}", latent_info, methods=["GET"], response_model=LatentInfo)
    return server


def _no_mcp() -> None:
    """Turn LitServe's MCP connector off: we declare no MCP tools, and LitServe 0.2.19 starts the
    connector when the ``mcp`` package is installed but imports its classes only with ``fastmcp``
    (vLLM installs ``mcp`` alone: the server would stop with ``NameError: MCPServer``)."""
    import litserve.server

    litserve.server._MCP_AVAILABLE = False


def install_policies(server, settings: ServerSettings, policies, check, runtime_dir: str) -> None:
    """``GET /v1/admin/policies`` (the policies in force) and ``POST /v1/admin/policies/reload``
    (check the file again; if it passes, tell the workers to reload it; if not, 422 naming the
    field and the old policies stay), both admin scope; ``server.saesteer_reload_policies()`` does
    the same for SIGHUP."""
    current = {"set": policies, "generation": 0}
    lock = threading.Lock()

    def listing() -> PolicyList:
        return PolicyList(file=os.path.basename(settings.policies) if settings.policies else None,
                          generation=current["generation"],
                          policies=[PolicyInfo(name=p.spec.name, action=p.spec.action, detector=p.spec.detector.kind,
                                               threshold=p.spec.threshold, watch=list(p.spec.watch))
                                    for p in current["set"].policies])

    def reload() -> PolicyList:
        with lock:
            fresh = check()  # PolicyError: the old policies stay
            current["set"], current["generation"] = fresh, current["generation"] + 1
            PolicyReload(runtime_dir).send(current["generation"])
            log.warning("policies reloaded (generation %d): %s", current["generation"], ", ".join(fresh.names()) or "none")
            return listing()

    def get_policies():
        return listing()

    def post_reload():  # sync: FastAPI runs it in a thread (file reads)
        if not settings.policies:
            return field_error(409, ["policies"], "this server runs without a policies file (--policies)", "no_policies")
        try:
            return reload()
        except PolicyError as e:
            return field_error(422, ["policies_file", *e.loc], e.msg, "bad_policies")

    server.saesteer_reload_policies = reload
    server.app.add_api_route("/v1/admin/policies", get_policies, methods=["GET"], response_model=PolicyList)
    server.app.add_api_route("/v1/admin/policies/reload", post_reload, methods=["POST"])


def serve_cli(args) -> int:
    """``saesteer serve``: validate settings, build the server, run until interrupted."""
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
        server = build_server(settings)
    except PolicyError as e:
        print(f"saesteer serve: policies file {settings.policies!r}: {e}; not starting unprotected", file=sys.stderr)
        return 2
    except (ValidationError, ValueError, FileNotFoundError) as e:
        print(f"saesteer serve: {e}", file=sys.stderr)
        return 2
    print(f"saesteer: serving on http://{settings.host}:{settings.port} "
          f"(SAEs: {', '.join(parse_sae_spec(s).id for s in settings.saes)})", flush=True)
    install_graceful_shutdown(server, settings.drain_timeout)
    if settings.policies:
        def on_sighup(signum, frame):
            def run():
                try:
                    server.saesteer_reload_policies()
                except PolicyError as e:
                    log.error("SIGHUP: policies not reloaded, the previous ones stay: %s", e)
            threading.Thread(target=run, name="saesteer-reload", daemon=True).start()

        signal.signal(signal.SIGHUP, on_sighup)
    access = logging.getLogger("saesteer.access")  # one JSON object per line, on stderr
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    try:
        # one HTTP process for all workers: admission counters, rate limits and metrics are then
        # exact; our JSON access log replaces uvicorn's
        server.run(host=settings.host, port=settings.port, generate_client_file=False, num_api_servers=1, access_log=False)
    finally:
        if settings.runtime_dir is None:
            shutil.rmtree(server.saesteer_state.runtime_dir, ignore_errors=True)
    return 0


def install_graceful_shutdown(server: ls.LitServer, drain_timeout: float) -> None:
    """On SIGTERM: refuse new requests with 503, wait up to ``drain_timeout`` seconds for the
    ones in flight, then let LitServe stop the HTTP process and every inference worker.

    Without this, SIGTERM kills only the main process and its children keep serving the port
    with nobody to restart them (measured on LitServe 0.2.19).
    """
    state = server.saesteer_state
    # the HTTP process has drained already when it is told to stop: a short grace for open sockets
    server.uvicorn_graceful_timeout = 5

    def drain():
        t0 = time.monotonic()
        while state.in_flight.value > 0 and time.monotonic() - t0 < drain_timeout:
            time.sleep(0.1)
        left = state.in_flight.value
        log.warning("drained in %.1f s (%d requests still in flight); stopping", time.monotonic() - t0, left)
        while getattr(server, "_shutdown_event", None) is None:  # SIGTERM during start-up
            time.sleep(0.1)
        server._shutdown_event.set()

    main_pid = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != main_pid:  # a child forked after this (LitServe's manager): die as usual
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if state.draining.value:
            return
        state.draining.value = 1
        print("saesteer: SIGTERM, draining", flush=True)
        threading.Thread(target=drain, name="saesteer-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
