"""``POST /v1/features``: an SAE's latents at every token of a prompt (and completion), read in a
worker of its own (``FeaturesAPI``: LitServe gives each API its own processes, so this one holds its
own copy of the model; it never waits behind a long generation). The read-out is
``steering.readout.read_latents``.

The same worker answers ``POST /v1/concepts/search`` (``steering.concept_search``): that route
(``install_search``) hands LitServe's ``/v1/features`` endpoint a ``ConceptSearchRequest``
instead of a ``FeaturesRequest``, and ``decode_request`` dispatches on the type, so the search
needs no further model copy.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's real annotation.
from dataclasses import dataclass

from saesteer_client.schema import (
    ConceptSearchHit,
    ConceptSearchMix,
    ConceptSearchRequest,
    ConceptSearchResponse,
    FeaturesRequest,
    FeaturesResponse,
    LatentActivation,
    LatentIntervention,
    LatentTrace,
    SUGGESTED_REPETITION_PENALTY,
    TokenFeatures,
)

from saesteer.sae.model import LatentRangeError, check_latent

from .api import ModelAPI, Rejected
from .config import ServerSettings
from .errors import error_response


@dataclass
class _Job:
    request: FeaturesRequest
    input_ids: list[int]
    prompt_tokens: int


class FeaturesAPI(ModelAPI):
    """The read-out endpoint; arguments as ``ModelAPI``. One request at a time per worker (a
    read-out is one forward pass up to the hook point). Its model copy stays unpacked (float32,
    PyTorch's kernels, whatever ``pack_linears`` says): concept search fits its mixes by
    backpropagation (``fit_mix``), which oneDNN's packed linears do not support."""

    packs_linears = False

    def __init__(self, settings: ServerSettings, saes, **kwargs):
        super().__init__(settings, saes, max_batch_size=1, api_path="/v1/features", **kwargs)

    def decode_request(self, request: FeaturesRequest) -> _Job | Rejected:
        if isinstance(request, ConceptSearchRequest):
            return self._decode_search(request)
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
        if not self.saes.fits([request.sae]):
            return Rejected.field(422, at + ["sae"], f"SAE {request.sae!r} does not fit this server's SAE memory budget", "sae_memory")
        return _Job(request, ids + extra, len(ids))

    def _decode_search(self, request: ConceptSearchRequest) -> ConceptSearchRequest | Rejected:
        bad = check_search_saes(request, self.saes)
        return bad if bad is not None else request

    def _search(self, r: ConceptSearchRequest):
        from saesteer.steering.concept_search import concept_mixes, search_concepts

        try:
            with self.saes.use(search_sae_ids(r, self.saes)) as saes:
                hits = search_concepts(self.model, self.tokenizer, saes, self.saes.stats, r.positive, r.negative, r.words, r.top_k)
                mixes = concept_mixes(self.model, self.tokenizer, saes, self.saes.stats, r.positive, r.negative,
                                      r.mix_latents, r.mix_strength, r.mix_signs, r.mix_fit_steps,
                                      r.mix_positions) if r.positive and r.mix_latents > 0 else []
        except ValueError as e:  # no usable concept tokens
            field = "words" if r.words else "positive"
            return Rejected.field(422, ["body", field], str(e))
        return ConceptSearchResponse(mixes=[ConceptSearchMix(
            sae=m.sae, strength=m.strength, mean_diff_cos=round(m.mean_diff_cos, 4),
            suggested=[LatentIntervention(op="add", sae=m.sae, latent=i, value=float(f"{v:.6g}"), unit="raw",
                                          positions=r.mix_positions)
                       for i, v in zip(m.latents, m.values)],
            fit_steps=r.mix_fit_steps if m.fit else 0,
            fit_nll_start=round(m.fit.nll_start, 4) if m.fit else None, fit_nll_end=round(m.fit.nll_end, 4) if m.fit else None,
            repetition_penalty=SUGGESTED_REPETITION_PENALTY,
        ) for m in mixes], latents=[ConceptSearchHit(
            sae=h.sae, latent=h.latent, score=h.score, input_score=h.input_score, output_score=h.output_score,
            top_tokens=h.top_tokens,
            suggested=LatentIntervention(op="clamp", sae=h.sae, latent=h.latent, value=round(h.value, 4), unit=h.unit),
        ) for h in hits])

    def predict(self, job):
        from saesteer.steering.readout import read_latents

        if isinstance(job, Rejected):
            return job
        if isinstance(job, ConceptSearchRequest):
            return self._search(job)
        r = job.request
        with self.saes.use([r.sae]) as saes:
            out = read_latents(self.model, saes[r.sae], job.input_ids, r.top_k, r.latents)
        tokens = []
        for t, tid in enumerate(job.input_ids):
            sink = bool(out.sink[t])
            top = [] if sink else [
                LatentActivation(latent=int(i), activation=float(v))
                for i, v in zip(out.top_latents[t].tolist(), out.top_values[t].tolist()) if v > 0
            ]
            tokens.append(TokenFeatures(position=t, token_id=tid, token=self.tokenizer.decode([tid]), sink=sink, top=top))
        return FeaturesResponse(
            sae=r.sae, hook_point=self.saes.configs[r.sae].hook_point, prompt_tokens=job.prompt_tokens, tokens=tokens,
            latents=[LatentTrace(latent=lat, activations=out.traces[j].tolist()) for j, lat in enumerate(r.latents)],
        )

    def encode_response(self, output) -> FeaturesResponse:
        if isinstance(output, Rejected):
            return error_response(output.status, output.detail)
        return output


def search_sae_ids(request: ConceptSearchRequest, saes) -> list[str]:
    """The SAEs a concept search covers: the one it names, else every attached one."""
    return [request.sae] if request.sae else sorted(saes.configs)


def check_search_saes(request: ConceptSearchRequest, saes) -> Rejected | None:
    """The 422 for a concept search naming an unknown SAE, or covering SAEs that do not fit the
    pool's memory budget together (``saes``: the ``SAEPool``); None when they are fine."""
    if request.sae is not None and request.sae not in saes.configs:
        return Rejected.field(422, ["body", "sae"], f"unknown SAE {request.sae!r}; loaded SAEs: {', '.join(sorted(saes.configs))}")
    if not saes.fits(search_sae_ids(request, saes)):
        return Rejected.field(422, ["body", "sae"], "these SAEs do not fit this server's SAE memory budget together; "
                              "search one at a time (sae)", "sae_memory")
    return None


def install_search(app, path: str = "/v1/features") -> None:
    """Add ``POST /v1/concepts/search`` to ``app``, answered by the worker of ``path`` (the
    ``/v1/features`` worker, see the module docstring; ``/v1/images`` on a text-to-image server);
    call after LitServe registered ``path``."""
    from fastapi.routing import APIRoute

    worker = next((r.endpoint for r in app.router.routes if isinstance(r, APIRoute) and r.path == path), None)
    if worker is None:
        raise RuntimeError(f"LitServe registered no {path} route")

    async def search(request: ConceptSearchRequest):
        return await worker(request)

    app.add_api_route("/v1/concepts/search", search, methods=["POST"], response_model=ConceptSearchResponse,
                      summary="Rank latents across the attached SAEs for a concept given as sentences and/or words")
