"""Summaries of a sweep's points: the AxBench score of each answer, and each method's best point (within
a fluency budget, at exactly the budget, at its best AxBench score), per concept and across concepts.

**AxBench score.** Wu et al. (2025) rate concept, instruction relevance and fluency 0-2 with an LLM
judge and take the harmonic mean per answer. We have no LLM judge, so each part is in [0, 1]:

- ``concept`` is 1 when the judge finds the concept;
- ``fluency`` is 1 when the answer's perplexity is within ``fluency_budget`` x the unsteered mean
  and its distinct-bigram ratio is at least ``FLUENT_DISTINCT_BIGRAMS``;
- ``relevance`` is its prompt cosine over the unsteered answer's for the same prompt, clipped to [0, 1].

``axbench`` is the mean over answers of the harmonic mean of the three (0 when any is 0). As in
AxBench, each method is also summarised at its strength of best mean score.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

FLUENT_DISTINCT_BIGRAMS = 0.6
"""For the AxBench score an answer is fluent only with at least this distinct-bigram ratio (a loop
that repeats itself can have a low perplexity)."""


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


def resummarize(report: dict, fluency_budget: float) -> dict:
    """The report with its ``best`` recomputed at another fluency budget (no generation needed)."""
    out = dict(report, config=dict(report["config"], fluency_budget=fluency_budget))
    out["best"] = best_at_fluency(report["points"], report["config"]["methods"], fluency_budget)
    return out


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
