"""Concept removal on the shapes text-to-image model, measured from pixels.

For a colour c: ``n`` prompts that ask for a c shape (random shape, size and background; the
captions the model was trained on), each drawn once without steering and once per steering
strength from the same seed, so every steered image has an unsteered twin from the same noise.
Each image is read back by ``steering.eval.shapes.read_image``:

- ``share``: the fraction of pixels within RGB distance 60 of c (``colour_shares``); the removal
  figure is ``cut = 1 - mean steered share / mean unsteered share``;
- ``shape_acc``: the share of images whose drawn shape (read from the chromatic pixels, whatever
  their colour) is the one asked for; an image with no coloured region reads as no shape;
- ``colour_read``: how often each colour dominates the steered images.

The steer is a plan on the text encoder's SAE, applied as Concept Steerers do (Kim & Ghadiyaram,
2025): on the conditional text embeddings, and negated on the unconditional ones (``branches``).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import torch

from saesteer.steering.diffusion import branch_plans, text_embeddings
from saesteer.steering.plan import InterventionPlan, LatentEdit

from .shapes import COLOURS, ShapeSpec, read_image, sample


def colour_specs(colour: str, n: int, seed: int = 0) -> list[ShapeSpec]:
    """``n`` random shapes of ``colour`` (seeded)."""
    rng = np.random.default_rng(seed)
    return [sample(rng, colour=colour) for _ in range(n)]


@torch.no_grad()
def draw(pipe, prompts: Sequence[str], plan: InterventionPlan | None = None, steerer=None, seed: int = 0,
         steps: int | None = None, guidance_scale: float | None = None, branches: str = "both") -> np.ndarray:
    """Images uint8 [len(prompts), H, W, 3], all prompts in one batch, row b from the same noise for
    the same ``seed`` whatever the plan; ``plan`` steers every row (``branches``: both, cond, uncond);
    ``steps`` and ``guidance_scale`` default to the pipeline's."""
    cond_plan, uncond_plan = branch_plans(plan or InterventionPlan(), branches)
    B = len(prompts)
    cond = text_embeddings(pipe, list(prompts), [cond_plan] * B, steerer)
    uncond = text_embeddings(pipe, [""] * B, [uncond_plan] * B, steerer)
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, guidance_scale=guidance_scale,
               generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return (out.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)


def draw_in_batches(pipe, prompts: Sequence[str], plan: InterventionPlan | None = None, steerer=None, seed: int = 0,
                    batch: int = 20, steps: int | None = None) -> np.ndarray:
    """``draw`` over ``prompts`` in batches of ``batch`` (batch i from seed ``seed + i``): uint8
    [len(prompts), H, W, 3]."""
    return np.concatenate([draw(pipe, prompts[i:i + batch], plan, steerer, seed=seed + i, steps=steps)
                           for i in range(0, len(prompts), batch)])


def read_batch(images: np.ndarray, specs: Sequence[ShapeSpec], colour: str) -> dict:
    """Figures of ``images`` [B, H, W, 3] against the ``specs`` they were asked for."""
    reads = [read_image(im) for im in images]
    return {
        "share": float(np.mean([r["shares"][colour] for r in reads])),
        "shape_acc": float(np.mean([r["shape"] == s.shape for r, s in zip(reads, specs)])),
        "colour_acc": float(np.mean([r["colour"] == s.colour for r, s in zip(reads, specs)])),
        "colour_read": dict(Counter(str(r["colour"]) for r in reads)),
    }


def scale_plan(sae_id: str, latents: Sequence[int], factor: float) -> InterventionPlan:
    """The plan that multiplies ``latents`` by ``factor`` at every position but the start token
    (error term kept): Concept Steerers' steer with strength ``factor - 1``."""
    return InterventionPlan(latent_edits=[LatentEdit(sae_id, int(i), "scale", float(factor), "all") for i in latents])


def removal_eval(pipe, steerer, sae_id: str, latents: Sequence[int], colour: str, factors: Sequence[float],
                 n: int = 40, seed: int = 0, steps: int | None = None, batch: int = 20) -> dict:
    """Remove ``colour`` by scaling ``latents`` of SAE ``sae_id`` by each of ``factors``, on ``n``
    prompts that ask for it (module docstring). Returns ``{"colour", "latents", "n", "plain":
    figures, "steered": [{"factor", "cut", **figures}]}``.

    Raises:
        ValueError: an unknown colour.
    """
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {list(COLOURS)}")
    specs = colour_specs(colour, n, seed)
    prompts = [s.caption for s in specs]

    plain = read_batch(draw_in_batches(pipe, prompts, None, steerer, seed, batch, steps), specs, colour)
    steered = []
    for f in factors:
        figs = read_batch(draw_in_batches(pipe, prompts, scale_plan(sae_id, latents, f), steerer, seed, batch, steps), specs, colour)
        steered.append({"factor": f, "cut": 1 - figs["share"] / max(plain["share"], 1e-9), **figs})
    return {"colour": colour, "latents": list(map(int, latents)), "n": n, "plain": plain, "steered": steered}


def insertion_eval(pipe, steerer, sae_id: str, latents: Sequence[int], typical: Sequence[float], shape: str,
                   from_shape: str, values: Sequence[float], n: int = 40, seed: int = 0, batch: int = 20) -> dict:
    """Insert ``shape`` into ``n`` prompts that ask for ``from_shape``: each of ``latents`` gets its
    decoder direction added at every position but the start token, ``value`` times its typical
    activation (``typical``, the same order), for each of ``values``; every image from the same
    noise as its unsteered twin. Returns ``{"shape", "from", "latents", "n", "runs": [{"value",
    "shape_rate" (read as ``shape``), "from_rate" (still read as ``from_shape``), "colour_kept"}]}``
    (value 0 is the unsteered run).

    Raises:
        ValueError: an unknown shape.
    """
    from .shapes import SHAPES

    for s in (shape, from_shape):
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}; expected one of {list(SHAPES)}")
    rng = np.random.default_rng(seed)
    specs = [sample(rng, shape=from_shape) for _ in range(n)]
    prompts = [s.caption for s in specs]
    runs = []
    for v in (0.0, *values):
        plan = InterventionPlan(latent_edits=[LatentEdit(sae_id, int(i), "add", float(v * t), "all")
                                              for i, t in zip(latents, typical)]) if v else None
        reads = [read_image(im) for im in draw_in_batches(pipe, prompts, plan, steerer, seed, batch)]
        runs.append({"value": v, "shape_rate": float(np.mean([r["shape"] == shape for r in reads])),
                     "from_rate": float(np.mean([r["shape"] == from_shape for r in reads])),
                     "colour_kept": float(np.mean([r["colour"] == s.colour for r, s in zip(reads, specs)]))})
    return {"shape": shape, "from": from_shape, "latents": list(map(int, latents)), "n": n, "runs": runs}
