"""Admission and deadlines for the generating routes in the HTTP process (pure ASGI middleware).

- a bounded queue: past ``max_queue`` requests in flight (queued or generating), 503 with
  ``Retry-After`` at once instead of a late 504;
- draining (after SIGTERM): new requests on any route but /health and /ready get 503 with
  ``Retry-After``;
- a backstop: no request waits longer than its queue and generation limits plus a grace period.

A request whose text worker dies ends with 503 within a second or two: the routes watch the
worker's pid while they wait (``routes.TextClient``), so nothing here needs to know which request
a worker holds.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .middleware import GENERATE_PATHS, send_error
from .runtime import SharedState

log = logging.getLogger("saesteer.server")
POLL_S = 1.0
DRAIN_OPEN = frozenset({"/health", "/ready"})  # still answered while draining (/ready says 503)


class GenerateGate:
    """Admission control and deadlines for the generate route (see the module docstring).

    Args:
        app: the ASGI app.
        state: counters and flags shared with the main process.
        max_queue: generate requests in flight (queued or generating) past which new ones get 503.
        hard_deadline_s: no generate request is held longer than this (503 after).

    A refused or ended request gets ``scope["saesteer.reject"]``: "queue_full", "draining" or
    "deadline" (for metrics and logs).
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
        started = False

        async def tracked_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        t0 = time.monotonic()
        task = asyncio.ensure_future(self.app(scope, receive, tracked_send))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return task.result()
                if not started and time.monotonic() - t0 > self.hard_deadline_s:
                    task.cancel()
                    msg = f"no answer within {self.hard_deadline_s:.0f} s"
                    log.error("ending request: %s", msg)
                    scope["saesteer.reject"] = "deadline"
                    return await send_error(send, 503, msg, {"retry-after": "5"})
        finally:
            if not task.done():
                task.cancel()
