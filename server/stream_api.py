"""The continuously batched, streaming LitAPI: ``/v1/generate`` with ``stream: true`` and the
OpenAI-compatible routes ride it (``server/routes.py`` feeds it; its own path is internal).

LitServe 0.2.19's ``ContinuousBatchingLoop`` calls ``add_request`` for each request it takes from
the queue (on its event-loop thread) and ``step`` in a worker thread, and sends each ``Output`` of
``step`` to its request's stream. Here ``add_request`` only queues; ``step`` admits queued requests
into the ``steering.engine.ContinuousBatch`` (a prefill each, steered by its own plan), decodes one
token for every running row, and turns the rows' events into the stream's events (``TokenEvent``,
then ``DoneEvent`` or ``ErrorEvent``; the schema's). So a short request that arrives behind a long
one starts at the next step and leaves when it is done.

A request that cannot be served (unknown SAE, latent out of range, too many tokens, ...) gets one
``ErrorEvent`` with the 4xx it would get from ``/v1/generate``, which the HTTP side turns into
that status (nothing was streamed yet). A client that goes away: the HTTP process writes
``<runtime_dir>/cancel/<uid>``, and the row leaves at the next step.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's real annotation.
import asyncio
import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop, Output
from litserve.utils import LitAPIStatus
from saesteer_client.schema import DoneEvent, ErrorEvent, GenerateRequest, TokenEvent

from saesteer.steering.pool import SAEPool

from .api import ModelAPI, Prepared, Rejected, response_of, row_failure, row_settings
from .config import ServerSettings
from .runtime import release_free_memory, write_atomic

log = logging.getLogger("saesteer.server")

STREAM_PATH = "/internal/stream"
"""The LitAPI's own route: not served to clients (``routes.HideInternal`` answers 404); the HTTP
process's routes put requests on its queue directly."""
CANCEL_STALE_S = 60.0
"""A cancel file naming no request this worker knows is deleted after this many seconds."""


class SteerLoop(ContinuousBatchingLoop):
    """LitServe's continuous-batching loop, idle without spinning: its own ``run`` returns at once
    when no request is active and the caller loops again straight away (a core at 100%)."""

    async def run(self, lit_api, *args, **kwargs):
        if not lit_api.has_active_requests():
            await asyncio.sleep(0.005)
            return
        await super().run(lit_api, *args, **kwargs)


class _Request:
    """A request admitted: its rows' results as they finish."""

    def __init__(self, prepared: Prepared, roles: list[str]):
        from .runtime import request_fingerprint

        self.prepared, self.roles = prepared, roles
        self.fingerprint = request_fingerprint(prepared.request)
        self.done: dict[str, object] = {}  # role -> final RowEvent


