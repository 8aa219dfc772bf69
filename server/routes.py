"""The text routes, over the text worker (``text_worker.TextWorker``): ``POST /v1/generate``
(JSON, or server-sent events with ``stream: true``), ``POST /v1/features`` (the read-out), and the
OpenAI-compatible ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models``,
streamed or not, with ``steering``.

These handlers run in the HTTP process. They put the request on the text worker's LitServe queue
and read its events back (what LitServe's own streaming handler does), so that they can:
- answer a request refused before its first token with its real status (LitServe's streaming
  route would send 200 and an empty body);
- speak SSE (LitServe streams NDJSON) in our format or OpenAI's;
- tell the worker when the client goes away (LitServe does not notice): a ``Cancel`` note on the
  same queue, and the row leaves the batch at the next step.
Errors after the first byte arrive as a last SSE event (``event: error``, or OpenAI's
``data: {"error": ...}``), never as a silently truncated 200.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

from pydantic import ValidationError
from saesteer_client.schema import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    CompletionRequest,
    ErrorEvent,
    ErrorItem,
    FeaturesRequest,
    FeaturesResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    TextChoice,
    TextCompletion,
)
from starlette.responses import StreamingResponse

from .api import Counted, encoded
from .errors import error_response, field_error
from .middleware import error_body, send_error
from .text_worker import TEXT_PATH, Cancel

log = logging.getLogger("saesteer.server")
DEFAULT_CHAT_TOKENS = 64
WORKER_CHECK_S = 1.0
"""While waiting for a request's next event, how often to check that the text worker lives."""


WORKER_DIED = "the text worker died; it is being restarted, retry shortly"


class HideInternal:
    """404 for the text worker's own LitServe route: clients use the routes of this module."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/internal/"):
            return await send_error(send, 404, "not found")
        await self.app(scope, receive, send)


class TextClient:
    """Submits requests to the text worker and reads their events.

    Args:
        server: the ``LitServer`` (its queues and response buffer, in the HTTP process).
        runtime_dir: the server's runtime folder (the worker's status file).
    """

    def __init__(self, server, runtime_dir: str):
        self.server, self.runtime_dir = server, runtime_dir

    async def events(self, request: GenerateRequest | FeaturesRequest) -> AsyncIterator:
        """The request's events: for a generation ``TokenEvent``s (streamed requests only), then
        ``DoneEvent`` or ``ErrorEvent``; for a read-out its ``FeaturesResponse`` or an
        ``ErrorEvent``. Closed before its last event (the client went away), the worker is told to
        drop the request. If the text worker dies meanwhile, a last ``ErrorEvent`` 503 (LitServe
        restarts it; a stream of LitServe's own would wait forever)."""
        from litserve.utils import LitAPIStatus, ResponseBufferItem

        from .runtime import pid_alive, text_worker_pid

        srv = self.server
        uid = str(uuid.uuid4())
        event = asyncio.Event()
        buffer: deque = deque()
        srv.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=buffer)
        worker = text_worker_pid(self.runtime_dir)
        queue = srv._get_request_queue(TEXT_PATH)
        queue.put((srv.app.response_queue_id, uid, time.monotonic(), request))
        finished = False
        try:
            while not finished:
                try:
                    await asyncio.wait_for(event.wait(), timeout=WORKER_CHECK_S)
                except asyncio.TimeoutError:
                    if worker is not None and not pid_alive(int(worker)):
                        finished = True
                        yield ErrorEvent(status=503, detail=WORKER_DIED)
                    continue
                event.clear()
                while buffer and not finished:
                    data, status = buffer.popleft()
                    if status == LitAPIStatus.ERROR:
                        finished = True
                        if data is None:  # LitServe's monitor saw the worker die before our own check did
                            yield ErrorEvent(status=503, detail=WORKER_DIED)
                        else:
                            yield ErrorEvent(status=getattr(data, "status_code", 503),
                                             detail=str(getattr(data, "detail", "") or "the worker failed; retry"))
                        continue
                    finished = status == LitAPIStatus.FINISH_STREAMING
                    for ev in (data if isinstance(data, list) else [data]):
                        yield ev
        finally:
            srv.response_buffer.pop(uid, None)
            if not finished:
                try:
                    queue.put((srv.app.response_queue_id, uid, time.monotonic(), Cancel(uid)))
                except Exception as e:  # the manager is gone: the server is stopping
                    log.warning("could not cancel %s: %s", uid, e)


