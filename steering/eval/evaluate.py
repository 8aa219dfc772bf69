"""What a steer does, measured: concept, fluency and relevance across strengths (``saesteer eval-steering``).

For one concept (a few sentences that carry it and a contrast set that does not) and one SAE, four
families of interventions are swept over strength, each on the same held-out neutral chat prompts
(greedy decoding, position 0 never steered):

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
  vector those latents carry (``steering.concept_search.latent_mix``, the mix concept search
  suggests), applied as ``add`` edits on those latents whose sum has norm ``s`` times the mean
  residual norm. Not in ``AXBENCH_METHODS`` (``--method latent_mix``; ``docs/general_sae.md``);
- ``prompting``: no intervention, a system prompt asking the model to bring the concept in
  (AxBench's strongest baseline); one strength, 1.

Each generation is scored for

- concept: the all-MiniLM-L6-v2 judge (``steering.eval.judge``): ``similarity = cos(g, c+)`` where c+ is
  the normalised mean embedding of the concept sentences; the concept counts as present when it
  exceeds ``judge_threshold`` (0.4 by default: on our five concepts, sentences that name the concept
  score 0.45-0.6, unrelated ones 0.0-0.25 and neighbouring topics, a dog for cats or a beach for
  the ocean, about 0.35); ``margin = cos(g, c+) - cos(g, c-)`` against the contrast sentences is
  reported beside it; also the concept latent's largest activation on the
  generated tokens (read by the unsteered model) and, when the concept lists keywords, a regex hit;
- fluency: perplexity of the generated tokens under the unsteered model, given the prompt
  (``exp`` of the mean next-token NLL), with the distinct-bigram ratio beside it because repetitive
  text can have a low perplexity;
- relevance: cosine similarity of the prompt's and the answer's embeddings.

Perplexity and relevance are always taken against the plain user prompt (for ``prompting`` too: the
scorer does not see its system prompt).

**AxBench score.** Wu et al. (2025) rate concept, instruction relevance and fluency 0-2 with an LLM
judge and take the harmonic mean per answer. We have no LLM judge, so each part is in [0, 1]:

- ``concept`` is 1 when the judge finds the concept;
- ``fluency`` is 1 when the answer's perplexity is within ``fluency_budget`` x the unsteered mean
  and its distinct-bigram ratio is at least ``FLUENT_DISTINCT_BIGRAMS``;
- ``relevance`` is its prompt cosine over the unsteered answer's for the same prompt, clipped to [0, 1].

``axbench`` is the mean over answers of the harmonic mean of the three (0 when any is 0). As in
AxBench, each method is also summarised at its strength of best mean score.

Strength 0 is the unsteered baseline of every family.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saesteer.sae.lm import resolve_hook_point
from saesteer.sae.model import SAE
from saesteer.sae.stats import LatentStats
from saesteer_client.schema import DEFAULT_MIX_FIT_STEPS, DEFAULT_MIX_LATENTS, DEFAULT_MIX_SIGNS, DEFAULT_MIX_STRENGTH

from ..concept_search import FIT_PROMPTS, NEUTRAL_SENTENCES, fit_mix, hook_rows, latent_mix
from ..generate import GenerationSpec, generate, render_prompt, right_padded
from ..hooks import Steerer
from ..plan import InterventionPlan, LatentEdit, VectorEdit, resid_norm_vector, typical_to_raw
from .concepts import contrast_latents

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
OUTPUT_POOL = 10
"""``latent_output`` takes the best output score among this many best latents by input score."""
FLUENT_DISTINCT_BIGRAMS = 0.6
"""For the AxBench score an answer is fluent only with at least this distinct-bigram ratio (a loop
that repeats itself can have a low perplexity)."""
PROMPTING_SYSTEM = "Whatever the user asks, bring {concept} into your answer."
"""The prompting baseline's system prompt; ``{concept}`` is the concept's name."""

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
class Concept:
    """A concept to steer toward.

    Attributes:
        name: a label.
        positive: sentences that carry the concept (they define the judge's concept embedding, the
            mean-difference vector and, by contrast, the concept latent).
        negative: neutral contrast sentences.
        latent: the concept latent; None finds it by contrast (``steering.eval.concepts``).
        keywords: optional words whose appearance (case-insensitive, word start) also marks the concept.
    """

    name: str
    positive: list[str]
    negative: list[str]
    latent: int | None = None
    keywords: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "Concept":
        """A concept from its JSON object; without ``negative``, concept search's default
        (``NEUTRAL_SENTENCES``), as a search sent only positive sentences gets (issue 15's unseen
        concepts, ``benchmarks/unseen_concepts.json``).

        Raises:
            ValueError: unknown keys or empty sentence sets.
        """
        unknown = set(d) - {"name", "positive", "negative", "latent", "keywords"}
        if unknown:
            raise ValueError(f"concept {d.get('name')!r}: unknown keys {sorted(unknown)}")
        c = cls(**{"negative": list(NEUTRAL_SENTENCES), **d})
        if not c.positive or not c.negative:
            raise ValueError(f"concept {c.name!r}: needs positive and negative sentences")
        return c


def load_concepts(path: str | Path) -> list[Concept]:
    """Concepts from a JSON file holding one concept object or a list of them."""
    doc = json.loads(Path(path).read_text())
    return [Concept.from_dict(d) for d in (doc if isinstance(doc, list) else [doc])]


# -- scoring ----------------------------------------------------------------------------------------
@torch.no_grad()
def completion_nll(
    model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
    hook_point: str | None = None, batch_size: int = 16,
) -> tuple[list[float], list[torch.Tensor | None]]:
    """Mean next-token NLL (nats) of each completion given its prompt, under ``model`` as it is.

    Rows are right-padded; the NLL of completion token t is read from the logits at t - 1.

    Args:
        hook_point: also return the activation at this hook point on each row's completion positions
            (float32 [n_completion, d_in]; None for an empty completion).

    Returns:
        (nll per row, nan for an empty completion; activations per row or Nones).
    """
    dev = next(model.parameters()).device
    nll: list[float] = []
    acts: list[torch.Tensor | None] = []
    for i in range(0, len(prompt_ids), batch_size):
        ps, cs = prompt_ids[i : i + batch_size], completion_ids[i : i + batch_size]
        ids, attn = right_padded([list(p) + list(c) for p, c in zip(ps, cs)], pad=0)
        box = {}
        handle = resolve_hook_point(model, hook_point).attach(lambda x: box.__setitem__("x", x.detach())) if hook_point else None
        try:
            logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False).logits.float()
        finally:
            if handle is not None:
                handle.remove()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        tok_nll = -logp.gather(-1, ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
        for b, (p, c) in enumerate(zip(ps, cs)):
            lo, hi = len(p), len(p) + len(c)
            nll.append(float(tok_nll[b, lo - 1 : hi - 1].mean()) if c else math.nan)
            acts.append(box["x"][b, lo:hi].float().cpu() if hook_point and c else None)
    return nll, acts


def distinct_bigrams(tokens: Sequence[int]) -> float:
    """Unique bigrams / bigrams of a token sequence (1.0 for fewer than two tokens)."""
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


class ConceptScorer:
    """Scores generations for one concept (see the module docstring).

    Args:
        judge: a ``steering.eval.judge.SentenceJudge``.
        concept: the concept (its sentences define c+ and c-).
    """

    def __init__(self, judge, concept: Concept):
        self.judge, self.concept = judge, concept
        e = judge.embed(list(concept.positive) + list(concept.negative))
        n = len(concept.positive)
        self.c_pos = F.normalize(e[:n].mean(0), dim=0)
        self.c_neg = F.normalize(e[n:].mean(0), dim=0)
        self.keyword_re = (
            re.compile(r"\b(" + "|".join(re.escape(k) for k in concept.keywords) + r")(s|es|ed|ing)?\b", re.IGNORECASE)
            if concept.keywords else None
        )

    def scores(self, texts: Sequence[str] | None = None, embeddings: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarity cos(text, c+), margin cos(text, c+) - cos(text, c-)), each [n] float32, for
        ``texts`` or for their judge ``embeddings`` [n, 384] when already computed."""
        e = embeddings if embeddings is not None else self.judge.embed(list(texts or []))
        sim = e @ self.c_pos
        return sim, sim - e @ self.c_neg

    def keyword_hits(self, texts: Sequence[str]) -> list[bool] | None:
        return [bool(self.keyword_re.search(t)) for t in texts] if self.keyword_re else None


