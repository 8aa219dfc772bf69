"""Steered text-to-image generation: interventions applied inside a pipeline's CLIP text encoder.

Concept Steerers (Kim & Ghadiyaram, 2025) steer Stable Diffusion through a k-sparse SAE on the text
encoder's residual stream: the steer is added to the conditional text embeddings and subtracted
from the unconditional ones, so classifier-free guidance pushes twice in the same direction. Here
the request's interventions (the same plans as for text: clamp, ablate, scale, add, vectors,
conditions) run through the ``Steerer`` on the text encoder, the error term kept, so a plan that
edits nothing gives bit-identical embeddings and, for the same seed, the same image. ``branches``:
``both`` (plan on the conditional pass, ``negated(plan)`` on the unconditional one), ``cond`` or
``uncond`` alone.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch

from .core import StepPositions
from .hooks import Steerer
from .plan import InterventionPlan, negated


@torch.no_grad()
def text_embeddings(pipe, prompts: list[str], plans: list[InterventionPlan] | None = None,
                    steerer: Steerer | None = None) -> torch.Tensor:
    """The pipeline's text embeddings [len(prompts), tokens, d_text] (the encoder's last hidden
    state, as ``StableDiffusionPipeline.encode_prompt`` computes them), row b steered by ``plans[b]``.
    Every token position counts as prompt; position 0 (the start token, CLIP's attention sink) is
    steered only when listed explicitly."""
    from saesteer.modeling.diffusion import prompt_token_ids

    ids = prompt_token_ids(pipe.tokenizer, prompts)
    B, L = ids.shape
    plans = plans or [InterventionPlan() for _ in prompts]
    pos = StepPositions(abs_pos=torch.arange(L).expand(B, L).to(pipe.device), prompt_len=torch.full((B,), L, device=pipe.device))
    ctx = steerer.steer(plans, pos) if steerer is not None and any(plans) else nullcontext()
    with ctx:
        return pipe.text_encoder(ids.to(pipe.device))[0]


@dataclass
class ImageSpec:
    """One image request: what to draw, how, and its plan (``branches``: see the module docstring);
    ``steps`` and ``guidance_scale`` None: the pipeline's (``saesteer.modeling.diffusion.pipeline_defaults``)."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    n: int = 1
    plan: InterventionPlan = field(default_factory=InterventionPlan)
    branches: Literal["both", "cond", "uncond"] = "both"


def branch_plans(plan: InterventionPlan, branches: str) -> tuple[InterventionPlan, InterventionPlan]:
    """``(conditional plan, unconditional plan)`` for ``branches`` (module docstring): ``both``
    gives ``(plan, negated(plan))``, ``cond`` or ``uncond`` steers that pass alone."""
    return (plan if branches in ("both", "cond") else InterventionPlan(),
            negated(plan) if branches in ("both", "uncond") else InterventionPlan())


class ImageDeadline(TimeoutError):
    """Image generation ran past its deadline (checked after each denoising step)."""


def _stop_at(deadline: float | None):
    """A diffusers ``callback_on_step_end`` raising ``ImageDeadline`` past ``deadline``
    (``time.monotonic()`` seconds); None: no callback."""
    if deadline is None:
        return None

    def check(pipe, step, timestep, kwargs):
        if time.monotonic() > deadline:
            raise ImageDeadline(f"image generation passed its deadline at denoising step {step + 1}")
        return kwargs

    return check


@torch.no_grad()
def generate_images(pipe, spec: ImageSpec, steerer: Steerer | None = None, deadline: float | None = None) -> list:
    """``spec.n`` PIL images from ``pipe`` (``saesteer.modeling.diffusion.load_pipeline``); the same seed
    and an idle plan give the same pixels as no plan.

    Raises:
        ImageDeadline: ``time.monotonic()`` passed ``deadline`` (checked after each denoising step).
    """
    cond_plan, uncond_plan = branch_plans(spec.plan, spec.branches)
    cond = text_embeddings(pipe, [spec.prompt], [cond_plan], steerer)
    uncond = text_embeddings(pipe, [spec.negative_prompt], [uncond_plan], steerer)
    gen = torch.Generator("cpu").manual_seed(spec.seed if spec.seed is not None else torch.seed() % 2**63)
    from saesteer.modeling.diffusion import pipeline_defaults

    steps, guidance = pipeline_defaults(pipe, spec.steps, spec.guidance_scale)
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
               guidance_scale=guidance, height=spec.height, width=spec.width, generator=gen,
               num_images_per_prompt=spec.n, callback_on_step_end=_stop_at(deadline))
    return list(out.images)
