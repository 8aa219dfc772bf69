"""The one text worker: every text route runs on one engine in one process, over one copy of the
weights (``POST /v1/generate`` streamed or not, with ``compare``; the OpenAI-compatible routes; the
``POST /v1/features`` read-out). ``server/routes.py`` feeds it; its own LitServe path is internal.

Its loop (``EngineLoop``, ours instead of LitServe's continuous-batching loop) runs in the
worker's main thread, with nothing else running beside the engine's forward passes:

1. take what the queue holds (blocking only while the worker is idle): requests, and ``Cancel``
   notes that the HTTP process puts on the same queue when a client goes away;
2. one ``TextWorker.step``: admit queued requests into the engine (each prefilled under its own
   plan; refused ones get their 4xx), answer read-outs (one forward each, between decode steps),
   decode one token for every running row;
3. send each request what it gained, one message per request per step: streamed requests their
   ``TokenEvent``s, every request its last event (``DoneEvent``, ``ErrorEvent``, or the read-out's
   ``FeaturesResponse``) with LitServe's ``FINISH_STREAMING`` status. A non-streamed request costs
   one message in all, not one per token.

The engine is ``steering.engine.Engine`` (today ``ContinuousBatch``, the built-in one): rows join
and leave at every decode step, so a short request behind a long one starts at the next step.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's real annotation.
import logging
import time
from collections import deque
from dataclasses import dataclass

from litserve.loops.base import LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType
from saesteer_client.schema import (
    DoneEvent,
    ErrorEvent,
    FeaturesRequest,
    FeaturesResponse,
    GenerateRequest,
    LatentActivation,
    LatentTrace,
    TokenEvent,
    TokenFeatures,
)

from saesteer.sae.model import LatentRangeError, check_latent
from saesteer.steering.pool import SAEPool

from .api import ModelAPI, Prepared, Rejected, response_of, row_failure, row_settings
from .config import ServerSettings
from .runtime import release_free_memory, worker_metrics

log = logging.getLogger("saesteer.server")

TEXT_PATH = "/internal/text"
"""The text worker's own LitServe route: not served to clients (``routes.HideInternal`` answers
404); the HTTP process's routes put requests on its queue directly."""
IDLE_WAIT_S = 0.5
"""How long an idle worker blocks on its queue before it looks again (it wakes at once for a request)."""


@dataclass(frozen=True)
class Cancel:
    """A note on the text worker's queue: the client of request ``uid`` went away; drop it."""

    uid: str


class EngineLoop(LitLoop):
    """The text worker's loop (see the module docstring). LitServe calls ``run`` again and again
    in the worker process; one call takes the queue's items and runs one step."""

    def __init__(self):
        super().__init__()
        self.consumers: dict[str, int] = {}  # uid -> the HTTP process's response queue

    def run(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner):
        try:
            self._take(lit_api, request_queue, transport)
            for uid, data, final in lit_api.step():
                consumer = self.consumers.pop(uid, None) if final else self.consumers.get(uid)
                if consumer is not None:
                    status = LitAPIStatus.FINISH_STREAMING if final else LitAPIStatus.OK
                    self.put_response(transport, consumer, uid, data, status, LoopResponseType.STREAMING)
        except Exception as e:  # never let the worker process die of one step
            log.error("text worker loop: %s: %s", type(e).__name__, e, exc_info=e)
            time.sleep(0.1)

    def _take(self, api: "TextWorker", request_queue, transport) -> None:
        block = not api.busy()
        while True:
            item = self.get_request(request_queue, block=block, timeout=IDLE_WAIT_S)
            if item is None:
                return
            block = False
            consumer, uid, queued_at, payload = item
            if isinstance(payload, Cancel):
                if api.cancel(payload.uid):
                    self.consumers.pop(payload.uid, None)
                continue
            self.consumers[uid] = consumer
            # tells LitServe which worker holds the request (it fails them if this worker dies)
            self.put_response(transport, consumer, uid, (), LitAPIStatus.START, LoopResponseType.STREAMING)
            waited = time.monotonic() - queued_at
            if waited > api.request_timeout:
                self.consumers.pop(uid)
                event = ErrorEvent(status=504, detail=f"the request waited {waited:.0f} s in the queue (the server's "
                                   f"request_timeout is {api.request_timeout:g} s); retry later")
                self.put_response(transport, consumer, uid, event, LitAPIStatus.FINISH_STREAMING, LoopResponseType.STREAMING)
                continue
            api.submit(uid, payload)