async def _first(events: AsyncIterator):
    """(first event, the iterator) or (None, iterator) if it ended at once."""
    try:
        return await events.__anext__(), events
    except StopAsyncIteration:
        return None, events


async def _until_final(first, events: AsyncIterator):
    """``first``, then the rest of ``events`` up to the final one (``done`` or ``error``); a stream
    that ends without one gets a last ``ErrorEvent`` 503."""
    ev = first
    while True:
        yield ev
        if ev.type != "token":
            return
        try:
            ev = await events.__anext__()
        except StopAsyncIteration:
            ev = ErrorEvent(status=503, detail="the stream ended early; retry")


async def _final(first, events: AsyncIterator):
    """The final event of a stream that began with ``first``."""
    last = first
    async for last in _until_final(first, events):
        pass
    return last


def _sse(data: str, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


def _stream(gen: AsyncIterator[str], events: AsyncIterator) -> StreamingResponse:
    async def body():
        try:
            async for chunk in gen:
                yield chunk
        finally:
            await events.aclose()  # a disconnect closes gen first: tell the worker

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


def _refusal(ev, openai: bool = False) -> object:
    """The error response of a request that ended with ``ev`` (an ``ErrorEvent``, or None: no
    answer at all); a 503 (the worker died, or is gone) says when to retry."""
    if ev is None:
        return error_response(503, "the text worker ended the request without an answer; retry", {"retry-after": "5"})
    headers = {"retry-after": "5"} if ev.status == 503 else None
    return error_response(ev.status, _openai_fields(ev.detail) if openai else ev.detail, headers)


_OPENAI_NAMES = {"interventions": "steering", "max_new_tokens": "max_tokens"}


def _openai_fields(detail):
    """Error items of a translated OpenAI request, their ``loc`` in the OpenAI body's names
    (``interventions`` -> ``steering``, ``max_new_tokens`` -> ``max_tokens``)."""
    if isinstance(detail, str):
        return detail
    out = []
    for item in detail:
        loc = list(item.loc)
        if len(loc) > 1 and loc[0] == "body" and loc[1] in _OPENAI_NAMES:
            loc[1] = _OPENAI_NAMES[loc[1]]
        out.append(item.model_copy(update={"loc": loc}))
    return out


def install(server, settings, runtime_dir: str, model_id: str) -> None:
    """Add the text routes to ``server.app`` (the LitServer, before ``run``)."""
    app = server.app
    client = TextClient(server, runtime_dir)
    created = int(time.time())

    def over_token_limit(body, *fields: str):
        """422 for the first of ``body``'s ``fields`` above the server's ``max_new_tokens``, the field
        and message as a bound of the schema's own would give, before the request is queued."""
        limit = settings.max_new_tokens
        for name in fields:
            n = getattr(body, name)
            if n is not None and n > limit:
                return field_error(422, ["body", name], f"Input should be less than or equal to {limit}", "less_than_equal")
        return None

    async def generate(request: GenerateRequest):
        if (bad := over_token_limit(request, "max_new_tokens")) is not None:
            return bad
        first, events = await _first(client.events(request))
        if first is None or first.type == "error":
            return _refusal(first)
        if not request.stream:
            last = await _final(first, events)
            return last.response if last.type == "done" else _refusal(last)

        async def sse():
            async for ev in _until_final(first, events):
                yield _sse(ev.model_dump_json(), ev.type)

        return _stream(sse(), events)

    async def features(request: FeaturesRequest):
        out, events = await _first(client.events(request))
        await events.aclose()
        if not isinstance(out, FeaturesResponse):
            return _refusal(out)
        return encoded(Counted(out, len(out.tokens)))  # one forward over the text read: its tokens

    def check_model(name: str):
        if name != model_id:
            return field_error(404, ["body", "model"], f"model {name[:100]!r} is not served here; GET /v1/models lists "
                               f"{model_id!r}", "model_not_found")
        return None

    def to_generate(body, **fields) -> GenerateRequest | object:
        try:
            return GenerateRequest(temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                   frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                                   repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos,
                                   stop=body.stop_list(), interventions=body.steering, stream=body.stream,
                                   disable_policies=body.disable_policies, **fields)
        except ValidationError as e:
            return error_response(422, _openai_fields([ErrorItem(loc=["body", *err["loc"]], msg=err["msg"], type=err["type"])
                                                       for err in e.errors()]))

    async def openai(body, req: GenerateRequest, chunk_of, final_of):
        first, events = await _first(client.events(req))
        if first is None or first.type == "error":
            return _refusal(first, openai=True)
        if not body.stream:
            last = await _final(first, events)
            return final_of(last.response) if last.type == "done" else _refusal(last, openai=True)

        async def sse():
            head = chunk_of(None, None, start=True)
            if head is not None:
                yield _sse(head)
            async for ev in _until_final(first, events):
                if ev.type == "token":
                    if ev.text:
                        yield _sse(chunk_of(ev.text, None))
                elif ev.type == "done":
                    yield _sse(chunk_of(None, ev.response.finish_reason, safety=ev.response.safety or None))
                    yield _sse("[DONE]")
                else:
                    detail = error_body(_openai_fields(ev.detail))["detail"]  # messages cut, OpenAI's field names
                    message = detail if isinstance(detail, str) else json.dumps(detail)
                    yield _sse(json.dumps({"error": {"message": message, "type": "saesteer_error", "code": ev.status}}))

        return _stream(sse(), events)

    async def chat_completions(body: ChatCompletionRequest):
        if (bad := over_token_limit(body, "max_tokens", "max_completion_tokens") or check_model(body.model)) is not None:
            return bad
        n = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_TOKENS
        req = to_generate(body, messages=body.messages, max_new_tokens=n)
        if not isinstance(req, GenerateRequest):
            return req
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"

        def chunk_of(text, finish, start=False, safety=None):
            delta = ChatDelta(role="assistant", content="") if start else ChatDelta(content=text)
            return ChatCompletionChunk(id=rid, created=int(time.time()), model=model_id, safety=safety, choices=[
                ChatChunkChoice(delta=delta if finish is None else ChatDelta(), finish_reason=finish)]).model_dump_json(exclude_none=True)

        def final_of(r):
            return ChatCompletion(id=rid, created=int(time.time()), model=model_id, usage=r.usage, safety=r.safety or None,
                                  choices=[ChatChoice(message=ChatMessageOut(content=r.text), finish_reason=r.finish_reason)])

        return await openai(body, req, chunk_of, final_of)

    async def completions(body: CompletionRequest):
        if (bad := over_token_limit(body, "max_tokens") or check_model(body.model)) is not None:
            return bad
        req = to_generate(body, prompt=body.prompt, max_new_tokens=body.max_tokens)
        if not isinstance(req, GenerateRequest):
            return req
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"

        def chunk_of(text, finish, start=False, safety=None):
            if start:
                return None
            return TextCompletion(id=rid, created=int(time.time()), model=model_id, safety=safety, choices=[
                TextChoice(text=text or "", finish_reason=finish)]).model_dump_json()

        def final_of(r):
            return TextCompletion(id=rid, created=int(time.time()), model=model_id, usage=r.usage, safety=r.safety or None,
                                  choices=[TextChoice(text=r.text, finish_reason=r.finish_reason)])

        return await openai(body, req, chunk_of, final_of)

    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_id, created=created)])

    responses = {200: {"content": {"text/event-stream": {}}}}
    app.add_api_route("/v1/generate", generate, methods=["POST"], response_model=None,
                      responses={200: {"model": GenerateResponse, "content": {"text/event-stream": {}}}},
                      summary="Steered generation (JSON, or server-sent events with stream: true)")
    if settings.features:
        app.add_api_route("/v1/features", features, methods=["POST"], response_model=FeaturesResponse,
                          summary="An SAE's latents at every token of a prompt (and completion)")
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], response_model=None, responses=responses,
                      summary="OpenAI-compatible chat completions, with saesteer's steering")
    app.add_api_route("/v1/completions", completions, methods=["POST"], response_model=None, responses=responses,
                      summary="OpenAI-compatible completions, with saesteer's steering")
    app.add_api_route("/v1/models", models, methods=["GET"], response_model=ModelList)

