"""``POST /v1/concepts/search`` (``steering.concept_search``) in a worker of its own: the gradient
worker. Concept search fits its mixes by backpropagating through the model, which the text
worker's packed linears cannot, so this worker holds a second, unpacked float32 copy of the model;
it loads it on first use (``/ready`` lists the worker as "standby" until then), not at start.

It is heavy work beside generation, and bounded as such (``SearchAPI``):
- admission by cost: a search's work is counted before it starts (``search_cost``, token forward
  passes) and refused with a 422 naming ``mix_fit_steps`` above ``max_search_tokens``;
- a deadline: past ``search_timeout`` seconds the work stops and the caller gets a 504;
- isolation: the worker runs at the lowest CPU priority (``SCHED_IDLE`` where the OS has it, else
  nice 19) with ``search_threads`` torch threads (default one per core), so generation keeps its
  speed while a search runs and the search takes only the cores that generation leaves idle.

The image server's worker answers the same route itself (``install_search``).
"""

# No `from __future__ import annotations`: LitServe reads decode_request's real annotation.
import logging
import os
import time

from saesteer_client.schema import (
    ConceptSearchHit,
    ConceptSearchMix,
    ConceptSearchRequest,
    ConceptSearchResponse,
    LatentIntervention,
    SUGGESTED_REPETITION_PENALTY,
)

from .api import Counted, ModelAPI, Rejected, encoded
from .config import ServerSettings

log = logging.getLogger("saesteer.server")


def lower_priority(threads: int) -> str:
    """Make this process the machine's lowest-priority work with ``threads`` torch threads: the
    Linux ``SCHED_IDLE`` policy (it runs only on cores nothing else wants), else nice 19. Which of
    the two it got."""
    import torch

    torch.set_num_threads(threads)
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        try:
            os.nice(19)
        except OSError:
            return "normal"
        return "nice 19"


class SearchAPI(ModelAPI):
    """Concept search (see the module docstring); arguments as ``ModelAPI``, plus ``runtime_dir``
    (its status file). One search at a time. Its model copy stays unpacked (float32, PyTorch's
    kernels, whatever ``pack_linears`` says): ``fit_mix`` backpropagates, which oneDNN's packed
    linears do not support."""

    packs_linears = False
    path = "/v1/concepts/search"

    def __init__(self, settings: ServerSettings, saes, runtime_dir: str, **kwargs):
        super().__init__(settings, saes, max_batch_size=1, api_path=self.path, **kwargs)
        self.runtime_dir = runtime_dir
        self.loaded = False

    def setup(self, device):
        from .runtime import WorkerStatus

        self.device_name = device
        self.threads = self.settings.search_threads or len(os.sched_getaffinity(0))
        self.priority = lower_priority(self.threads)
        self.status = WorkerStatus(self.runtime_dir, role="search")
        self.status.write("standby")

    def _load(self) -> None:
        self.status.write("loading")
        t0 = time.monotonic()
        super().setup(self.device_name)
        self.loaded = True
        log.warning("search worker: model loaded on first use in %.1f s (%s, %d threads)", time.monotonic() - t0,
                    self.priority, self.threads)

    def decode_request(self, request: ConceptSearchRequest) -> "ConceptSearchRequest | Rejected":
        bad = check_search_saes(request, self.saes)
        return bad if bad is not None else request

    def predict(self, request):
        if isinstance(request, Rejected):
            return request
        deadline = time.monotonic() + self.settings.search_timeout  # the first search's model load counts too
        if not self.loaded:
            self._load()
        self.status.write("busy")
        try:
            return self._search(request, deadline)
        finally:
            self.status.write("idle")

    def _search(self, r: ConceptSearchRequest, deadline: float):
        from saesteer.steering.concept_mix import SearchDeadline, concept_mixes, search_cost
        from saesteer.steering.concept_search import search_concepts

        s = self.settings
        ids = search_sae_ids(r, self.saes)
        mixes = bool(r.positive) and r.mix_latents > 0
        hook_points = {self.saes.configs[i].hook_point for i in ids}
        cost = search_cost(self.tokenizer, r.positive, r.negative, len(ids), len(hook_points), mixes, r.mix_fit_steps)
        if cost > s.max_search_tokens:
            return Rejected.field(
                422, ["body", "mix_fit_steps" if mixes and r.mix_fit_steps else "positive"],
                f"this search costs {cost} token passes over {len(ids)} SAE(s); the server's limit is "
                f"{s.max_search_tokens} (max_search_tokens): send fewer sentences, fewer mix_fit_steps, or name one sae",
                "search_too_costly")
        try:
            with self.saes.use(ids) as saes:
                hits = search_concepts(self.model, self.tokenizer, saes, self.saes.stats, r.positive, r.negative, r.words, r.top_k)
                found = concept_mixes(self.model, self.tokenizer, saes, self.saes.stats, r.positive, r.negative,
                                      r.mix_latents, r.mix_strength, r.mix_signs, r.mix_fit_steps,
                                      r.mix_positions, deadline=deadline) if mixes else []
        except SearchDeadline:
            return Counted(Rejected.field(
                504, ["body"], f"the search ran past the server's search_timeout ({s.search_timeout:g} s) and was "
                "stopped; send fewer sentences or mix_fit_steps, or retry when the server is less busy (searches "
                "yield the CPU to generation)", "search_timeout"), cost)
        except ValueError as e:  # no usable concept tokens
            field = "words" if r.words else "positive"
            return Rejected.field(422, ["body", field], str(e))
        return Counted(ConceptSearchResponse(mixes=[ConceptSearchMix(
            sae=m.sae, strength=m.strength, mean_diff_cos=round(m.mean_diff_cos, 4),
            suggested=[LatentIntervention(op="add", sae=m.sae, latent=i, value=float(f"{v:.6g}"), unit="raw",
                                          positions=r.mix_positions)
                       for i, v in zip(m.latents, m.values)],
            fit_steps=r.mix_fit_steps if m.fit else 0,
            fit_nll_start=round(m.fit.nll_start, 4) if m.fit else None, fit_nll_end=round(m.fit.nll_end, 4) if m.fit else None,
            repetition_penalty=SUGGESTED_REPETITION_PENALTY,
        ) for m in found], latents=[ConceptSearchHit(
            sae=h.sae, latent=h.latent, score=h.score, input_score=h.input_score, output_score=h.output_score,
            top_tokens=h.top_tokens,
            suggested=LatentIntervention(op="clamp", sae=h.sae, latent=h.latent, value=round(h.value, 4), unit=h.unit),
        ) for h in hits]), cost)

    def encode_response(self, output) -> ConceptSearchResponse:
        return encoded(output)


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


def install_search(app, path: str) -> None:
    """Add ``POST /v1/concepts/search`` to ``app``, answered by the worker of LitServe's ``path``
    (``/v1/images`` on a text-to-image server, whose worker dispatches on the body's type); call
    after LitServe registered ``path``."""
    from fastapi.routing import APIRoute

    worker = next((r.endpoint for r in app.router.routes if isinstance(r, APIRoute) and r.path == path), None)
    if worker is None:
        raise RuntimeError(f"LitServe registered no {path} route")

    async def search(request: ConceptSearchRequest):
        return await worker(request)

    app.add_api_route("/v1/concepts/search", search, methods=["POST"], response_model=ConceptSearchResponse,
                      summary="Rank latents across the attached SAEs for a concept given as sentences and/or words")
