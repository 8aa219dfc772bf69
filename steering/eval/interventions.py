"""The interventions a sweep compares (``steering.eval.evaluate`` sweeps them over strength): the
families, how each chooses its latent or builds its direction (``select_latents``, ``effect_scores``,
``setup_concept``) and the plan of one sweep point (``make_plan``).

The default families (``METHODS``):

- ``latent_clamp``: the concept latent clamped to ``s x`` its typical activation (the mean activation
  when it fires, from the SAE's latent statistics, ``sae.stats``);
- ``latent_add``: ``s x`` typical activation added to the concept latent;
- ``mean_diff``: the mean-difference steering vector (mean activation at the hook point over the concept
  sentences minus over the contrast sentences; AxBench's strong baseline, Wu et al. 2025) scaled to
  ``s x`` the mean residual norm at the hook point, added at every position;
- ``decoder``: the concept latent's decoder direction scaled the same way.

and, for the AxBench-style comparison of how a latent is chosen (issue 15, part 6; each a clamp to
``s x`` the chosen latent's typical activation):

- ``latent_input``: the top latent by input score (activation contrast of the concept sentences
  against the contrast set, in typical activations; Arad et al. 2025's "input features");
- ``latent_output``: among the ``OUTPUT_POOL`` best latents by input score, the one with the
  highest output score (Arad, Mueller & Belinkov 2025, Sec. 3.2, saved beside the SAE by
  ``saesteer stats --output-scores``): their selection by effect on the output;
- ``latent_search``: the top hit of concept search (``steering.concept_search``) given the
  sentences only, i.e. what the server suggests to a user;
- ``latent_effect``: among the ``OUTPUT_POOL`` best latents by input score, the one whose clamp
  measurably brings the concept into chat answers (``effect_scores``): each candidate is clamped at
  ``EFFECT_STRENGTHS`` typical activations on the ``EFFECT_PROMPTS`` (calibration prompts, none of
  them a held-out ``NEUTRAL_PROMPTS`` prompt), and scored by the fraction of its answers that are
  fluent (distinct bigrams >= ``FLUENT_DISTINCT_BIGRAMS``) and show the concept to the judge, as
  the sweep counts them; selection by the effect on the
  output itself, where Arad et al.'s output score reads the next-token distribution. Not in
  ``AXBENCH_METHODS`` (``--method latent_effect``): measured on the 12 everyday concepts it did
  worse than ``latent_input`` (``docs/general_sae.md``);
- ``latent_mix``: several latents at once: the ``MIX_LATENTS`` latents of largest mean activation
  difference (per token over the concept sentences minus over the contrast set, either sign), their
  decoder directions summed with those differences as weights, i.e. the part of the mean-difference
  vector those latents carry (``steering.concept_mix.latent_mix``, the mix concept search
  suggests), applied as ``add`` edits on those latents whose sum has norm ``s`` times the mean
  residual norm. Not in ``AXBENCH_METHODS`` (``--method latent_mix``; ``docs/general_sae.md``);
- ``prompting``: no intervention, a system prompt asking the model to bring the concept in
  (AxBench's strongest baseline); one strength, 1.

Strength 0 is the unsteered baseline of every family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from saesteer.sae.model import SAE
from saesteer.sae.stats import LatentStats
from saesteer_client.schema import DEFAULT_MIX_LATENTS, DEFAULT_MIX_SIGNS, DEFAULT_MIX_STRENGTH

from ..concept_mix import FIT_PROMPTS, fit_mix, latent_mix
from ..concept_scores import hook_rows
from ..generate import GenerationSpec, generate, render_prompt
from ..hooks import Steerer
from ..plan import InterventionPlan, LatentEdit, VectorEdit, resid_norm_vector, typical_to_raw
from .concepts import contrast_latents
from .scoring import Concept, ConceptScorer, distinct_bigrams
from .summary import FLUENT_DISTINCT_BIGRAMS

METHODS = ("latent_clamp", "latent_add", "mean_diff", "decoder")
"""The default families (``saesteer eval-steering`` without ``--method``)."""
AXBENCH_METHODS = ("latent_input", "latent_output", "latent_search", "mean_diff", "prompting")
"""How a latent is chosen, against the two baselines (``saesteer eval-steering --axbench``)."""
SELECTED = {"latent_input": "input", "latent_output": "output", "latent_search": "search", "latent_effect": "effect"}
"""Families that clamp a latent chosen by a rule, and the rule's key in ``SteeringSetup.selected``."""
ALL_METHODS = METHODS + tuple(SELECTED) + ("latent_mix", "prompting")
MIX_LATENTS = DEFAULT_MIX_LATENTS
"""Latents ``latent_mix`` sums: concept search's default (cosine with the mean-difference direction
on the default SAE: top 32 0.57-0.76, top 128 0.78-0.88, top 512 0.90-0.95)."""
OUTPUT_POOL = 10
"""``latent_output`` takes the best output score among this many best latents by input score."""
PROMPTING_SYSTEM = "Whatever the user asks, bring {concept} into your answer."
"""The prompting baseline's system prompt; ``{concept}`` is the concept's name."""