class StreamAPI(ModelAPI):
    """Continuously batched, streamed generation (see the module docstring).

    Args:
        settings: the server settings; ``max_running_rows`` bounds the rows decoded together.
        saes: the SAE pool (as ``ModelAPI``).
        runtime_dir: the server's runtime folder (cancel files).
    """

    def __init__(self, settings: ServerSettings, saes: SAEPool, runtime_dir: str, **kwargs):
        super().__init__(settings, saes, stream=True, max_batch_size=settings.max_running_rows, api_path=STREAM_PATH,
                         loop=SteerLoop(), **kwargs)
        self.runtime_dir = runtime_dir

    def setup(self, device):
        from saesteer.steering.engine import ContinuousBatch

        from .runtime import WorkerStatus

        # the status file every worker keeps: /ready waits for it, and the generate gate answers
        # 503 at once for the requests it held if it dies
        self.status = WorkerStatus(self.runtime_dir)
        self.status.write("loading")
        self._held: list[str] = []
        super().setup(device)
        self.status.write("idle")
        self.engine = ContinuousBatch(self.model, self.tokenizer, self.steerer)
        self.pending: deque = deque()  # (uid, request), filled by add_request on the loop's thread
        self.lock = threading.Lock()
        self.requests: dict[str, _Request] = {}
        self.cancel_dir = Path(self.runtime_dir) / "cancel"
        self.cancel_dir.mkdir(parents=True, exist_ok=True)
        self.counts = {"pid": os.getpid(), "running_rows": 0, "running_requests": 0, "queued": 0, "cancelled_total": 0,
                       "tokens_total": 0}
        self._written_at: float | None = None  # when stream.json was last written
        self._write_status()

    def _write_status(self) -> None:
        """``<runtime_dir>/stream.json``: rows and requests running, queued, cancelled and tokens
        generated so far (read by ``/metrics``), written when the first three change, else at most
        once a second."""
        now = {"running_rows": len(self.engine), "running_requests": len(self.requests), "queued": len(self.pending)}
        same = self._written_at is not None and all(self.counts[k] == v for k, v in now.items())
        if same and time.monotonic() - self._written_at < 1.0:
            return  # token counts alone: at most once a second
        self.counts.update(now)
        write_atomic(Path(self.runtime_dir) / "stream.json", json.dumps(self.counts))
        self._written_at = time.monotonic()

    # -- LitServe's continuous-batching interface ------------------------------------------------
    def decode_request(self, request: GenerateRequest):
        return request  # the loop hands requests to add_request; this gives the route its body type

    def add_request(self, uid: str, request) -> None:
        with self.lock:
            self.pending.append((uid, request))

    def has_capacity(self) -> bool:
        with self.lock:
            return len(self.engine) + len(self.pending) < self.settings.max_running_rows

    def has_active_requests(self) -> bool:
        with self.lock:
            return bool(self.requests) or bool(self.pending)

    def encode_response(self, output):
        return output

    def step(self, prev_outputs) -> list:
        """Cancel, admit, decode one token for every running row; the events, as LitServe
        ``Output``s (a request's last event is followed by its ``FINISH_STREAMING``). Never raises:
        a failure is its rows' error events."""
        out: list = []
        try:
            self._step(out)
        finally:
            if not len(self.engine) and self.counts["running_rows"]:
                release_free_memory()  # the batch has just emptied
            self._write_status()
            held = sorted(r.fingerprint for r in self.requests.values())
            if held != self._held:
                self._held = held
                self.status.write("busy" if held else "idle", held)
        return out

    def _step(self, out: list) -> None:
        self._cancel(out)
        self._admit(out)
        if len(self.engine):
            try:
                events = self.engine.step()
            except Exception as e:
                log.error("decode step failed: %s: %s", type(e).__name__, e, exc_info=e)
                for key in self.engine.keys():
                    self.engine.cancel(key)
                for uid in list(self.requests):
                    self._fail(uid, Rejected.field(500, ["body"], f"generation failed ({type(e).__name__})", "internal_error"), out)
                return
            for ev in events:
                self._event(ev, out)

    # -- the parts of a step -----------------------------------------------------------------------
    def _cancel(self, out: list) -> None:
        try:
            names = os.listdir(self.cancel_dir)
        except OSError:
            return
        for uid in names:
            path = self.cancel_dir / uid
            if uid in self.requests:
                for role in self.requests.pop(uid).roles:
                    self.engine.cancel(f"{uid}|{role}")
                out.append(Output(uid, "", LitAPIStatus.FINISH_STREAMING))
                self.counts["cancelled_total"] += 1
                log.info("request %s cancelled: its client went away", uid)
            else:
                with self.lock:
                    before = len(self.pending)
                    self.pending = deque(p for p in self.pending if p[0] != uid)
                    dropped = len(self.pending) < before
                if dropped:
                    out.append(Output(uid, "", LitAPIStatus.FINISH_STREAMING))
                    self.counts["cancelled_total"] += 1
                else:
                    try:
                        if time.time() - path.stat().st_mtime < CANCEL_STALE_S:
                            continue  # maybe for a request not taken from the queue yet
                    except OSError:
                        continue
            path.unlink(missing_ok=True)

    def _admit(self, out: list) -> None:
        """Move queued requests into the batch: those refused get their error event; the rest
        are prefilled together (one forward), or one by one if that fails, so an exception ends
        only the request that causes it."""
        from saesteer.steering.generate import GenerationSpec

        joining: list[tuple[str, list]] = []  # (uid, [(key, spec)])
        while True:
            with self.lock:
                if not self.pending:
                    break
                uid, request = self.pending[0]
            running = set().union(*(r.prepared.plan.sae_ids() for r in self.requests.values()))
            try:
                prep = self.prepare(request)
            except Exception as e:
                log.error("prepare failed: %s: %s", type(e).__name__, e, exc_info=e)
                prep = Rejected.field(500, ["body"], f"request could not be prepared ({type(e).__name__})", "internal_error")
            if isinstance(prep, Prepared) and self.requests and not self.saes.fits(running | prep.plan.sae_ids()):
                break  # its SAEs do not fit beside the running rows' under the budget: wait for them to leave
            with self.lock:
                self.pending.popleft()
            if isinstance(prep, Rejected):
                self._emit_error(uid, prep, out)
                continue
            r = prep.request
            roles = ["steered"] + (["unsteered"] if r.compare else [])
            self.requests[uid] = _Request(prep, roles)
            deadline = time.monotonic() + self.settings.generation_timeout
            joining.append((uid, [(f"{uid}|{role}", GenerationSpec(
                prep.input_ids, **row_settings(r, deadline), plan=prep.plan if role == "steered" else prep.plain_plan))
                for role in roles]))
        if not joining:
            return
        try:
            events = self.engine.add_many([row for _, rows in joining for row in rows])
        except Exception as e:
            log.warning("prefill of %d requests failed (%s: %s)", len(joining), type(e).__name__, e)
            events = []
            for uid, rows in joining:
                try:
                    if len(joining) == 1:
                        raise e
                    events += self.engine.add_many(rows)  # alone: does this one fail too?
                except Exception as e1:
                    log.error("prefill failed: %s: %s", type(e1).__name__, e1, exc_info=e1)
                    self._fail(uid, Rejected.field(500, ["body"], f"generation failed ({type(e1).__name__}); other "
                                                   "requests were not affected", "internal_error"), out)
        for ev in events:
            self._event(ev, out)

    def _event(self, ev, out: list) -> None:
        uid, role = ev.key.rsplit("|", 1)
        req = self.requests.get(uid)
        if req is None:
            return
        shown = ev.shown_tokens()
        for j, token in enumerate(shown):  # the text rides on the last of them
            self.counts["tokens_total"] += 1
            out.append(Output(uid, TokenEvent(role=role, token=token, text=ev.text if j == len(shown) - 1 else "").model_dump(),
                              LitAPIStatus.OK))
        if ev.finish_reason is None:
            return
        req.done[role] = ev
        if ev.error is not None:
            self._fail(uid, row_failure(ev.error, bool(req.prepared.request.interventions), self.settings), out)
        elif len(req.done) == len(req.roles):
            del self.requests[uid]
            n = len(req.prepared.input_ids)
            results = [_Result(req.done[role], n) for role in req.roles]
            self.record_hits(req.fingerprint, results)
            out.append(Output(uid, DoneEvent(response=response_of(*results)).model_dump(mode="json"), LitAPIStatus.OK))
            out.append(Output(uid, "", LitAPIStatus.FINISH_STREAMING))

    def _fail(self, uid: str, rejected: Rejected, out: list) -> None:
        req = self.requests.pop(uid, None)
        if req is not None:
            for role in req.roles:
                self.engine.cancel(f"{uid}|{role}")
        self._emit_error(uid, rejected, out)

    @staticmethod
    def _emit_error(uid: str, rejected: Rejected, out: list) -> None:
        event = ErrorEvent(status=rejected.status, detail=rejected.detail)
        out.append(Output(uid, event.model_dump(mode="json"), LitAPIStatus.OK))
        out.append(Output(uid, "", LitAPIStatus.FINISH_STREAMING))


class _Result:
    """A finished row as ``api.response_of`` reads it."""

    def __init__(self, ev, prompt_tokens: int):
        self.text, self.tokens, self.finish_reason, self.prompt_tokens = ev.full_text, ev.tokens, ev.finish_reason, prompt_tokens
        self.safety = ev.safety or []
