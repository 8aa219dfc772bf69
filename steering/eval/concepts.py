"""Finding concept latents by contrast (Kim & Ghadiyaram 2025, Concept Steerers, Sec. 3.2).

A concept latent fires on texts that carry the concept and stays quiet on neutral ones. For each
text we take each latent's largest activation over its non-sink positions, then rank latents by
the mean of that over the positive texts minus the mean over the negative texts.
"""

from __future__ import annotations

from typing import Sequence

from saesteer.sae.model import SAE
from saesteer.steering.concept_scores import max_activations


def contrast_latents(model, tokenizer, sae: SAE, positive: Sequence[str], negative: Sequence[str], top: int = 10) -> list[dict]:
    """The ``top`` latents that fire most on ``positive`` texts relative to ``negative`` ones.

    Returns:
        dicts with ``latent``, ``score`` (mean max-activation difference), ``pos_mean``,
        ``neg_mean``, ``pos_frac`` / ``neg_frac`` (fraction of texts where it fires), best first.

    Raises:
        ValueError: an empty positive or negative set.
    """
    if not positive or not negative:
        raise ValueError("need at least one positive and one negative text")
    pos = max_activations(model, tokenizer, {"sae": sae}, positive)["sae"]
    neg = max_activations(model, tokenizer, {"sae": sae}, negative)["sae"]
    score = pos.mean(0) - neg.mean(0)
    best = score.topk(top).indices
    return [
        {
            "latent": int(i),
            "score": float(score[i]),
            "pos_mean": float(pos[:, i].mean()),
            "neg_mean": float(neg[:, i].mean()),
            "pos_frac": float((pos[:, i] > 0).float().mean()),
            "neg_frac": float((neg[:, i] > 0).float().mean()),
        }
        for i in best
    ]
