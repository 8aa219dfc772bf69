"""Concept search: which latents, across SAEs, stand for a concept given as sentences and/or words.

Each latent i of each searched SAE gets an input score (needs ``positive`` sentences: how much more
it fires on them than on neutral ones) and an output score (how much of the logit lens's
probability mass its decoder direction puts on the concept's tokens), as ``steering.concept_scores``
defines them.

Ranking: each available score becomes a robust z-score within its SAE, ``(s - median) /
max(1.4826 * MAD, std)`` (``robust_z``), and latents are ranked by the sum over the available scores, best first. The output score
enters as its logarithm: the mass spans orders of magnitude (most latents put about 1e-5 on the
concept tokens, a few over 0.1), so the raw mass has a MAD near zero and z-scores in the millions
(measured on the general SAE), which drowned the input score. Latents that never
fired in the SAE's statistics are skipped (they have no typical activation to suggest a strength
in). Every result carries a ready-to-send intervention: a clamp to ``SUGGESTED_TYPICAL`` times the
latent's typical activation (``unit: "typical"``; the useful range on the default SAE is 2-4,
``docs/steering_eval.md``), or, for an SAE without statistics, to that many times the latent's mean
activation on the positive sentences in raw units.

A search with positive sentences also suggests, per SAE, a mix of latents (``steering.concept_mix``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from saesteer.sae.model import SAE
from saesteer.sae.output_scores import logit_lens
from saesteer.sae.stats import LatentStats
from saesteer.steering.concept_scores import (
    NEUTRAL_SENTENCES, concept_output_scores, concept_tokens, in_typical_units, max_activations, robust_z,
    skip_never_fired, typical_activations,
)

SUGGESTED_TYPICAL = 4.0


@dataclass
class ConceptHit:
    """One latent found for a concept.

    Attributes:
        sae, latent: where it is.
        score: the ranking score (sum of robust z-scores).
        input_score: contrast of activations (typical units where the SAE has statistics), or None
            without positive sentences.
        output_score: logit-lens probability mass on the concept tokens.
        top_tokens: the ten tokens its decoder direction promotes most (logit lens).
        value, unit: the suggested clamp strength.
    """

    sae: str
    latent: int
    score: float
    input_score: float | None
    output_score: float
    top_tokens: list[str] = field(default_factory=list)
    value: float = SUGGESTED_TYPICAL
    unit: str = "typical"


@torch.no_grad()
def search_concepts(
    model,
    tokenizer,
    saes: Mapping[str, SAE],
    stats: Mapping[str, LatentStats | None],
    positive: Sequence[str] = (),
    negative: Sequence[str] = (),
    words: Sequence[str] = (),
    top_k: int = 10,
    suggested: float = SUGGESTED_TYPICAL,
) -> list[ConceptHit]:
    """Rank the latents of ``saes`` for a concept (module docstring), best first.

    Args:
        saes: {id: SAE} to search (all on the model's hook points).
        stats: {id: the SAE's saved statistics or None}.
        positive, negative: sentences with and without the concept (negative defaults to
            ``NEUTRAL_SENTENCES``); words: words naming it.
        top_k: hits returned.
        suggested: clamp strength suggested, in typical activations.

    Raises:
        ValueError: neither positive sentences nor words; no usable concept tokens.
    """
    if not positive and not words:
        raise ValueError("give at least one positive sentence or one word")
    negative = list(negative) or list(NEUTRAL_SENTENCES)
    tokens = concept_tokens(tokenizer, words, positive, negative)
    pos_acts = max_activations(model, tokenizer, saes, positive) if positive else {}
    neg_acts = max_activations(model, tokenizer, saes, negative) if positive else {}
    hits: list[ConceptHit] = []
    for sid, sae in saes.items():
        out_score = concept_output_scores(model, sae, tokens)
        score = robust_z(out_score.clamp(min=1e-12).log())
        typical = typical_activations(stats.get(sid))
        in_score = None
        if positive:
            in_score = in_typical_units(pos_acts[sid].mean(0) - neg_acts[sid].mean(0), typical)
            score = score + robust_z(in_score)
        score = skip_never_fired(score, typical)
        best = score.topk(min(top_k, sae.cfg.d_sae)).indices
        for i in best.tolist():
            if score[i] == float("-inf"):
                continue
            if typical is not None:
                value, unit = suggested, "typical"
            else:
                mean_pos = float(pos_acts[sid][:, i].mean()) if positive else 0.0
                value, unit = suggested * (mean_pos if mean_pos > 0 else 1.0), "raw"
            hits.append(ConceptHit(sid, i, float(score[i]), None if in_score is None else float(in_score[i]),
                                   float(out_score[i]), value=value, unit=unit))
    hits.sort(key=lambda h: -h.score)
    hits = hits[:top_k]
    for h in hits:  # the logit lens of the returned latents only
        top = logit_lens(model, saes[h.sae], torch.tensor([h.latent]), top_k=10)[0][0].tolist()
        h.top_tokens = [tokenizer.decode([t]) for t in top]
    return hits


@torch.no_grad()
def search_prompt_concepts(
    pipe,
    saes: Mapping[str, SAE],
    stats: Mapping[str, LatentStats | None],
    positive: Sequence[str],
    negative: Sequence[str],
    top_k: int = 10,
    factor: float = -1.0,
) -> list[ConceptHit]:
    """Rank the latents of text-encoder SAEs (a diffusion pipeline's, ``saesteer.modeling.diffusion``)
    for a concept given as contrasting prompts, best first.

    A text encoder has no unembedding, so there is no output score; the score is the input contrast
    of Concept Steerers (Kim & Ghadiyaram, 2025, Sec. 3.2): each latent's activation averaged over a
    prompt's positions (all but the start token; the padding positions carry the caption's summary
    to the UNet, so a concept must be found there too), mean over ``positive`` minus mean over
    ``negative``, in typical activations where the SAE has statistics. Ranked by the robust z-score
    of that contrast within each SAE. The suggested intervention scales the latent by ``factor``
    (``value``; unit ``"factor"``): -1 flips the concept's part of each embedding, Concept Steerers'
    removal (their strength s is a factor of 1 + s).

    Raises:
        ValueError: no positive or no negative prompts (a text encoder has no neutral default).
    """
    from saesteer.sae.text_encoder import prompt_activations

    if not positive or not negative:
        raise ValueError("give positive and negative prompts: the concept is their contrast")
    hits: list[ConceptHit] = []
    by_hook: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for sid, sae in saes.items():
        hp = sae.cfg.hook_point
        if hp not in by_hook:
            by_hook[hp] = (prompt_activations(pipe, list(positive), hp), prompt_activations(pipe, list(negative), hp))
        pos, neg = by_hook[hp]

        def mean_z(a: torch.Tensor) -> torch.Tensor:  # [P, L-1, d] -> [d_sae]: mean over positions, then prompts
            return sae.encode(a.reshape(-1, a.shape[-1]).to(sae.device, sae.dtype)).float().cpu().view(*a.shape[:2], -1).mean((0, 1))

        typical = typical_activations(stats.get(sid))
        in_score = in_typical_units(mean_z(pos) - mean_z(neg), typical)
        score = skip_never_fired(robust_z(in_score), typical)
        for i in score.topk(min(top_k, sae.cfg.d_sae)).indices.tolist():
            if score[i] != float("-inf"):
                hits.append(ConceptHit(sid, i, float(score[i]), float(in_score[i]), 0.0, value=factor, unit="factor"))
    hits.sort(key=lambda h: -h.score)
    return hits[:top_k]