# -- interventions ----------------------------------------------------------------------------------
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
    from saesteer.steering.concept_search import input_scores, search_concepts

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
            (``concept_search.latent_mix``; the frequencies are the statistics'); mix_fit_steps:
            ``concept_search.fit_mix`` steps reweighting the mix at ``DEFAULT_MIX_STRENGTH`` and
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


# -- the sweep --------------------------------------------------------------------------------------
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


def fluent_answer(perplexity: float, distinct: float, limit: float) -> bool:
    """The per-answer fluency rule (module docstring): perplexity under the unsteered model at most
    ``limit`` (the fluency budget times the unsteered answers' mean; NaN, an empty answer, fails) and
    a distinct-bigram ratio of at least ``FLUENT_DISTINCT_BIGRAMS``."""
    return not math.isnan(perplexity) and perplexity <= limit and distinct >= FLUENT_DISTINCT_BIGRAMS


def axbench_parts(owners: Sequence[tuple[str, float, int]], perplexity: Sequence[float], distinct: Sequence[float],
                  concept_hit: torch.Tensor, relevance: torch.Tensor, fluency_budget: float) -> dict[str, list[float]]:
    """Per answer, the AxBench parts and their harmonic mean (module docstring).

    Args:
        owners: (method, strength, prompt index) of each answer; strength 0 marks the unsteered ones.
        perplexity: each answer's perplexity under the unsteered model (NaN for an empty answer).
        distinct: each answer's distinct-bigram ratio.
        concept_hit: [n] bool, the judge found the concept; relevance: [n] float32 prompt cosine.

    Returns:
        ``{"fluent": [0/1], "relevance": [0..1], "hm": [0..1]}``, one entry per answer.
    """
    base = [i for i, (_, s, _) in enumerate(owners) if s == 0]
    base_ppl = [perplexity[i] for i in base if not math.isnan(perplexity[i])]
    limit = fluency_budget * (sum(base_ppl) / len(base_ppl)) if base_ppl else math.inf
    base_rel = {owners[i][2]: float(relevance[i]) for i in base}
    fluent, rel, hm = [], [], []
    for i, (_, _, j) in enumerate(owners):
        f = float(fluent_answer(perplexity[i], distinct[i], limit))
        r = min(1.0, max(0.0, float(relevance[i]) / base_rel[j])) if base_rel.get(j, 0.0) > 0 else 0.0
        c = float(concept_hit[i])
        fluent.append(f)
        rel.append(r)
        hm.append(3.0 / (1.0 / c + 1.0 / f + 1.0 / r) if min(c, f, r) > 0 else 0.0)
    return {"fluent": fluent, "relevance": rel, "hm": hm}


def best_axbench(points: list[dict], methods: Sequence[str]) -> dict:
    """Per method: the point (the unsteered one included) of highest mean AxBench score, as AxBench
    picks each method's steering factor."""
    base = next(p for p in points if p["strength"] == 0)
    out = {}
    for m in methods:
        b = max([base] + [p for p in points if p["method"] == m], key=lambda p: (p.get("axbench", 0.0), p["concept_rate"]))
        out[m] = {k: b.get(k) for k in ("strength", "axbench", "concept_rate", "keyword_rate", "fluent_rate", "perplexity_ratio",
                                        "relevance")}
    return out


def best_at_fluency(points: list[dict], methods: Sequence[str], budget: float) -> dict:
    """Per method: the point with the highest concept rate (then keyword rate, then similarity) among points with
    ``perplexity_ratio <= budget`` (the unsteered point always qualifies)."""
    out = {}
    base = next(p for p in points if p["strength"] == 0)
    for m in methods:
        cands = [p for p in points if (p["method"] == m or p is base) and p["perplexity_ratio"] <= budget]
        b = max(cands, key=lambda p: (p["concept_rate"], p["keyword_rate"] or 0.0, p["concept_similarity"]))
        out[m] = {k: b[k] for k in ("strength", "concept_rate", "keyword_rate", "concept_similarity", "perplexity",
                                    "perplexity_ratio", "relevance")}
    return out


def concept_rate_at_budget(points: list[dict], method: str, budget: float) -> float:
    """The best concept rate ``method`` reaches with its mean perplexity at most ``budget`` x the
    unsteered one, reading its strength grid as a piecewise-linear curve from the unsteered point:
    the best of its points within the budget and of the concept rates interpolated where the curve
    crosses the budget (between two neighbouring strengths, one within and one beyond).
    ``best_at_fluency`` compares grid points, which can sit at different fluency (one method's best
    at 2.2x, the other's at 2.9x); here two methods meet at the same perplexity, and a coarse grid
    costs less. The unsteered point (ratio 1) is always within, so a method whose every strength
    breaks the budget gets the unsteered rate or the interpolation toward its weakest strength.

    Args:
        points: a sweep's ``points`` (with ``perplexity_ratio``); method: one of its methods;
            budget: the perplexity ratio allowed (``SweepConfig.fluency_budget``).

    Returns:
        A concept rate in [0, 1].
    """
    base = next(p for p in points if p["strength"] == 0)
    curve = [base] + sorted((p for p in points if p["method"] == method and p["strength"] != 0), key=lambda p: p["strength"])
    best = max(p["concept_rate"] for p in curve if p["perplexity_ratio"] <= budget)
    for a, b in zip(curve, curve[1:]):
        lo, hi = (a, b) if a["perplexity_ratio"] <= b["perplexity_ratio"] else (b, a)
        if lo["perplexity_ratio"] <= budget < hi["perplexity_ratio"]:
            f = (budget - lo["perplexity_ratio"]) / (hi["perplexity_ratio"] - lo["perplexity_ratio"])
            best = max(best, lo["concept_rate"] + f * (hi["concept_rate"] - lo["concept_rate"]))
    return best


# -- reports ----------------------------------------------------------------------------------------
def resummarize(report: dict, fluency_budget: float) -> dict:
    """The report with its ``best`` recomputed at another fluency budget (no generation needed)."""
    out = dict(report, config=dict(report["config"], fluency_budget=fluency_budget))
    out["best"] = best_at_fluency(report["points"], report["config"]["methods"], fluency_budget)
    return out


def markdown_report(reports: Sequence[dict]) -> str:
    """A Markdown section per concept (every sweep point) and a summary table at equal fluency."""
    lines = []
    if reports:
        budget = reports[0]["config"]["fluency_budget"]
        methods = reports[0]["config"]["methods"]
        lines += [
            f"### Best concept rate at perplexity <= {budget:g}x unsteered",
            "",
            "Each cell: judge concept rate / keyword rate (strength) of the best point within the fluency budget.",
            "",
            "| concept | " + " | ".join(methods) + " |",
            "|---|" + "---|" * len(methods),
        ]

        def cell(b):
            kw = "-" if b.get("keyword_rate") is None else f"{b['keyword_rate']:.2f}"
            return f"{b['concept_rate']:.2f} / {kw} (s={b['strength']:g})"

        for r in reports:
            cells = [cell(r["best"][m]) for m in methods]
            lines.append(f"| {r['concept']['name']} (latent {r['setup']['latent']}) | " + " | ".join(cells) + " |")
        lines.append("")
        if all("best_axbench" in r for r in reports):
            lines += axbench_table(reports)
    for r in reports:
        lines += [
            f"### {r['concept']['name']}: latent {r['setup']['latent']} (typical activation {r['setup']['typical_activation']:.3g}), "
            f"residual norm {r['setup']['resid_norm_mean']:.4g} at {r['sae']['hook_point']}",
            "",
        ]
        for rule, sel in r["setup"].get("selected", {}).items():
            scores = ", ".join(f"{k} {sel[k]:.3g}" for k in ("input_score", "output_score") if sel.get(k) is not None)
            lines.append(f"- latent_{rule}: latent {sel['latent']} (typical {sel['typical']:.3g}; {scores})")
        if r["setup"].get("selected"):
            lines.append("")
        lines += [
            "| method | strength | concept rate | similarity | margin | keyword rate | latent act | perplexity (x unsteered) | distinct-2 | relevance | AxBench |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in r["points"]:
            kw = "-" if p["keyword_rate"] is None else f"{p['keyword_rate']:.2f}"
            ax = "-" if p.get("axbench") is None else f"{p['axbench']:.3f}"
            lines.append(
                f"| {p['method']} | {p['strength']:g} | {p['concept_rate']:.2f} | {p['concept_similarity']:.3f} | "
                f"{p['concept_margin']:+.3f} | {kw} | {p['latent_activation']:.2f} | {p['perplexity']:.2f} "
                f"({p['perplexity_ratio']:.2f}) | {p['distinct_bigrams']:.2f} | {p['relevance']:.2f} | {ax} |"
            )
        lines.append("")
    return "\n".join(lines)


def axbench_summary(reports: Sequence[dict], against: str = "mean_diff") -> dict:
    """Across concepts, per method: the mean AxBench score at each concept's best strength, the mean
    concept rate within the fluency budget, and on how many concepts it matches or beats ``against``
    at equal fluency (its best fluent concept rate is above 0 and at least the other's: two zeros
    are not a match). Where the reports hold their points, the same two figures also at exactly the
    budget (``concept_rate_at_budget``): ``concept_rate_at_budget`` and ``matches_or_beats_at_budget``.

    Returns:
        {method: {"axbench", "concept_rate_fluent", "matches_or_beats", "concepts"}, plus
        "concept_rate_at_budget" and "matches_or_beats_at_budget" when every report has points}.
    """
    methods = reports[0]["config"]["methods"]
    with_points = all("points" in r for r in reports)
    at = [{m: concept_rate_at_budget(r["points"], m, r["config"]["fluency_budget"]) for m in methods} for r in reports] if with_points else []
    out = {}
    for m in methods:
        hm = [r["best_axbench"][m]["axbench"] for r in reports]
        cr = [r["best"][m]["concept_rate"] for r in reports]
        wins = (sum(0 < r["best"][m]["concept_rate"] >= r["best"][against]["concept_rate"] for r in reports)
                if against in methods else None)
        out[m] = {"axbench": sum(hm) / len(hm), "concept_rate_fluent": sum(cr) / len(cr), "matches_or_beats": wins,
                  "concepts": len(reports)}
        if with_points:
            out[m]["concept_rate_at_budget"] = sum(a[m] for a in at) / len(at)
            out[m]["matches_or_beats_at_budget"] = sum(0 < a[m] >= a[against] for a in at) if against in methods else None
    return out


def axbench_table(reports: Sequence[dict]) -> list[str]:
    """Markdown lines: each concept's AxBench score per method (at its best strength), and the means."""
    methods = reports[0]["config"]["methods"]
    lines = [
        "### AxBench score (harmonic mean of concept, fluency, relevance) at each method's best strength",
        "",
        "Each cell: mean score (strength), concept rate, fluent rate.",
        "",
        "| concept | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for r in reports:
        cells = [f"{b['axbench']:.3f} (s={b['strength']:g}), {b['concept_rate']:.2f}, {b['fluent_rate']:.2f}"
                 for b in (r["best_axbench"][m] for m in methods)]
        lines.append(f"| {r['concept']['name']} | " + " | ".join(cells) + " |")
    summ = axbench_summary(reports)
    lines.append("| **mean** | " + " | ".join(f"**{summ[m]['axbench']:.3f}**" for m in methods) + " |")
    lines.append("| concept rate within the fluency budget, mean | " + " | ".join(f"{summ[m]['concept_rate_fluent']:.2f}" for m in methods) + " |")
    if summ[methods[0]]["matches_or_beats"] is not None:
        lines.append("| concepts where it matches or beats mean_diff at equal fluency | "
                     + " | ".join(f"{summ[m]['matches_or_beats']} of {summ[m]['concepts']}" for m in methods) + " |")
    if "concept_rate_at_budget" in summ[methods[0]]:
        lines.append("| concept rate at exactly the fluency budget (interpolated), mean | "
                     + " | ".join(f"{summ[m]['concept_rate_at_budget']:.3f}" for m in methods) + " |")
        if summ[methods[0]]["matches_or_beats_at_budget"] is not None:
            lines.append("| concepts where it matches or beats mean_diff at exactly the budget | "
                         + " | ".join(f"{summ[m]['matches_or_beats_at_budget']} of {summ[m]['concepts']}" for m in methods) + " |")
    lines.append("")
    return lines


def plot_report(reports: Sequence[dict], path: str | Path) -> Path:
    """Concept rate vs perplexity ratio across strengths, one panel per concept, a line per method (PNG).

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(reports)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, reports):
        base = next(p for p in r["points"] if p["strength"] == 0)
        for m in r["config"]["methods"]:
            pts = [base] + [p for p in r["points"] if p["method"] == m and p["strength"] != 0]
            ax.plot([p["perplexity_ratio"] for p in pts], [p["concept_rate"] for p in pts], marker="o", label=m)
            for p in pts[1:]:
                ax.annotate(f"{p['strength']:g}", (p["perplexity_ratio"], p["concept_rate"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_title(f"{r['concept']['name']} (latent {r['setup']['latent']})")
        ax.set_xlabel("perplexity / unsteered")
        ax.set_ylabel("concept rate (judge)")
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(reports: Sequence[dict], out: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (with matplotlib) ``concept_vs_fluency.png`` into ``out``.

    Returns:
        The paths written, by kind (``json``, ``markdown``, ``plot``; no ``plot`` without matplotlib).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(list(reports), indent=1))
    paths["markdown"].write_text(markdown_report(reports))
    try:
        paths["plot"] = plot_report(reports, out / "concept_vs_fluency.png")
    except ImportError:
        pass
    return paths