class _Request:
    """A generation request admitted: its rows' results as they finish."""

    def __init__(self, prepared: Prepared, roles: list[str]):
        self.prepared, self.roles = prepared, roles
        self.stream = prepared.request.stream
        self.done: dict[str, object] = {}  # role -> final RowEvent


class TextWorker(ModelAPI):
    """Continuously batched generation and read-out on one engine (see the module docstring).

    Args:
        settings: the server settings; ``max_running_rows`` bounds the rows decoded together.
        saes: the SAE pool (as ``ModelAPI``).
        runtime_dir: the server's runtime folder (status files).
    """

    def __init__(self, settings: ServerSettings, saes: SAEPool, runtime_dir: str, **kwargs):
        super().__init__(settings, saes, stream=True, max_batch_size=settings.max_running_rows, api_path=TEXT_PATH,
                         loop=EngineLoop(), **kwargs)
        self.runtime_dir = runtime_dir

    engine_worker = True

    def setup(self, device):
        from .runtime import WorkerStatus

        # the status file every worker keeps: /ready waits for it
        self.status = WorkerStatus(self.runtime_dir, role="text")
        self.status.write("loading")
        self._held: list[str] = []
        super().setup(device)
        self.engine = self._engine()
        self.pending: deque = deque()  # (uid, GenerateRequest | FeaturesRequest), in arrival order
        self.requests: dict[str, _Request] = {}
        self.metrics = worker_metrics()
        self._rows_before = 0  # rows running after the last step (when the batch empties, memory is released)
        self._report()
        self.status.write("idle")

    def _engine(self):
        """The ``settings.engine``: the built-in ``ContinuousBatch`` over the model ``setup``
        loaded, or vLLM (``steering.vllm_engine.VllmEngine``) over the exported weights and the SAE specs."""
        s = self.settings
        if s.engine != "vllm":
            from saesteer.steering.engine import ContinuousBatch

            return ContinuousBatch(self.model, self.tokenizer, self.steerer)
        from saesteer.steering.vllm_engine.engine import VllmEngine, vllm_engine_args

        limit = min(s.max_total_tokens, self.max_positions or s.max_total_tokens)
        args = vllm_engine_args(self.vllm_model_dir, s.saes, dtype=s.dtype, device=s.device, max_num_seqs=s.max_running_rows,
                                max_model_len=limit, extra=s.vllm_args)
        engine = VllmEngine(args)
        log.warning("text worker: vLLM engine on %s (%s)", self.vllm_model_dir, ", ".join(f"{k}={v}" for k, v in s.vllm_args.items()) or "default args")
        return engine

    def decode_request(self, request: GenerateRequest):
        return request  # the loop takes requests off the queue itself; this gives the route its body type

    # -- what the loop calls ----------------------------------------------------------------------
    def busy(self) -> bool:
        """Whether anything is running or queued (then the loop does not block on its queue)."""
        return bool(self.requests) or bool(self.pending)

    def submit(self, uid: str, request) -> None:
        """Queue ``request`` (a ``GenerateRequest`` or a ``FeaturesRequest``) as ``uid``."""
        self.pending.append((uid, request))

    def cancel(self, uid: str) -> bool:
        """Drop request ``uid`` (its client went away): its rows leave the batch now. Whether it
        was here."""
        req = self.requests.pop(uid, None)
        if req is not None:
            for role in req.roles:
                self.engine.cancel(f"{uid}|{role}")
            log.info("request %s cancelled: its client went away", uid)
        else:
            before = len(self.pending)
            self.pending = deque(p for p in self.pending if p[0] != uid)
            if len(self.pending) == before:
                return False
        self.metrics.cancelled.inc()
        return True

    def step(self) -> list[tuple[str, object, bool]]:
        """Admit, read out, decode one token for every running row: ``(uid, data, final)`` per
        request that gained something, ``data`` a list of ``TokenEvent`` (streamed requests) or its
        last event. Never raises: a failure is its rows' error events."""
        out: dict[str, list] = {}
        finals: dict[str, object] = {}
        try:
            self._step(out, finals)
        finally:
            if not len(self.engine) and self._rows_before:
                release_free_memory()  # the batch has just emptied
            self._report()
            held = sorted(self.requests)
            if held != self._held:  # since when it has held these: /ready's stuck check
                self._held = held
                self.status.write("busy" if held else "idle")
        msgs = [(uid, tokens, False) for uid, tokens in out.items() if uid not in finals]
        msgs += [(uid, ([*out[uid], last] if uid in out else last), True) for uid, last in finals.items()]
        return msgs

    def _step(self, out: dict, finals: dict) -> None:
        self._admit(out, finals)
        if not len(self.engine):
            return
        try:
            events = self.engine.step()
        except Exception as e:
            log.error("decode step failed: %s: %s", type(e).__name__, e, exc_info=e)
            for key in self.engine.keys():
                self.engine.cancel(key)
            for uid in list(self.requests):
                self._fail(uid, Rejected.field(500, ["body"], f"generation failed ({type(e).__name__})", "internal_error"), finals)
            return
        for ev in events:
            self._event(ev, out, finals)

    # -- the parts of a step -----------------------------------------------------------------------
    def _admit(self, out: dict, finals: dict) -> None:
        """Move queued requests into the batch (read-outs are answered now): those refused get
        their error event; the rest are prefilled together (one forward), or one by one if that
        fails, so an exception ends only the request that causes it."""
        from saesteer.steering.generate import GenerationSpec

        joining: list[tuple[str, list]] = []  # (uid, [(key, spec)])
        rows = len(self.engine)
        while self.pending:
            uid, request = self.pending[0]
            if isinstance(request, FeaturesRequest):
                self.pending.popleft()
                finals[uid] = self._read_out(request)
                continue
            running = set().union(*(r.prepared.plan.sae_ids() for r in self.requests.values()))
            try:
                prep = self.prepare(request)
            except Exception as e:
                log.error("prepare failed: %s: %s", type(e).__name__, e, exc_info=e)
                prep = Rejected.field(500, ["body"], f"request could not be prepared ({type(e).__name__})", "internal_error")
            if isinstance(prep, Rejected):
                self.pending.popleft()
                finals[uid] = _error(prep)
                continue
            roles = ["steered"] + (["unsteered"] if prep.request.compare else [])
            if self.requests and (rows + len(roles) > self.settings.max_running_rows
                                  or not self.saes.fits(running | prep.plan.sae_ids())):
                break  # no room beside the running rows (rows, or SAEs under the budget): wait for some to leave
            self.pending.popleft()
            self.requests[uid] = _Request(prep, roles)
            rows += len(roles)
            deadline = time.monotonic() + self.settings.generation_timeout
            joining.append((uid, [(f"{uid}|{role}", GenerationSpec(
                prep.input_ids, **row_settings(prep.request, deadline), plan=prep.plan if role == "steered" else prep.plain_plan))
                for role in roles]))
        if not joining:
            return
        try:
            events = self.engine.add_many([row for _, rows_ in joining for row in rows_])
        except Exception as e:
            log.warning("prefill of %d requests failed (%s: %s)", len(joining), type(e).__name__, e)
            events = []
            for uid, rows_ in joining:
                try:
                    if len(joining) == 1:
                        raise e
                    events += self.engine.add_many(rows_)  # alone: does this one fail too?
                except Exception as e1:
                    log.error("prefill failed: %s: %s", type(e1).__name__, e1, exc_info=e1)
                    self._fail(uid, Rejected.field(500, ["body"], f"generation failed ({type(e1).__name__}); other "
                                                   "requests were not affected", "internal_error"), finals)
        for ev in events:
            self._event(ev, out, finals)

    def _event(self, ev, out: dict, finals: dict) -> None:
        uid, role = ev.key.rsplit("|", 1)
        req = self.requests.get(uid)
        if req is None:
            return
        shown = ev.shown_tokens()
        self.metrics.tokens.inc(len(shown))
        if req.stream:
            tokens = out.setdefault(uid, [])
            for j, token in enumerate(shown):  # the text rides on the last of them
                tokens.append(TokenEvent(role=role, token=token, text=ev.text if j == len(shown) - 1 else ""))
        if ev.finish_reason is None:
            return
        req.done[role] = ev
        if ev.error is not None:
            self._fail(uid, row_failure(ev.error, bool(req.prepared.request.interventions), self.settings), finals)
        elif len(req.done) == len(req.roles):
            del self.requests[uid]
            n = len(req.prepared.input_ids)
            results = [req.done[role].result(n) for role in req.roles]
            self.record_hits(req.prepared.request, results)
            finals[uid] = DoneEvent(response=response_of(*results))

    def _fail(self, uid: str, rejected: Rejected, finals: dict) -> None:
        req = self.requests.pop(uid, None)
        if req is not None:
            for role in req.roles:
                self.engine.cancel(f"{uid}|{role}")
        finals[uid] = _error(rejected)

    def _read_out(self, request: FeaturesRequest) -> "FeaturesResponse | ErrorEvent":
        """``POST /v1/features``: the SAE's latents at every token, or the request's error event."""
        try:
            job = self._readout_job(request)
            if isinstance(job, Rejected):
                return _error(job)
            ids, prompt_tokens = job
            if self.settings.engine == "vllm":
                return _error(Rejected.field(422, ["body"], "POST /v1/features (latent read-out) is not available on the vLLM "
                                             "engine yet; this server runs --engine vllm", "engine_unsupported"))
            with self.saes.use([request.sae]) as saes:
                out = self.engine.read_out(saes[request.sae], ids, request.top_k, request.latents)
        except Exception as e:
            log.error("read-out failed: %s: %s", type(e).__name__, e, exc_info=e)
            return _error(Rejected.field(500, ["body"], f"read-out failed ({type(e).__name__})", "internal_error"))
        tokens = []
        for t, tid in enumerate(ids):
            sink = bool(out.sink[t])
            top = [] if sink else [
                LatentActivation(latent=int(i), activation=float(v))
                for i, v in zip(out.top_latents[t].tolist(), out.top_values[t].tolist()) if v > 0
            ]
            tokens.append(TokenFeatures(position=t, token_id=tid, token=self.tokenizer.decode([tid]), sink=sink, top=top))
        return FeaturesResponse(
            sae=request.sae, hook_point=self.saes.configs[request.sae].hook_point, prompt_tokens=prompt_tokens, tokens=tokens,
            latents=[LatentTrace(latent=lat, activations=out.traces[j].tolist()) for j, lat in enumerate(request.latents)],
        )

    def _readout_job(self, request: FeaturesRequest) -> "tuple[list[int], int] | Rejected":
        """A read-out's token ids and prompt length, or why it cannot be served (unknown SAE,
        latent out of range, too many tokens, over the SAE memory budget)."""
        at = ["body"]
        if request.sae not in self.saes.configs:
            return Rejected.field(422, at + ["sae"], f"unknown SAE {request.sae!r}; loaded SAEs: {', '.join(sorted(self.saes.configs))}")
        d_sae = self.saes.configs[request.sae].d_sae
        for i, lat in enumerate(request.latents):
            try:
                check_latent(lat, d_sae, request.sae)
            except LatentRangeError as e:
                return Rejected.field(422, at + ["latents", i], str(e))
        extra = self.tokenizer(request.completion, add_special_tokens=False)["input_ids"] if request.completion else []
        ids = self.render(request, len(extra), "completion")
        if isinstance(ids, Rejected):
            return ids
        if len(ids) + len(extra) > self.settings.max_readout_tokens:
            field = "completion" if extra else ("prompt" if request.prompt is not None else "messages")
            return Rejected.field(422, at + [field], f"the text to read is {len(ids) + len(extra)} tokens; this server reads "
                                  f"at most {self.settings.max_readout_tokens} (max_readout_tokens)", "too_many_tokens")
        if not self.saes.fits([request.sae]):
            return Rejected.field(422, at + ["sae"], f"SAE {request.sae!r} does not fit this server's SAE memory budget", "sae_memory")
        return ids + extra, len(ids)

    def _report(self) -> None:
        """The batch's gauges (``runtime.worker_metrics``: rows and requests running, requests
        queued), after each step."""
        self._rows_before = len(self.engine)
        self.metrics.batch_rows.set(self._rows_before)
        self.metrics.running_requests.set(len(self.requests))
        self.metrics.queued.set(len(self.pending))


def _error(rejected: Rejected) -> ErrorEvent:
    return ErrorEvent(status=rejected.status, detail=rejected.detail)
