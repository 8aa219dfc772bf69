"""Admission and deadlines for ``POST /v1/generate`` in the HTTP process (pure ASGI middleware).

- a bounded queue: past ``max_queue`` requests in flight (queued or generating), 503 with
  ``Retry-After`` at once instead of a late 504;
- draining (after SIGTERM): new requests on any route but /health and /ready get 503 with
  ``Retry-After``;
- a request whose inference worker died ends with 503 within seconds (LitServe leaves it
  waiting forever): the worker's status file lists the fingerprints of the requests it holds;
- a backstop: no request waits longer than its queue and generation limits plus a grace period.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .middleware import GENERATE_PATHS, send_error
from .runtime import SharedState, read_workers, request_fingerprint

log = logging.getLogger("saesteer.server")
POLL_S = 1.0
DRAIN_OPEN = frozenset({"/health", "/ready"})  # still answered while draining (/ready says 503)


def _fingerprint(body: bytes | None) -> str | None:
    from saesteer_client.schema import GenerateRequest

    if not body:
        return None
    try:
        return request_fingerprint(GenerateRequest.model_validate_json(body))
    except Exception:  # invalid: FastAPI answers it with a 422 before it is queued
        return None


class GenerateGate:
    """Admission control and deadlines for the generate route (see the module docstring).

    Args:
        app: the ASGI app.
        state: counters and flags shared with the main process.
        max_queue: generate requests in flight (queued or generating) past which new ones get 503.
        hard_deadline_s: no generate request is held longer than this (503 after).

    A refused or ended request gets ``scope["saesteer.reject"]``: "queue_full", "draining",
    "worker_died" or "deadline" (for metrics and logs).
    """

    def __init__(self, app, state: SharedState, max_queue: int, hard_deadline_s: float):
        self.app, self.state, self.max_queue, self.hard_deadline_s = app, state, max_queue, hard_deadline_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.state.draining.value and scope["path"] not in DRAIN_OPEN:
            scope["saesteer.reject"] = "draining"
            return await send_error(send, 503, "the server is shutting down", {"retry-after": "5"})
        if scope["path"] not in GENERATE_PATHS or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        with self.state.in_flight.get_lock():
            if self.state.in_flight.value >= self.max_queue:
                full = True
            else:
                full = False
                self.state.in_flight.value += 1
        if full:
            scope["saesteer.reject"] = "queue_full"
            return await send_error(send, 503, f"the queue is full ({self.max_queue} requests in flight)",
                                    {"retry-after": "1"})
        try:
            await self._watched(scope, receive, send)
        finally:
            with self.state.in_flight.get_lock():
                self.state.in_flight.value -= 1

    async def _watched(self, scope, receive, send):
        started = swallowed = False
        fp = _fingerprint(scope.get("saesteer.body"))
        arrived = time.time()
        died = "the inference worker holding this request died; it is being restarted, retry shortly"

        async def tracked_send(msg):
            nonlocal started, swallowed
            if swallowed:
                return
            if msg["type"] == "http.response.start":
                started = True
                # where LitServe's monitor saw the death first, it answers a bare 500: say what happened
                if msg["status"] == 500 and fp is not None and self._worker_died_holding(fp, arrived):
                    swallowed = True
                    scope["saesteer.reject"] = "worker_died"
                    return await send_error(send, 503, died, {"retry-after": "5"})
            await send(msg)

        t0 = time.monotonic()
        task = asyncio.ensure_future(self.app(scope, receive, tracked_send))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return task.result()
                if started:
                    continue
                reason = None
                if fp is not None and self._worker_died_holding(fp, arrived):
                    reason, msg = "worker_died", died
                elif time.monotonic() - t0 > self.hard_deadline_s:
                    reason, msg = "deadline", f"no answer within {self.hard_deadline_s:.0f} s"
                if reason:
                    task.cancel()
                    log.error("ending request: %s", msg)
                    scope["saesteer.reject"] = reason
                    return await send_error(send, 503, msg, {"retry-after": "5"})
        finally:
            if not task.done():
                task.cancel()

    def _worker_died_holding(self, fp: str, arrived: float) -> bool:
        """Whether a dead worker held a request with fingerprint ``fp`` that arrived at ``arrived``
        (wall clock): a worker's batch holds only requests that arrived before it started, so a
        client's identical retry after the death is not mistaken for the lost one."""
        return any(not w["alive"] and fp in w.get("requests", ()) and arrived <= w.get("since", 0)
                   for w in read_workers(self.state.runtime_dir))