EFFECT_PROMPTS = FIT_PROMPTS + (
    "What would you do with a free afternoon?",
    "Tell me about a place you remember.",
    "Give me a fun fact.",
)
"""Calibration prompts of ``latent_effect`` (disjoint from ``NEUTRAL_PROMPTS``; the first three are
``fit_mix``'s)."""
EFFECT_STRENGTHS = (4.0, 8.0)
"""Clamp strengths (typical activations) at which ``latent_effect`` tries each candidate."""
EFFECT_TOKENS = 32
"""Greedy tokens per calibration answer (as many as the sweep's answers)."""


@dataclass
class SteeringSetup:
    """Everything a sweep needs for one concept: the latent, its unit, the vectors.

    Attributes:
        latent: the concept latent; typical: its typical activation (latent unit).
        resid_norm: mean residual norm at the hook point (vector unit).
        mean_diff, decoder: unit-norm float32 [d_in] directions.
        mix: the ``latent_mix`` direction (unit norm, float32 [d_in]) and mix_latents its
            {latent: weight} (weights that sum the decoder directions to ``mix``); None unless the
            sweep runs ``latent_mix``.
    """

    latent: int
    typical: float
    resid_norm: float
    mean_diff: torch.Tensor
    decoder: torch.Tensor
    latent_search: list[dict] = field(default_factory=list)
    mix: torch.Tensor | None = None
    mix_latents: dict[int, float] | None = None
    selected: dict[str, dict] = field(default_factory=dict)
    """By selection rule (``"input"``, ``"output"``, ``"search"``): ``latent``, ``typical``,
    ``input_score``, ``output_score`` (None where not computed)."""


def effect_scores(model, tokenizer, sae: SAE, stats: LatentStats, concept: Concept, candidates: Sequence[int], judge,
                  prompts: Sequence[str] = EFFECT_PROMPTS, strengths: Sequence[float] = EFFECT_STRENGTHS,
                  max_new_tokens: int = EFFECT_TOKENS, batch_size: int = 32, judge_threshold: float = 0.4) -> list[float]:
    """How much clamping each candidate latent brings ``concept`` into chat answers: for every
    candidate, strength s (typical activations) and prompt, ``max_new_tokens`` greedy tokens with
    the latent clamped to s x its typical activation at every position. An answer counts when it is
    fluent (distinct bigrams >= ``FLUENT_DISTINCT_BIGRAMS``) and the judge finds the concept
    (``cos(answer, c+) > judge_threshold``, as the sweep counts it); a strength scores the fraction
    of answers that count plus a tenth of the mean similarity of the fluent ones (the tie-break), and
    a candidate its best strength.

    Args:
        candidates: latent indices; one that never fired in ``stats`` (no typical activation, no
            unit) scores -inf.
        judge: a ``steering.eval.judge.SentenceJudge``.

    Returns:
        One score per candidate, in order (higher: more of the concept, fluently).
    """
    scorer = ConceptScorer(judge, concept)
    ids = [render_prompt(tokenizer, None, [{"role": "user", "content": p}]) for p in prompts]
    specs, owners = [], []
    for c, latent in enumerate(candidates):
        typical = stats.typical(int(latent))
        if not typical > 0:
            continue
        for s in strengths:
            plan = InterventionPlan(latent_edits=[LatentEdit("sae", int(latent), "clamp", typical_to_raw(s, typical), "all")])
            for j, x in enumerate(ids):
                specs.append(GenerationSpec(input_ids=x, max_new_tokens=max_new_tokens, plan=plan))
                owners.append((c, s))
    results = []
    steerer = Steerer(model, {"sae": sae})
    for i in range(0, len(specs), batch_size):
        results.extend(generate(model, tokenizer, specs[i: i + batch_size], steerer))
    sim = scorer.scores([r.text for r in results])[0] if results else torch.zeros(0)
    eos = tokenizer.eos_token_id
    per: dict[tuple[int, float], list[float]] = {}
    for r, (c, s), v in zip(results, owners, sim.tolist()):
        fluent = distinct_bigrams([t for t in r.tokens if t != eos]) >= FLUENT_DISTINCT_BIGRAMS
        per.setdefault((c, s), []).append(float(fluent and v > judge_threshold) + 0.1 * (v if fluent else 0.0))
    best = [-math.inf] * len(candidates)
    for (c, _), vals in per.items():
        best[c] = max(best[c], sum(vals) / len(vals))
    return best


