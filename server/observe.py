"""What the operator sees: Prometheus metrics, one JSON log line per request with its request id
(echoed in ``X-Request-ID``), and readiness (``GET /ready``).

The HTTP process's own metrics (requests, latency, rejections, queue depth) live in it alone
(``saesteer serve`` runs one HTTP process for all workers); the workers' metrics (batch rows,
engine tokens, cancels, policy hits) come from their multiprocess files, and readiness from their
status files, both read at scrape time (``server.runtime``).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .runtime import SharedState, WorkerMetricsCollector, read_workers

access_log = logging.getLogger("saesteer.access")
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_LATENT = re.compile(r"^/v1/saes/[^/]+/latents/[^/]+$")
ROUTES = ("/v1/generate", "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/features", "/v1/images", "/v1/concepts", "/v1/concepts/search", "/v1/saes", "/health", "/ready", "/metrics", "/docs", "/openapi.json")


def route_of(path: str) -> str:
    """The route template of ``path`` (bounded label values: never the raw path)."""
    if path in ROUTES:
        return path
    if _LATENT.match(path):
        return "/v1/saes/{sae}/latents/{latent}"
    if path.startswith("/v1/concepts/") and path.count("/") == 3 and path not in ROUTES:
        return "/v1/concepts/{name}"
    return "other"


class Metrics:
    """The server's Prometheus metrics, in their own registry.

    Args:
        state: the shared counters (queue depth is read from ``state.in_flight`` at scrape time).
    """

    def __init__(self, state: SharedState):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("saesteer_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "saesteer_http_request_duration_seconds", "time from request to response", ["route"], registry=r,
            buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
        )
        self.rejections = Counter("saesteer_rejections", "requests refused or ended early, by reason", ["reason"], registry=r)
        self.tokens = Counter("saesteer_generated_tokens", "tokens generated (steered completions; unsteered twins too)", registry=r)
        self.queue = Gauge("saesteer_queue_depth", "generate requests in flight (queued or generating)", registry=r)
        self.queue.set_function(lambda: state.in_flight.value)
        self.ttft = Histogram(
            "saesteer_time_to_first_token_seconds", "streamed requests: time from request to the first token event",
            ["route"], registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
        )
        r.register(WorkerMetricsCollector(state.runtime_dir))


def _request_id(scope) -> str:
    for k, v in scope.get("headers", []):
        if k == b"x-request-id":
            rid = v.decode("latin-1")
            if _ID.match(rid):
                return rid
    return uuid.uuid4().hex


class ObserveMiddleware:
    """Outermost middleware: request id (kept from ``X-Request-ID`` if sane, else new, always
    echoed), metrics, and a JSON access log line per request.

    Args:
        app: the ASGI app.
        metrics: where to count.
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = _request_id(scope)
        scope["saesteer.request_id"] = rid
        t0 = time.perf_counter()
        status = 500
        route = route_of(scope["path"])
        body = bytearray() if route == "/v1/generate" else None

        streamed = False

        async def wrapped(msg):
            nonlocal status, streamed
            if msg["type"] == "http.response.start":
                status = msg["status"]
                streamed = status == 200 and any(k == b"content-type" and v.startswith(b"text/event-stream")
                                                 for k, v in msg.get("headers", []))
                msg = {**msg, "headers": list(msg.get("headers", [])) + [(b"x-request-id", rid.encode())]}
            elif msg["type"] == "http.response.body" and streamed and msg.get("body"):
                # the routes send nothing before the first token exists: the first chunk is its time
                streamed = False
                self.metrics.ttft.labels(route).observe(time.perf_counter() - t0)
            elif msg["type"] == "http.response.body" and body is not None and status == 200 and len(body) < 1 << 20:
                body.extend(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            took = time.perf_counter() - t0
            m = self.metrics
            m.requests.labels(route, scope.get("method", ""), str(status)).inc()
            m.latency.labels(route).observe(took)
            reason = scope.get("saesteer.reject")
            if reason:
                m.rejections.labels(reason).inc()
            tokens = None
            if body:
                try:
                    out = json.loads(bytes(body))
                    tokens = int(out["usage"]["completion_tokens"]) + len((out.get("unsteered") or {}).get("tokens", []))
                    m.tokens.inc(tokens)
                except (ValueError, KeyError, TypeError):
                    pass
            key = scope.get("saesteer.key")
            access_log.info(json.dumps({
                "ts": round(time.time(), 3), "request_id": rid, "method": scope.get("method"), "route": route,
                "path": scope["path"][:200], "status": status, "duration_ms": round(took * 1000, 1),
                "key": key.name if key is not None else None, "reject": reason, "tokens": tokens,
                "client": (scope.get("client") or [None])[0],
            }))


def readiness(state: SharedState, stuck_after_s: float) -> tuple[bool, dict]:
    """Whether the server should get traffic, and why: not draining, at least one worker loaded
    and alive, and none busy on one batch for more than ``stuck_after_s`` seconds."""
    workers = [w for w in read_workers(state.runtime_dir) if w["alive"]]
    now = time.time()
    serving = [w for w in workers if w["state"] in ("idle", "busy") and w.get("role") != "search"]
    stuck = [w["pid"] for w in workers if w["state"] == "busy" and now - w["since"] > stuck_after_s]
    reasons = []
    if state.draining.value:
        reasons.append("draining")
    if not serving:
        reasons.append("no worker loaded" if workers else "no worker running")
    if stuck:
        reasons.append(f"worker(s) {stuck} busy for over {stuck_after_s:.0f} s")
    ok = not reasons
    search = next((w["state"] for w in workers if w.get("role") == "search"), None)
    return ok, {"ready": ok, "workers": {str(w["pid"]): w["state"] for w in workers}, "reasons": reasons,
                "queue_depth": state.in_flight.value,
                # the search worker loads its model copy on the first concept search
                "search_model": None if search is None else ("not loaded" if search == "standby" else
                                                             "loading" if search == "loading" else "loaded")}
