"""What a steer does, measured: concept, fluency and relevance across strengths (``saesteer eval-steering``).

For one concept (a few sentences that carry it and a contrast set that does not) and one SAE, four
families of interventions are swept over strength, each on the same held-out neutral chat prompts
(greedy decoding, position 0 never steered; the families: ``steering.eval.interventions``), and
every answer is scored for concept, fluency and relevance. Strength 0 is the unsteered baseline of
every family.

This module holds the sweep: its strength grids (``DEFAULT_STRENGTHS``), its prompts
(``NEUTRAL_PROMPTS``), its options (``SweepConfig``) and ``sweep``, which generates and scores every
point for one concept. The rest of the harness, a job a module:

- ``steering.eval.interventions``: the families, how each chooses its latent or builds its direction,
  and the plan of one sweep point;
- ``steering.eval.scoring``: the concepts and the scores of one answer (concept, fluency, relevance);
- ``steering.eval.summary``: the AxBench score and each method's best point;
- ``steering.eval.report``: the Markdown tables, the plot and the report files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from saesteer.sae.model import SAE
from saesteer.sae.stats import LatentStats
from saesteer_client.schema import DEFAULT_MIX_FIT_STEPS, DEFAULT_MIX_SIGNS

from ..generate import GenerationSpec, generate, render_prompt
from ..hooks import Steerer
from .interventions import METHODS, MIX_LATENTS, PROMPTING_SYSTEM, make_plan, setup_concept
from .scoring import Concept, ConceptScorer, completion_nll, distinct_bigrams
from .summary import axbench_parts, best_at_fluency, best_axbench

DEFAULT_STRENGTHS = {
    "latent_clamp": (2.0, 4.0, 8.0),
    "latent_add": (2.0, 4.0, 8.0),
    "mean_diff": (0.15, 0.25, 0.5, 0.75),
    "decoder": (0.15, 0.25, 0.5, 0.75),
    "latent_input": (2.0, 4.0, 8.0),
    "latent_output": (2.0, 4.0, 8.0),
    "latent_search": (2.0, 4.0, 8.0),
    "latent_effect": (2.0, 4.0, 8.0),
    "latent_mix": (0.15, 0.25, 0.5, 0.75),
    "prompting": (1.0,),
}
"""Strength grids: latent families in multiples of the latent's typical activation, vector families
in multiples of the mean residual norm at the hook point. Strength 0 (unsteered) is always added.
Measured on SmolLM2 block 10 (``docs/steering_eval.md``): vectors degenerate the text beyond about
0.75 and latents beyond about 8 typical activations. Vectors start at 0.15: on the 12 everyday
concepts at block 10 it was mean_diff's best strength for 4, and its mean AxBench score went from
0.147 to 0.181 (``docs/general_sae.md``)."""
NEUTRAL_PROMPTS = (
    "Write one sentence about your weekend.",
    "Tell me a short story.",
    "What should I cook tonight?",
    "Describe your ideal day.",
    "Give me some advice for a job interview.",
    "What is your favourite season and why?",
    "Write a short poem.",
    "What did you learn today?",
)
"""Held-out neutral chat prompts (none is used to find concept latents or vectors)."""


@dataclass
class SweepConfig:
    """Options of one sweep. Strengths per method in the units of ``DEFAULT_STRENGTHS``."""

    methods: tuple[str, ...] = METHODS
    strengths: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_STRENGTHS))
    prompts: tuple[str, ...] = NEUTRAL_PROMPTS
    max_new_tokens: int = 32
    batch_size: int = 32
    fluency_budget: float = 3.0
    """For the summary: a point is "fluent" when its mean perplexity <= budget x the unsteered one.
    Moving the topic alone raises the perplexity under the unsteered model: fluent on-concept
    answers measured 2-3x on SmolLM2 (``docs/steering_eval.md``), degenerate ones 5-100x."""
    judge_threshold: float = 0.4
    """A generation shows the concept when its judge similarity to the concept exceeds this."""
    mix_latents: int = MIX_LATENTS
    """How many latents ``latent_mix`` sums."""
    mix_signs: str = DEFAULT_MIX_SIGNS
    """Which latents ``latent_mix`` takes: ``"positive"`` (those the concept turns up, as concept
    search suggests) or ``"both"`` (up and down: the SAE's code of the mean-difference vector)."""
    mix_max_frequency: float | None = None
    """``latent_mix`` leaves out latents that fire on more than this fraction of tokens (None: none)."""
    mix_fit_steps: int = DEFAULT_MIX_FIT_STEPS
    """``fit_mix`` steps reweighting ``latent_mix``'s latents by the model's output, as concept search
    does by default (0: the contrast weights)."""
    positions: str = "all"
    """Where every steering edit applies: ``"all"``, ``"prompt"`` or ``"generated"``."""
    repetition_penalty: float = 1.0
    """Every answer's (the unsteered ones' too) ``GenerationSpec.repetition_penalty`` (1: off)."""


def sweep(model, tokenizer, sae: SAE, stats: LatentStats, concept: Concept, judge, cfg: SweepConfig | None = None,
          sae_id: str = "sae", progress: bool = True, output=None) -> dict:
    """Generate and score every (method, strength, prompt) point for one concept.

    Args:
        output: the SAE's output scores (``sae.output_scores.load_latent_output``), for ``latent_output``.

    Returns:
        A JSON-ready report: ``concept``, ``setup`` (latent, units, the selected latents), ``points``
        (one per method and strength: ``concept_rate``, ``concept_margin``, ``keyword_rate``,
        ``latent_activation``, ``perplexity``, ``distinct_bigrams``, ``relevance``, ``fluent_rate``,
        ``fluent_concept_rate`` (answers both fluent, as the AxBench score's fluency part, and on
        concept), ``axbench``, ``samples`` with each answer's ``fluent``), ``best`` (per method, the
        strongest concept rate among fluent points) and ``best_axbench`` (per method, the point of
        best AxBench score).
    """
    cfg = cfg or SweepConfig()
    hook_point = sae.cfg.hook_point
    setup = setup_concept(model, tokenizer, sae, stats, concept, cfg.methods, output, judge, cfg.judge_threshold,
                          cfg.mix_latents, cfg.mix_signs, cfg.mix_max_frequency, cfg.mix_fit_steps,
                          cfg.positions)
    scorer = ConceptScorer(judge, concept)
    prompt_ids = [render_prompt(tokenizer, None, [{"role": "user", "content": p}]) for p in cfg.prompts]
    system = PROMPTING_SYSTEM.format(concept=concept.name)
    prompted_ids = [render_prompt(tokenizer, None, [{"role": "system", "content": system}, {"role": "user", "content": p}])
                    for p in cfg.prompts]
    grid = [("unsteered", 0.0)] + [(m, float(s)) for m in cfg.methods for s in cfg.strengths[m] if s != 0]
    specs, owners = [], []
    for m, s in grid:
        plan = make_plan(m, s, setup, sae_id, hook_point, cfg.positions)
        for j, ids in enumerate(prompted_ids if m == "prompting" else prompt_ids):
            specs.append(GenerationSpec(input_ids=ids, max_new_tokens=cfg.max_new_tokens, plan=plan,
                                        repetition_penalty=cfg.repetition_penalty))
            owners.append((m, s, j))
    steerer = Steerer(model, {sae_id: sae})
    results = []
    bar = tqdm(total=len(specs), desc=f"steer {concept.name}", unit="gen", disable=not progress)
    for i in range(0, len(specs), cfg.batch_size):
        results.extend(generate(model, tokenizer, specs[i : i + cfg.batch_size], steerer))
        bar.update(len(specs[i : i + cfg.batch_size]))
    bar.close()
    eos = tokenizer.eos_token_id
    comp = [[t for t in r.tokens if t != eos] for r in results]
    texts = [r.text for r in results]
    nll, acts = completion_nll(model, [prompt_ids[j] for _, _, j in owners], comp, hook_point=hook_point)
    lat = torch.tensor([setup.latent], device=sae.device)
    lat_act = [float(sae.encode_latents(a.to(sae.device), lat).max()) if a is not None else 0.0 for a in acts]
    emb = judge.embed(texts)
    sim, margin = scorer.scores(embeddings=emb)
    kw = scorer.keyword_hits(texts)
    prompt_emb = judge.embed(list(cfg.prompts))
    rel = (emb * prompt_emb[[j for _, _, j in owners]]).sum(-1)
    hit = sim > cfg.judge_threshold  # [n] bool: the judge finds the concept
    parts = axbench_parts(owners, [math.exp(x) for x in nll], [distinct_bigrams(c) for c in comp], hit,
                          rel, cfg.fluency_budget)
    points = []
    for m, s in grid:
        idx = [i for i, (mm, ss, _) in enumerate(owners) if mm == m and ss == s]
        ppl = [math.exp(nll[i]) for i in idx if not math.isnan(nll[i])]
        points.append({
            "method": m,
            "strength": s,
            "concept_rate": float(hit[idx].float().mean()),
            "concept_similarity": float(sim[idx].mean()),
            "concept_margin": float(margin[idx].mean()),
            "keyword_rate": (sum(kw[i] for i in idx) / len(idx)) if kw is not None else None,
            "latent_activation": sum(lat_act[i] for i in idx) / len(idx),
            "perplexity": sum(ppl) / len(ppl) if ppl else math.nan,
            "distinct_bigrams": sum(distinct_bigrams(comp[i]) for i in idx) / len(idx),
            "relevance": float(rel[idx].mean()),
            "fluent_rate": sum(parts["fluent"][i] for i in idx) / len(idx),
            "fluent_concept_rate": sum(parts["fluent"][i] * bool(hit[i]) for i in idx) / len(idx),
            "axbench": sum(parts["hm"][i] for i in idx) / len(idx),
            "samples": [{"prompt": cfg.prompts[owners[i][2]], "text": texts[i], "concept_similarity": round(float(sim[i]), 4),
                         "fluent": bool(parts["fluent"][i])} for i in idx],
        })
    base = next(p for p in points if p["strength"] == 0)
    for p in points:  # strength 0 is shared by every family
        p["perplexity_ratio"] = p["perplexity"] / base["perplexity"] if base["perplexity"] > 0 else math.nan
    return {
        "concept": asdict(concept),
        "sae": {"id": sae_id, "hook_point": hook_point, "d_sae": sae.cfg.d_sae, "architecture": sae.cfg.architecture},
        "setup": {"latent": setup.latent, "typical_activation": setup.typical, "resid_norm_mean": setup.resid_norm,
                  "latent_search": setup.latent_search, "selected": setup.selected, "prompting_system": system,
                  **({"mix_latents": {str(k): float(f"{v:.6g}") for k, v in setup.mix_latents.items()},
                      "mix_cos_mean_diff": float(setup.mix @ setup.mean_diff)} if setup.mix is not None else {})},
        "config": {"methods": list(cfg.methods), "strengths": {m: list(cfg.strengths[m]) for m in cfg.methods},
                   "prompts": list(cfg.prompts), "max_new_tokens": cfg.max_new_tokens, "fluency_budget": cfg.fluency_budget,
                   "judge_threshold": cfg.judge_threshold, "positions": cfg.positions, "mix_signs": cfg.mix_signs,
                   "mix_max_frequency": cfg.mix_max_frequency, "mix_fit_steps": cfg.mix_fit_steps,
                   "repetition_penalty": cfg.repetition_penalty},
        "points": points,
        "best": best_at_fluency(points, cfg.methods, cfg.fluency_budget),
        "best_axbench": best_axbench(points, cfg.methods),
    }