def select_latents(model, tokenizer, sae: SAE, stats: LatentStats, concept: Concept, rules: Sequence[str],
                   output=None, judge=None, judge_threshold: float = 0.4) -> dict[str, dict]:
    """The concept's latent by each selection rule in ``rules`` (module docstring: ``latent_input``,
    ``latent_output``, ``latent_search``, ``latent_effect``).

    Args:
        output: the SAE's ``LatentOutput`` (``sae.output_scores.load_latent_output``); needed for ``"output"``.
        judge: the ``SentenceJudge``; needed for ``"effect"``.
        judge_threshold: the similarity above which ``"effect"`` counts the concept as present.

    Returns:
        {rule: {"latent", "typical", "input_score", "output_score"}}; ``"effect"`` adds
        ``effect_score`` and the pool's ``effect_pool`` ({latent: score}).

    Raises:
        ValueError: ``"output"`` without output scores, ``"effect"`` without a judge; an unknown rule.
    """
    from saesteer.steering.concept_scores import input_scores
    from saesteer.steering.concept_search import search_concepts

    unknown = set(rules) - set(SELECTED.values())
    if unknown:
        raise ValueError(f"unknown selection rules {sorted(unknown)}")
    if "output" in rules and output is None:
        raise ValueError("latent_output needs the SAE's output scores: run `saesteer stats SAE --output-scores`")
    if "effect" in rules and judge is None:
        raise ValueError("latent_effect needs the judge")
    out: dict[str, int] = {}
    score = None
    effect: dict[int, float] = {}
    if {"input", "output", "effect"} & set(rules):
        score = input_scores(model, tokenizer, {"sae": sae}, {"sae": stats}, concept.positive, concept.negative)["sae"]
        pool = score.topk(OUTPUT_POOL).indices.tolist()
        out["input"] = pool[0]
        if output is not None:
            out["output"] = max(pool, key=lambda i: float(output.output_score[i]))
        if "effect" in rules:
            effect = dict(zip(pool, effect_scores(model, tokenizer, sae, stats, concept, pool, judge,
                                                  judge_threshold=judge_threshold)))
            out["effect"] = max(pool, key=lambda i: effect[i])
    if "search" in rules:
        hits = search_concepts(model, tokenizer, {"sae": sae}, {"sae": stats}, concept.positive, concept.negative, top_k=1)
        out["search"] = hits[0].latent
    sel = {
        rule: {"latent": int(i), "typical": stats.typical(int(i)),
               "input_score": None if score is None else float(score[i]),
               "output_score": None if output is None else float(output.output_score[i])}
        for rule, i in out.items() if rule in rules
    }
    if "effect" in sel:
        sel["effect"]["effect_score"] = effect[out["effect"]]
        sel["effect"]["effect_pool"] = {int(i): round(v, 4) for i, v in effect.items()}
    return sel


