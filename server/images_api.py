"""``POST /v1/images``: steered text-to-image (``ImagesAPI``), for a server whose model is a
diffusers pipeline (``saesteer serve --model PIPELINE_FOLDER``; one server hosts one model family).

The SAEs attach to the pipeline's CLIP text encoder (``blocks.L.hook_resid_post`` is the output of
its layer L; ``saesteer.modeling.diffusion``); requests are checked against their configs exactly as text
requests are, and the steering itself is ``steering.diffusion.generate_images``. One request at a
time per worker (a batch of diffusion requests would need equal sizes and steps).

The same worker answers ``POST /v1/concepts/search`` on an image server (``search_worker.install_search``
hands it a ``ConceptSearchRequest``): contrasting prompts through the text encoder
(``steering.concept_search.search_prompt_concepts``); each hit suggests scaling its latent by -1.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's real annotation.
import base64
import io
import logging
import math
import time
from dataclasses import dataclass

import litserve as ls
from saesteer_client.schema import (
    ConceptSearchHit,
    ConceptSearchRequest,
    ConceptSearchResponse,
    Image,
    ImagesRequest,
    ImagesResponse,
    LatentIntervention,
)

from saesteer.steering.pool import SAEPool

from .api import Counted, Rejected, encoded
from .config import ServerSettings
from .search_worker import check_search_saes, search_sae_ids

log = logging.getLogger("saesteer.server")


@dataclass
class _Job:
    request: ImagesRequest
    plan: object  # steering.plan.InterventionPlan
    cost: int  # image_cost


def image_cost(r: ImagesRequest, native: int, default_steps: int) -> int:
    """What an image request costs, in denoiser passes at the pipeline's native size (a pass runs
    both classifier-free guidance branches): ``n x steps x`` the image's area over the native one
    (at least 1), twice with ``compare``. Counted before any work (``max_image_passes``)."""
    area = max(1.0, (r.width or native) * (r.height or native) / native**2)
    return math.ceil(r.n * (r.steps or default_steps) * area * (2 if r.compare else 1))


def _png(img) -> Image:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Image(b64_png=base64.b64encode(buf.getvalue()).decode())


class ImagesAPI(ls.LitAPI):
    """Steered text-to-image on a diffusers pipeline.

    Args:
        settings: the server settings (``model`` is the pipeline's folder or hub id).
        saes: the SAE pool (their hook points on the text encoder).
    """

    def __init__(self, settings: ServerSettings, saes: SAEPool, **kwargs):
        from .concepts import ConceptStore

        super().__init__(max_batch_size=1, api_path="/v1/images", **kwargs)
        self.settings, self.saes = settings, saes
        self.concepts = ConceptStore(settings.concepts_dir)

    def setup(self, device):
        import torch

        from saesteer.modeling.diffusion import load_pipeline, native_size, pipeline_defaults
        from saesteer.steering.hooks import Steerer

        s = self.settings
        dev = s.device if s.device != "cpu" else device
        self.pipe = load_pipeline(s.model, device=dev, dtype=getattr(torch, s.dtype))
        self.saes.set_device(dev)
        if self.saes.budget_bytes is None:
            self.saes.load_all()
        self.steerer = Steerer(self.pipe.text_encoder, self.saes)
        self.native = native_size(self.pipe)
        self.max_side = s.max_image_side or 2 * self.native
        self.default_steps = pipeline_defaults(self.pipe)[0]

    def decode_request(self, request: ImagesRequest) -> _Job | Rejected:
        from saesteer.steering.plan import PlanError, build_plan

        if isinstance(request, ConceptSearchRequest):
            bad = check_search_saes(request, self.saes)
            if bad is not None:
                return bad
            if not request.positive:
                return Rejected.field(422, ["body", "positive"], "a text-to-image server searches by contrasting "
                                      "prompts: give positive prompts (words alone score a language model's outputs)")
            if not request.negative:
                return Rejected.field(422, ["body", "negative"], "a text encoder has no neutral default: give negative "
                                      "prompts (the positive ones without the concept)")
            return request
        for name in ("width", "height"):
            side = getattr(request, name)
            if side is not None and side > self.max_side:
                return Rejected.field(422, ["body", name], f"{name} {side} is above this server's limit of {self.max_side} "
                                      f"pixels (the model draws {self.native} natively)", "image_too_large")
        cost = image_cost(request, self.native, self.default_steps)
        if cost > self.settings.max_image_passes:
            return Rejected.field(422, ["body", "n" if request.n > 1 else "steps"],
                                  f"this request costs {cost} denoiser passes at the native size ({request.n} image(s) x "
                                  f"{request.steps or self.default_steps} steps x its area{', twice for compare' if request.compare else ''}); "
                                  f"the server's limit is {self.settings.max_image_passes} (max_image_passes)", "image_too_costly")

        try:
            plan = build_plan(request.interventions, self.steerer.configs, self.steerer.hook_widths, self.saes.units,
                              max_position=self.pipe.tokenizer.model_max_length, concepts=self.concepts.get)
        except PlanError as e:
            return Rejected(422, [e.item])
        return _Job(request, plan, cost)

    def _search(self, r: ConceptSearchRequest) -> Counted:
        from saesteer.steering.concept_search import search_prompt_concepts

        with self.saes.use(search_sae_ids(r, self.saes)) as saes:
            hits = search_prompt_concepts(self.pipe, saes, self.saes.stats, r.positive, r.negative, r.top_k)
        cost = (len(r.positive) + len(r.negative)) * self.pipe.tokenizer.model_max_length  # one encoder pass per prompt
        return Counted(ConceptSearchResponse(latents=[ConceptSearchHit(
            sae=h.sae, latent=h.latent, score=h.score, input_score=h.input_score, output_score=h.output_score, top_tokens=[],
            suggested=LatentIntervention(op="scale", sae=h.sae, latent=h.latent, value=h.value),
        ) for h in hits]), cost)

    def predict(self, job):
        from saesteer.steering.diffusion import ImageDeadline, ImageSpec, generate_images
        from saesteer.steering.plan import InterventionPlan

        if isinstance(job, Rejected):
            return job
        if isinstance(job, ConceptSearchRequest):
            try:
                return self._search(job)
            except Exception as e:  # never a dead worker
                log.error("concept search failed: %s: %s", type(e).__name__, e, exc_info=e)
                return Rejected.field(500, ["body"], f"concept search failed ({type(e).__name__})", "internal_error")
        r = job.request
        base = dict(prompt=r.prompt, negative_prompt=r.negative_prompt, steps=r.steps, guidance_scale=r.guidance_scale,
                    width=r.width, height=r.height, seed=r.seed if r.seed is not None else 0, n=r.n, branches=r.branches)
        deadline = time.monotonic() + self.settings.image_timeout
        try:
            with self.saes.use(job.plan.sae_ids()):
                steered = generate_images(self.pipe, ImageSpec(**base, plan=job.plan), self.steerer, deadline)
            plain = generate_images(self.pipe, ImageSpec(**base, plan=InterventionPlan()), deadline=deadline) if r.compare else None
        except ImageDeadline:
            return Counted(Rejected.field(
                504, ["body"], f"the images took over the server's image_timeout ({self.settings.image_timeout:g} s) "
                "and were stopped; ask for fewer images, fewer steps or a smaller size", "image_timeout"), job.cost)
        except Exception as e:  # never a dead worker, and the error names no internals
            log.error("image generation failed: %s: %s", type(e).__name__, e, exc_info=e)
            return Rejected.field(500, ["body"], f"image generation failed ({type(e).__name__})", "internal_error")
        return Counted(ImagesResponse(images=[_png(i) for i in steered], unsteered=[_png(i) for i in plain] if plain else None),
                       job.cost)

    def encode_response(self, output) -> ImagesResponse:
        return encoded(output)
