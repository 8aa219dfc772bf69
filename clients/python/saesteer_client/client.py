"""HTTP clients for the saesteer server (httpx + pydantic; no torch).

    from saesteer_client import Client, clamp
    c = Client("http://127.0.0.1:8000")
    r = c.generate(messages=[{"role": "user", "content": "Hi"}],
                   interventions=[clamp("smollm2-135m-res10-k32", 123, 8.0)], compare=True)
    print(r.text, r.unsteered.text)
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, AsyncIterator, Iterator, Sequence, Union

import httpx
from pydantic import TypeAdapter

from .schema import (
    ChatMessage,
    Concept,
    ConceptIntervention,
    ConceptList,
    ConceptSearchHit,
    ConceptSearchMix,
    ConceptSearchRequest,
    ConceptSearchResponse,
    Condition,
    DEFAULT_MIX_LATENTS,
    DEFAULT_MIX_FIT_STEPS,
    DEFAULT_MIX_POSITIONS,
    DEFAULT_MIX_SIGNS,
    DEFAULT_MIX_STRENGTH,
    DoneEvent,
    ErrorEvent,
    FeaturesRequest,
    FeaturesResponse,
    ImagesRequest,
    ImagesResponse,
    GenerateRequest,
    GenerateResponse,
    Intervention,
    LatentIntervention,
    PolicyList,
    SAEInfo,
    LatentInfo,
    SAEList,
    StreamEvent,
    TokenEvent,
    VectorIntervention,
)

_EVENT = TypeAdapter(StreamEvent)
RETRY_STATUSES = frozenset({429, 503})
"""Answers worth retrying: rate limited, queue full, draining, a worker restarting."""


class SaesteerError(RuntimeError):
    """A non-2xx answer. ``status_code`` is the HTTP status, ``detail`` the server's error detail
    (a list of ``{"loc", "msg", "type"}`` for validation errors)."""

    def __init__(self, status_code: int, detail: Any):
        self.status_code, self.detail = status_code, detail
        if isinstance(detail, list):
            msg = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail if isinstance(d, dict))
        else:
            msg = str(detail)
        super().__init__(f"HTTP {status_code}: {msg}")


def when(sae: str, latent: int, above: float = 0.0, unit: str = "raw", mode: str = "token") -> Condition:
    """A condition for an intervention's ``when=``: latent ``latent`` of ``sae`` above ``above``
    (``mode="once_fired"``: from its first firing on). Every helper below takes ``when=``."""
    return Condition(sae=sae, latent=latent, above=above, unit=unit, mode=mode)


def clamp(sae: str, latent: int, value: float, positions="all", unit: str = "raw", when=None) -> LatentIntervention:
    """Set ``latent`` of ``sae`` to ``value`` (``unit="typical"``: ``value`` x its typical activation)."""
    return LatentIntervention(op="clamp", sae=sae, latent=latent, value=value, positions=positions, unit=unit, when=when)


def ablate(sae: str, latent: int, positions="all", when=None) -> LatentIntervention:
    """Set ``latent`` of ``sae`` to 0."""
    return LatentIntervention(op="ablate", sae=sae, latent=latent, positions=positions, when=when)


def scale(sae: str, latent: int, factor: float, positions="all", when=None) -> LatentIntervention:
    """Multiply ``latent`` of ``sae`` by ``factor``."""
    return LatentIntervention(op="scale", sae=sae, latent=latent, value=factor, positions=positions, when=when)


def add(sae: str, latent: int, amount: float, positions="all", unit: str = "raw", when=None) -> LatentIntervention:
    """Add ``amount`` to ``latent`` of ``sae`` (adds its decoder direction times ``amount``;
    ``unit="typical"``: ``amount`` x the latent's typical activation)."""
    return LatentIntervention(op="add", sae=sae, latent=latent, value=amount, positions=positions, unit=unit, when=when)


def concept(name: str, strength: float = 1.0, positions="all", when=None) -> ConceptIntervention:
    """Apply the named concept ``name`` (saved by ``Client.save_concept``), its clamp/add values and
    vector strengths times ``strength``."""
    return ConceptIntervention(op="concept", concept=name, strength=strength, positions=positions, when=when)


def add_vector(vector: Sequence[float], strength: float = 1.0, *, hook: str | None = None, sae: str | None = None,
               positions="all", unit: str = "raw", when=None) -> VectorIntervention:
    """Add ``strength * vector`` (d_in floats) at ``hook`` or at ``sae``'s hook point
    (``unit="resid_norm"``: the unit vector times ``strength`` x the mean residual norm there)."""
    return VectorIntervention(op="add_vector", vector=list(vector), strength=strength, hook=hook, sae=sae,
                              positions=positions, unit=unit, when=when)


def _request(prompt, messages, interventions, kw) -> dict:
    msgs = [m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in messages] if messages is not None else None
    req = GenerateRequest(prompt=prompt, messages=msgs, interventions=list(interventions or []), **kw)
    return req.model_dump(mode="json", exclude_none=True)


def _features_request(sae, prompt, messages, kw) -> dict:
    msgs = [m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in messages] if messages is not None else None
    return FeaturesRequest(sae=sae, prompt=prompt, messages=msgs, **kw).model_dump(mode="json", exclude_none=True)


def _check(r: httpx.Response) -> httpx.Response:
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise SaesteerError(r.status_code, detail)
    return r


def _backoff(r: httpx.Response | None, attempt: int, base: float) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): the server's ``Retry-After`` if it gave
    one, else ``base * 2**attempt``, with up to 25% jitter; at most 60 s."""
    wait = base * 2**attempt
    if r is not None:
        try:
            wait = float(r.headers.get("retry-after", wait))
        except ValueError:
            pass
    return min(60.0, wait * (1 + 0.25 * random.random()))


class _SSE:
    """A server-sent events parser fed one text line at a time: ``feed`` returns an event's data
    when a blank line ends it (comments, ``event:`` and ``id:`` lines are skipped: our events
    carry their type in the data)."""

    def __init__(self):
        self.data: list[str] = []

    def feed(self, line: str) -> str | None:
        if line:
            if line.startswith("data:"):
                self.data.append(line[5:].lstrip(" "))
            return None
        return self.end()

    def end(self) -> str | None:
        data, self.data = self.data, []
        return "\n".join(data) if data else None


def _parse_event(data: str) -> Union[TokenEvent, DoneEvent]:
    ev = _EVENT.validate_json(data)
    if isinstance(ev, ErrorEvent):
        raise SaesteerError(ev.status, [d.model_dump() for d in ev.detail] if isinstance(ev.detail, list) else ev.detail)
    return ev


def _concept_body(name, interventions, description) -> dict:
    return Concept(name=name, description=description, interventions=list(interventions)).model_dump(mode="json", exclude_none=True)


def _search_body(positive, words, negative, sae, top_k, **mix) -> dict:
    return ConceptSearchRequest(positive=list(positive), words=list(words), negative=list(negative), sae=sae,
                                top_k=top_k, **mix).model_dump(mode="json", exclude_none=True)


def _stream_body(prompt, messages, interventions, kw) -> dict:
    return {**_request(prompt, messages, interventions, kw), "stream": True}


class Client:
    """Synchronous client.

    Args:
        url: server base URL, e.g. ``http://127.0.0.1:8000``.
        api_key: bearer token if the server was started with one.
        timeout: seconds per request (generation can take a while on CPU).

    Methods raise ``SaesteerError`` for 4xx/5xx answers and ``pydantic.ValidationError`` for a
    request that the schema refuses before it is sent.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 300.0,
                 transport: httpx.BaseTransport | None = None, retries: int = 3, backoff: float = 0.5):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self.retries, self.backoff = retries, backoff

    def _send(self, method: str, path: str, **kw) -> httpx.Response:
        """One request, retried up to ``retries`` times on 429/503 and on connection errors,
        waiting ``Retry-After`` or an exponential backoff; then ``_check``ed."""
        for attempt in range(self.retries + 1):
            try:
                r = self._http.request(method, path, **kw)
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                if attempt == self.retries:
                    raise
                time.sleep(_backoff(None, attempt, self.backoff))
                continue
            if r.status_code not in RETRY_STATUSES or attempt == self.retries:
                return _check(r)
            time.sleep(_backoff(r, attempt, self.backoff))
        raise AssertionError("unreachable")

    def generate(self, prompt: str | None = None, *, messages: list | None = None,
                 interventions: Sequence[Intervention] | None = None, **kw) -> GenerateResponse:
        """``POST /v1/generate``; ``kw`` are ``GenerateRequest`` fields (max_new_tokens,
        temperature, top_p, repetition_penalty, frequency_penalty, presence_penalty, seed, stop,
        compare)."""
        r = self._send("POST", "/v1/generate", json=_request(prompt, messages, interventions, kw))
        return GenerateResponse.model_validate(r.json())

    def stream(self, prompt: str | None = None, *, messages: list | None = None,
               interventions: Sequence[Intervention] | None = None, **kw) -> Iterator[Union[TokenEvent, DoneEvent]]:
        """``POST /v1/generate`` with ``stream: true``: ``TokenEvent``s as tokens are generated,
        then one ``DoneEvent`` (``.response``, the whole ``GenerateResponse``). Leaving the loop
        early closes the connection, and the server drops the request.

        Raises:
            SaesteerError: a refusal before the first token (retried on 429/503 as ``generate``),
                or an error event after it (the stream's HTTP status was 200 by then).
        """
        body = _stream_body(prompt, messages, interventions, kw)
        for attempt in range(self.retries + 1):
            with self._http.stream("POST", "/v1/generate", json=body) as r:
                if r.status_code in RETRY_STATUSES and attempt < self.retries:
                    wait = _backoff(r, attempt, self.backoff)
                else:
                    if r.status_code >= 400:
                        r.read()
                        _check(r)
                    parser = _SSE()
                    for line in r.iter_lines():
                        if (data := parser.feed(line)) is not None:
                            yield _parse_event(data)
                    if (data := parser.end()) is not None:
                        yield _parse_event(data)
                    return
            time.sleep(wait)

    def features(self, sae: str, prompt: str | None = None, *, messages: list | None = None, **kw) -> FeaturesResponse:
        """``POST /v1/features``: ``sae``'s top latents at every token of the prompt (or messages),
        and given latents' activations; ``kw`` are ``FeaturesRequest`` fields (completion, top_k,
        latents)."""
        r = self._send("POST", "/v1/features", json=_features_request(sae, prompt, messages, kw))
        return FeaturesResponse.model_validate(r.json())

    def images(self, prompt: str, *, interventions: Sequence[Intervention] | None = None, **kw) -> ImagesResponse:
        """``POST /v1/images`` (a text-to-image server): ``kw`` are ``ImagesRequest`` fields
        (negative_prompt, steps, guidance_scale, width, height, seed, n, branches, compare); each
        image is a base64 PNG (``base64.b64decode(r.images[0].b64_png)``)."""
        body = ImagesRequest(prompt=prompt, interventions=list(interventions or []), **kw).model_dump(mode="json", exclude_none=True)
        return ImagesResponse.model_validate(self._send("POST", "/v1/images", json=body).json())

    def saes(self) -> list[SAEInfo]:
        """``GET /v1/saes``: the SAEs the server has attached."""
        return SAEList.model_validate(self._send("GET", "/v1/saes").json()).saes

    def latent(self, sae: str, latent: int) -> LatentInfo:
        """``GET /v1/saes/{sae}/latents/{latent}``: frequency, typical and max activation, top contexts.

        Raises:
            SaesteerError: 404 for an unknown SAE or one without statistics, 422 for a latent out of range.
        """
        return LatentInfo.model_validate(self._send("GET", f"/v1/saes/{sae}/latents/{latent}").json())

    def concepts(self) -> list[Concept]:
        """``GET /v1/concepts``: the named concepts the server keeps."""
        return ConceptList.model_validate(self._send("GET", "/v1/concepts").json()).concepts

    def save_concept(self, name: str, interventions: Sequence[Intervention], description: str = "") -> Concept:
        """``POST /v1/concepts``: save (or replace) a named concept; apply it with
        ``concept(name, strength)``. Needs a key with the ``concepts:write`` scope.

        Raises:
            SaesteerError: 422 naming the field (unknown SAE, latent out of range, ...), 404 if the
                server keeps no concepts.
        """
        body = _concept_body(name, interventions, description)
        return Concept.model_validate(self._send("POST", "/v1/concepts", json=body).json())

    def delete_concept(self, name: str) -> None:
        """``DELETE /v1/concepts/{name}``."""
        self._send("DELETE", f"/v1/concepts/{name}")

    def policies(self) -> PolicyList:
        """``GET /v1/admin/policies``: the safety policies in force (admin scope)."""
        return PolicyList.model_validate(self._send("GET", "/v1/admin/policies").json())

    def reload_policies(self) -> PolicyList:
        """``POST /v1/admin/policies/reload``: re-read the server's policies file (admin scope);
        ``SaesteerError`` 422 naming the field if it is bad (the policies in force then stay)."""
        return PolicyList.model_validate(self._send("POST", "/v1/admin/policies/reload").json())

    def search_concepts(self, positive: Sequence[str] = (), *, words: Sequence[str] = (), negative: Sequence[str] = (),
                        sae: str | None = None, top_k: int = 10) -> list[ConceptSearchHit]:
        """``POST /v1/concepts/search``: latents that stand for a concept given as example
        sentences and/or words, best first, each with a ready-to-send ``suggested`` clamp. On a
        text-to-image server: ``positive`` and ``negative`` prompts, both required, and each hit
        suggests scaling its latent by -1 (the removal)."""
        body = _search_body(positive, words, negative, sae, top_k, mix_latents=0)  # no mix to compute and fit
        return ConceptSearchResponse.model_validate(self._send("POST", "/v1/concepts/search", json=body).json()).latents

    def search_concept_mixes(self, positive: Sequence[str], *, negative: Sequence[str] = (), sae: str | None = None,
                             mix_latents: int = DEFAULT_MIX_LATENTS,
                             mix_strength: float = DEFAULT_MIX_STRENGTH,
                             mix_signs: str = DEFAULT_MIX_SIGNS,
                             mix_positions: str = DEFAULT_MIX_POSITIONS,
                             mix_fit_steps: int = DEFAULT_MIX_FIT_STEPS) -> list[ConceptSearchMix]:
        """``POST /v1/concepts/search``'s latent mixes: per searched SAE, ``mix_latents`` latents
        whose ``suggested`` add edits bring the concept of the ``positive`` sentences in (they
        steer better than one latent's clamp, ``docs/general_sae.md``); send them as
        ``interventions``, with the mix's ``repetition_penalty`` as the request's (the decoding
        the suggestion was measured with). ``mix_signs``: ``"positive"`` (the latents the
        concept turns up) or ``"both"`` (up and down); ``mix_positions``: where the edits apply
        (default the prompt's tokens); ``mix_fit_steps``: steps fitting the weights to the model's
        output (0: the contrast weights; on CPU each step takes seconds). A named concept stores
        its edits without positions: to save a mix with ``save_concept``, ask with
        ``mix_positions="all"`` and give the positions where the concept is applied
        (``{"op": "concept", ..., "positions": "prompt"}``)."""
        body = _search_body(positive, (), negative, sae, 1, mix_latents=mix_latents, mix_strength=mix_strength,
                            mix_signs=mix_signs, mix_positions=mix_positions, mix_fit_steps=mix_fit_steps)
        return ConceptSearchResponse.model_validate(self._send("POST", "/v1/concepts/search", json=body).json()).mixes

    def health(self) -> bool:
        """True when ``GET /health`` answers 200 (the model is loaded)."""
        try:
            return self._http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """The asynchronous twin of ``Client`` (same arguments and methods, awaited)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 300.0,
                 transport: httpx.AsyncBaseTransport | None = None, retries: int = 3, backoff: float = 0.5):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self.retries, self.backoff = retries, backoff

    async def _send(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                r = await self._http.request(method, path, **kw)
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                if attempt == self.retries:
                    raise
                await asyncio.sleep(_backoff(None, attempt, self.backoff))
                continue
            if r.status_code not in RETRY_STATUSES or attempt == self.retries:
                return _check(r)
            await asyncio.sleep(_backoff(r, attempt, self.backoff))
        raise AssertionError("unreachable")

    async def generate(self, prompt: str | None = None, *, messages: list | None = None,
                       interventions: Sequence[Intervention] | None = None, **kw) -> GenerateResponse:
        r = await self._send("POST", "/v1/generate", json=_request(prompt, messages, interventions, kw))
        return GenerateResponse.model_validate(r.json())

    async def stream(self, prompt: str | None = None, *, messages: list | None = None,
                     interventions: Sequence[Intervention] | None = None,
                     **kw) -> AsyncIterator[Union[TokenEvent, DoneEvent]]:
        """As ``Client.stream``, as an async iterator."""
        body = _stream_body(prompt, messages, interventions, kw)
        for attempt in range(self.retries + 1):
            async with self._http.stream("POST", "/v1/generate", json=body) as r:
                if r.status_code in RETRY_STATUSES and attempt < self.retries:
                    wait = _backoff(r, attempt, self.backoff)
                else:
                    if r.status_code >= 400:
                        await r.aread()
                        _check(r)
                    parser = _SSE()
                    async for line in r.aiter_lines():
                        if (data := parser.feed(line)) is not None:
                            yield _parse_event(data)
                    if (data := parser.end()) is not None:
                        yield _parse_event(data)
                    return
            await asyncio.sleep(wait)

    async def features(self, sae: str, prompt: str | None = None, *, messages: list | None = None, **kw) -> FeaturesResponse:
        r = await self._send("POST", "/v1/features", json=_features_request(sae, prompt, messages, kw))
        return FeaturesResponse.model_validate(r.json())

    async def images(self, prompt: str, *, interventions: Sequence[Intervention] | None = None, **kw) -> ImagesResponse:
        body = ImagesRequest(prompt=prompt, interventions=list(interventions or []), **kw).model_dump(mode="json", exclude_none=True)
        return ImagesResponse.model_validate((await self._send("POST", "/v1/images", json=body)).json())

    async def saes(self) -> list[SAEInfo]:
        return SAEList.model_validate((await self._send("GET", "/v1/saes")).json()).saes

    async def latent(self, sae: str, latent: int) -> LatentInfo:
        return LatentInfo.model_validate((await self._send("GET", f"/v1/saes/{sae}/latents/{latent}")).json())

    async def concepts(self) -> list[Concept]:
        return ConceptList.model_validate((await self._send("GET", "/v1/concepts")).json()).concepts

    async def save_concept(self, name: str, interventions: Sequence[Intervention], description: str = "") -> Concept:
        body = _concept_body(name, interventions, description)
        return Concept.model_validate((await self._send("POST", "/v1/concepts", json=body)).json())

    async def delete_concept(self, name: str) -> None:
        await self._send("DELETE", f"/v1/concepts/{name}")

    async def policies(self) -> PolicyList:
        return PolicyList.model_validate((await self._send("GET", "/v1/admin/policies")).json())

    async def reload_policies(self) -> PolicyList:
        return PolicyList.model_validate((await self._send("POST", "/v1/admin/policies/reload")).json())

    async def search_concepts(self, positive: Sequence[str] = (), *, words: Sequence[str] = (), negative: Sequence[str] = (),
                              sae: str | None = None, top_k: int = 10) -> list[ConceptSearchHit]:
        body = _search_body(positive, words, negative, sae, top_k, mix_latents=0)  # no mix to compute and fit
        return ConceptSearchResponse.model_validate((await self._send("POST", "/v1/concepts/search", json=body)).json()).latents

    async def search_concept_mixes(self, positive: Sequence[str], *, negative: Sequence[str] = (), sae: str | None = None,
                                   mix_latents: int = DEFAULT_MIX_LATENTS,
                                   mix_strength: float = DEFAULT_MIX_STRENGTH,
                                   mix_signs: str = DEFAULT_MIX_SIGNS,
                                   mix_positions: str = DEFAULT_MIX_POSITIONS,
                                   mix_fit_steps: int = DEFAULT_MIX_FIT_STEPS) -> list[ConceptSearchMix]:
        body = _search_body(positive, (), negative, sae, 1, mix_latents=mix_latents, mix_strength=mix_strength,
                            mix_signs=mix_signs, mix_positions=mix_positions, mix_fit_steps=mix_fit_steps)
        return ConceptSearchResponse.model_validate((await self._send("POST", "/v1/concepts/search", json=body)).json()).mixes

    async def health(self) -> bool:
        try:
            return (await self._http.get("/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