def setup_concept(model, tokenizer, sae: SAE, stats: LatentStats, concept: Concept,
                  methods: Sequence[str] = METHODS, output=None, judge=None, judge_threshold: float = 0.4,
                  mix_latents: int = MIX_LATENTS, mix_signs: str = DEFAULT_MIX_SIGNS,
                  mix_max_frequency: float | None = None, mix_fit_steps: int = 0, positions: str = "all") -> SteeringSetup:
    """Find the concept latent (unless given), the latents of the selection rules ``methods`` use,
    and build the steering directions.

    Args:
        output: the SAE's output scores, for ``latent_output``.
        judge: the ``SentenceJudge``, for ``latent_effect``; judge_threshold: where it counts the concept.
        mix_latents: how many latents ``latent_mix`` sums; mix_signs, mix_max_frequency: which
            (``concept_mix.latent_mix``; the frequencies are the statistics'); mix_fit_steps:
            ``concept_mix.fit_mix`` steps reweighting the mix at ``DEFAULT_MIX_STRENGTH`` and
            ``positions`` (where the sweep steers; 0: none).

    Raises:
        ValueError: the chosen latent never fired in the statistics (no unit); ``latent_output``
            without output scores; ``latent_effect`` without a judge.
    """
    search = []
    latent = concept.latent
    if latent is None:
        search = contrast_latents(model, tokenizer, sae, concept.positive, concept.negative, top=5)
        latent = next((r["latent"] for r in search if stats.typical_activation[r["latent"]] > 0), search[0]["latent"])
    selected = select_latents(model, tokenizer, sae, stats, concept, [SELECTED[m] for m in methods if m in SELECTED], output,
                              judge, judge_threshold)
    hook_point = sae.cfg.hook_point
    pos, neg = hook_rows(model, tokenizer, hook_point, concept.positive), hook_rows(model, tokenizer, hook_point, concept.negative)
    diff = pos.mean(0) - neg.mean(0)
    dec = sae.decoder_directions(torch.tensor([latent], device=sae.device))[0].float().cpu()
    mix, mix_latents = latent_mix(sae, pos, neg, mix_latents, mix_signs, stats.frequency,
                                  mix_max_frequency) if "latent_mix" in methods else (None, None)
    if mix_latents and mix_fit_steps:
        fit = fit_mix(model, tokenizer, sae, concept.positive, mix_latents, float(stats.resid_norm_mean),
                      DEFAULT_MIX_STRENGTH, mix_fit_steps, positions=positions)
        mix, mix_latents = fit.direction, fit.weights
    return SteeringSetup(
        latent=int(latent),
        typical=stats.typical(int(latent)),
        resid_norm=float(stats.resid_norm_mean),
        mean_diff=F.normalize(diff, dim=0),
        decoder=F.normalize(dec, dim=0),
        latent_search=search,
        mix=mix,
        mix_latents=mix_latents,
        selected=selected,
    )


def make_plan(method: str, strength: float, setup: SteeringSetup, sae_id: str, hook_point: str,
              positions: str = "all") -> InterventionPlan:
    """The plan of one sweep point: empty at strength 0, for ``"unsteered"``, and for ``"prompting"``
    (whose change is its system prompt, ``PROMPTING_SYSTEM``). Every edit applies at ``positions``
    (``"all"``, ``"prompt"`` or ``"generated"``, as in a request; the attention sink never).

    Raises:
        ValueError: an unknown method.
    """
    if method in ("unsteered", "prompting") or strength == 0:
        return InterventionPlan()
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {ALL_METHODS}")
    if method in SELECTED:
        sel = setup.selected[SELECTED[method]]
        return InterventionPlan(latent_edits=[LatentEdit(sae_id, sel["latent"], "clamp", typical_to_raw(strength, sel["typical"]), positions)])
    if method in ("latent_clamp", "latent_add"):
        op = "clamp" if method == "latent_clamp" else "add"
        return InterventionPlan(latent_edits=[LatentEdit(sae_id, setup.latent, op, typical_to_raw(strength, setup.typical), positions)])
    if method == "latent_mix":  # the latents themselves, as concept search suggests them: add s R w_i to each
        return InterventionPlan(latent_edits=[LatentEdit(sae_id, i, "add", strength * setup.resid_norm * w, positions)
                                              for i, w in setup.mix_latents.items()])
    direction = {"mean_diff": setup.mean_diff, "decoder": setup.decoder}[method]
    return InterventionPlan(vector_edits=[VectorEdit(hook_point, resid_norm_vector(direction, strength, setup.resid_norm), positions)])
