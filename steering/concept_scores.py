"""The two scores concept search gives each latent, and the units they compare in.

- **input score** (needs ``positive`` sentences): how much more the latent fires on sentences
  carrying the concept than on neutral ones. For each text, a latent's activation is its largest
  over the text's positions (position 0 and other attention sinks left out, as in collection:
  ``sae.activations.sink_mask``); the score is the mean over ``positive`` minus the mean over
  ``negative`` (default: ``NEUTRAL_SENTENCES``), divided by the latent's typical activation when
  the SAE has statistics (so the unit is "typical activations" and latents compare across SAEs),
  raw otherwise. (Kim & Ghadiyaram 2025's contrast; Arad et al. 2025 call such latents input
  features.)
- **output score**: how much the latent's decoder direction promotes the concept's tokens, by the
  logit lens (Arad et al. 2025, Sec. 3.2; ``sae.output_scores.logit_lens_logits``): the probability
  mass ``sum_{c in C} softmax(W_U norm_f(d_i))[c]`` on the concept tokens C. C is the first token
  of each word in ``words`` (as written, lower-case and capitalised, with and without a leading
  space); without words, the alphabetic tokens of at least 3 letters that occur in the positive
  sentences but in no negative one and are not function words (``FUNCTION_WORDS``), the 8 most
  frequent.

Scores compare within an SAE as robust z-scores (``robust_z``). Latents that never fired in the
SAE's statistics are skipped (``skip_never_fired``: they have no typical activation to suggest a
strength in).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Mapping, Sequence

import torch

from saesteer.sae.activations import hook_activations, sink_mask
from saesteer.sae.model import SAE
from saesteer.sae.output_scores import logit_lens_logits
from saesteer.sae.stats import LatentStats

MAX_DERIVED_TOKENS = 8
FUNCTION_WORDS = frozenset("""
about above across after again against along also among and another any are around because been before behind
being below beneath beside besides between beyond both but can could did does doing down during each either
every few for from had has have having her here hers herself him himself his how into its itself just like many
more most much must near neither never nor not now off once one only onto other our ours out outside over own
per rather same several she should since some such than that the their theirs them themselves then there these
they this those though through throughout till too toward towards under underneath unless until upon very was
were what when where whether which while who whom whose why will with within without would yet you your yours
""".split())
"""Words never taken as concept tokens when they are derived from sentences (prepositions,
pronouns, auxiliaries, conjunctions): they occur in any topic's sentences, and their logit-lens mass
would rank latents that promote "from" or "outside" for any concept."""
NEUTRAL_SENTENCES = (
    "The meeting was moved to Thursday afternoon.",
    "She opened the window and sat down at the desk.",
    "The report lists the figures for the last quarter.",
    "He walked to the station and waited for the train.",
    "Please fill in the form and sign at the bottom.",
    "The building has four floors and a small car park.",
    "They talked for an hour and then went home.",
    "The price includes delivery within five working days.",
)


def concept_tokens(tokenizer, words: Sequence[str], positive: Sequence[str] = (), negative: Sequence[str] = ()) -> list[int]:
    """The concept tokens C (module docstring): from ``words`` if any, else derived from the sentences.

    Raises:
        ValueError: no words and no sentences, or nothing to derive from them.
    """
    ids: list[int] = []
    if words:
        for w in words:
            w = w.strip()
            for form in {w, w.lower(), w[:1].upper() + w[1:]}:
                for text in (form, " " + form):
                    t = tokenizer(text, add_special_tokens=False)["input_ids"]
                    if t and t[0] not in ids:
                        ids.append(t[0])
        return ids
    neg = {t for s in negative for t in tokenizer(s, add_special_tokens=False)["input_ids"]}
    counts: Counter = Counter()
    for s in positive:
        for t in tokenizer(s, add_special_tokens=False)["input_ids"]:
            word = tokenizer.decode([t]).strip()
            if t not in neg and re.fullmatch(r"[A-Za-z]{3,}", word or "") and word.lower() not in FUNCTION_WORDS:
                counts[t] += 1
    ids = [t for t, _ in counts.most_common(MAX_DERIVED_TOKENS)]
    if not ids:
        raise ValueError("no concept tokens: give words, or positive sentences with words the negative ones lack")
    return ids


@torch.no_grad()
def text_rows(model, tokenizer, hook_points: Sequence[str], texts: Sequence[str]) -> dict[str, list[torch.Tensor]]:
    """{hook point: one float32 [n_i, d_in] tensor per text}: the activations at the text's
    non-sink token positions (n_i may be 0); one forward pass per text for all hook points."""
    out: dict[str, list[torch.Tensor]] = {hp: [] for hp in hook_points}
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        acts = hook_activations(model, sorted(out), ids)
        for hp, a in acts.items():
            out[hp].append(a[0][sink_mask(a)[0]].float().cpu())
    return out


@torch.no_grad()
def max_activations(model, tokenizer, saes: Mapping[str, SAE], texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """{sae id: [len(texts), d_sae] float32}: each latent's largest activation over each text's
    positions, sinks left out (0 for a text with no other position); one forward pass per text for
    all hook points."""
    rows = text_rows(model, tokenizer, {s.cfg.hook_point for s in saes.values()}, texts)
    return {sid: torch.stack([sae.encode(r.to(sae.device, sae.dtype)).max(0).values.float().cpu() if len(r)
                              else torch.zeros(sae.cfg.d_sae) for r in rows[sae.cfg.hook_point]])
            for sid, sae in saes.items()}


def hook_rows(model, tokenizer, hook_point: str, texts: Sequence[str]) -> torch.Tensor:
    """[N, d_in] float32: the activations at ``hook_point`` at the texts' non-sink token positions,
    all texts' rows together (``text_rows``, one forward pass per text)."""
    return torch.cat(text_rows(model, tokenizer, [hook_point], texts)[hook_point])


@torch.no_grad()
def concept_output_scores(model, sae: SAE, tokens: Sequence[int], batch_size: int = 512) -> torch.Tensor:
    """[d_sae] float32: logit-lens probability mass of ``tokens`` for every latent's decoder direction."""
    tok = torch.tensor(list(tokens))
    return torch.cat([torch.softmax(logits, -1)[:, tok.to(logits.device)].sum(-1).cpu()
                      for logits in logit_lens_logits(model, sae, batch_size=batch_size)])


def typical_activations(st: LatentStats | None) -> torch.Tensor | None:
    """The latents' typical activations [d_sae] float32 from statistics ``st``; None without."""
    return st.typical_activation.float() if st is not None else None


def in_typical_units(diff: torch.Tensor, typical: torch.Tensor | None) -> torch.Tensor:
    """An activation contrast [d_sae] in typical activations (raw without statistics), so that
    latents compare across SAEs."""
    return diff / typical.clamp(min=1e-6) if typical is not None else diff


def skip_never_fired(score: torch.Tensor, typical: torch.Tensor | None) -> torch.Tensor:
    """``score`` with -inf for the latents that never fired in the statistics (no typical
    activation to suggest a strength in); unchanged without statistics."""
    return score if typical is None else torch.where(typical > 0, score, torch.full_like(score, float("-inf")))


def robust_z(x: torch.Tensor) -> torch.Tensor:
    """``(x - median) / max(1.4826 * MAD, std)`` over the finite entries (MAD: median absolute
    deviation; 1 where both are 0).

    The standard deviation floors the scale: most latents score about 0 for any one concept, so the
    MAD alone can be near zero and blow one score's z-values up by orders of magnitude over the
    other's (measured on the general SAE: input z-scores near 100, output ones in the millions)."""
    x = x.double()
    fin = x[torch.isfinite(x)]
    med = fin.median()
    scale = max(float((fin - med).abs().median()) * 1.4826, float(fin.std()) if fin.numel() > 1 else 0.0)
    return ((x - med) / (scale if scale > 0 else 1.0)).float()


@torch.no_grad()
def input_scores(
    model, tokenizer, saes: Mapping[str, SAE], stats: Mapping[str, LatentStats | None],
    positive: Sequence[str], negative: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """{sae id: [d_sae] float32}: each latent's input score (module docstring), in typical
    activations where the SAE has statistics (raw otherwise), -inf for latents that never fired.

    Args:
        positive, negative: sentences with and without the concept (negative defaults to
            ``NEUTRAL_SENTENCES``).

    Raises:
        ValueError: no positive sentence.
    """
    if not positive:
        raise ValueError("input scores need at least one positive sentence")
    negative = list(negative) or list(NEUTRAL_SENTENCES)
    pos = max_activations(model, tokenizer, saes, positive)
    neg = max_activations(model, tokenizer, saes, negative)
    out = {}
    for sid in saes:
        typical = typical_activations(stats.get(sid))
        out[sid] = skip_never_fired(in_typical_units(pos[sid].mean(0) - neg[sid].mean(0), typical), typical)
    return out


