"""Measuring steers on the real SmolLM2, the default SAE and the shipped MiniLM judge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from saesteer.sae.stats import load_latent_stats
from saesteer.server.config import python_sae_spec
from saesteer.steering.concept_mix import latent_mix
from saesteer.steering.eval.evaluate import SweepConfig, sweep
from saesteer.steering.eval.interventions import OUTPUT_POOL, effect_scores, make_plan, select_latents, setup_concept
from saesteer.steering.eval.report import write_reports
from saesteer.steering.eval.scoring import Concept, ConceptScorer, completion_nll, distinct_bigrams, load_concepts
from saesteer.steering.eval.summary import FLUENT_DISTINCT_BIGRAMS, axbench_parts, axbench_summary, concept_rate_at_budget
from saesteer.steering.generate import render_prompt

NEUTRAL = [
    "The meeting was moved to Thursday afternoon.",
    "He paid the electricity bill on time.",
    "The train arrived at the station five minutes late.",
    "We painted the kitchen walls a light grey.",
    "She bought a new pair of running shoes.",
    "They discussed the budget for next year.",
]
CATS = Concept(
    name="cats",
    positive=[
        "The cat curled up on the sofa and purred.",
        "My kitten chased a ball of yarn across the floor.",
        "Cats love to nap in warm sunny spots.",
        "The tabby cat meowed at the door for its dinner.",
        "The cat licked its paws and cleaned its whiskers.",
    ],
    negative=NEUTRAL,
    keywords=["cat", "kitten", "meow", "purr", "feline"],
)
BENCH_CONCEPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "concepts.json"
# the prompts of shared/steering-notes.md
NOTES_PROMPTS = ("Write one sentence about your morning.", "Tell me something interesting.", "Describe a place you like.")


def test_a_concept_without_negatives_gets_concept_searchs_neutral_set():
    from saesteer.steering.concept_scores import NEUTRAL_SENTENCES

    unseen = load_concepts(BENCH_CONCEPTS.parent / "unseen_concepts.json")
    assert [c.name for c in unseen] == ["trains", "birds", "money"]
    assert all(c.negative == list(NEUTRAL_SENTENCES) and len(c.positive) == 6 and c.keywords for c in unseen)
    with pytest.raises(ValueError, match="needs positive and negative"):
        Concept.from_dict({"name": "x", "positive": ["a"], "negative": []})
    with pytest.raises(ValueError, match="unknown keys"):
        Concept.from_dict({"name": "x", "positive": ["a"], "negatives": ["b"]})


@pytest.fixture(scope="module")
def judge():
    from saesteer.steering.eval.judge import SentenceJudge

    return SentenceJudge()


def test_judge_scores_text_naming_the_concept_higher(judge):
    scorer = ConceptScorer(judge, CATS)
    with_cat = "My morning started with my cat jumping on the bed and purring for breakfast."
    without = "My morning started with a cup of coffee and a look at the news."
    sim, margin = scorer.scores([with_cat, without])
    assert sim[0] > SweepConfig().judge_threshold > sim[1]  # present above the default threshold, absent below
    assert margin[0] > 0 > margin[1]
    assert scorer.keyword_hits([with_cat, without]) == [True, False]
    e = judge.embed(["a", "a longer sentence"])
    assert e.shape == (2, 384) and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_fluency_is_the_models_own_perplexity(lm):
    model, tok = lm
    prompts = [render_prompt(tok, "Tell me something interesting."), render_prompt(tok, "Hi")]
    completions = [tok("Cats sleep for most of the day.", add_special_tokens=False)["input_ids"],
                   tok("Hello! How can I help?", add_special_tokens=False)["input_ids"]]
    nll, _ = completion_nll(model, prompts, completions)  # batched, right-padded
    for p, c, got in zip(prompts, completions, nll):
        ids = torch.tensor([p + c])
        labels = ids.clone()
        labels[0, : len(p)] = -100  # only the completion's tokens count
        with torch.no_grad():
            direct = float(model(input_ids=ids, labels=labels).loss)
        assert abs(got - direct) <= 1e-4 * abs(direct)
    assert math.isnan(completion_nll(model, prompts[:1], [[]])[0][0])
    assert distinct_bigrams([1, 2, 1, 2, 1, 2]) == pytest.approx(2 / 5)
    assert distinct_bigrams([1, 2, 3, 4]) == 1.0


def test_axbench_score_is_the_harmonic_mean_of_its_parts():
    # two prompts; unsteered answers (strength 0) set the fluency limit (3 x mean perplexity 2.0 = 6.0)
    # and each prompt's relevance unit (0.5 and 0.4)
    owners = [("unsteered", 0.0, 0), ("unsteered", 0.0, 1), ("m", 1.0, 0), ("m", 1.0, 1), ("m", 2.0, 0), ("m", 2.0, 1)]
    ppl = [2.0, 2.0, 5.0, 3.0, 7.0, 3.0]
    distinct = [1.0, 1.0, 0.9, 0.9, 0.9, 0.4]
    hit = torch.tensor([False, False, True, True, True, True])
    rel = torch.tensor([0.5, 0.4, 0.25, 0.6, 0.5, 0.4])
    parts = axbench_parts(owners, ppl, distinct, hit, rel, fluency_budget=3.0)
    assert parts["fluent"] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # 7.0 > 6.0; distinct-2 0.4 < 0.6
    assert parts["relevance"] == pytest.approx([1.0, 1.0, 0.5, 1.0, 1.0, 1.0])  # 0.6 / 0.4 clipped to 1
    assert parts["hm"] == pytest.approx([0.0, 0.0, 3 / (1 + 1 + 2), 1.0, 0.0, 0.0])
    # a tie at zero is not a match; a win or a tie above zero is
    reports = [{"config": {"methods": ["a", "mean_diff"]},
                "best": {"a": {"concept_rate": ca}, "mean_diff": {"concept_rate": cm}},
                "best_axbench": {"a": {"axbench": 0.5}, "mean_diff": {"axbench": 0.25}}}
               for ca, cm in ((0.0, 0.0), (0.5, 0.5), (0.75, 0.5), (0.25, 0.5))]
    summ = axbench_summary(reports)
    assert summ["a"]["matches_or_beats"] == 2 and summ["mean_diff"]["matches_or_beats"] == 3
    assert summ["a"]["axbench"] == pytest.approx(0.5) and summ["a"]["concept_rate_fluent"] == pytest.approx(0.375)


def test_concept_rate_at_the_budget_interpolates_where_the_curve_crosses_it():
    def pt(method, strength, rate, ratio):
        return {"method": method, "strength": strength, "concept_rate": rate, "perplexity_ratio": ratio}

    points = [pt("unsteered", 0.0, 0.0, 1.0),
              pt("m", 1.0, 0.25, 2.0), pt("m", 2.0, 0.75, 4.0), pt("m", 3.0, 1.0, 8.0),  # crosses 3.0 halfway: 0.5
              pt("n", 1.0, 0.5, 5.0),  # beyond at its weakest: a quarter of the way from the unsteered point
              pt("o", 1.0, 0.8, 2.5), pt("o", 2.0, 0.2, 2.9), pt("o", 3.0, 0.3, 3.5)]  # its best point is within
    got = {m: concept_rate_at_budget(points, m, 3.0) for m in "mno"}
    assert got == pytest.approx({"m": 0.5, "n": 0.25, "o": 0.8})
    assert concept_rate_at_budget(points, "m", 10.0) == 1.0  # every point within: the best of them
    cfg = {"methods": ["m", "mean_diff"], "fluency_budget": 3.0}
    b = {"concept_rate": 0.25}
    rep = {"config": cfg, "points": points + [pt("mean_diff", 1.0, 0.5, 4.0)], "best": {"m": b, "mean_diff": b},
           "best_axbench": {"m": {"axbench": 0.1}, "mean_diff": {"axbench": 0.1}}}
    summ = axbench_summary([rep])  # mean_diff at the budget: 1/3 of the way to 0.5
    assert summ["mean_diff"]["concept_rate_at_budget"] == pytest.approx(0.5 * 2 / 3)
    assert summ["m"]["matches_or_beats_at_budget"] == 1 and summ["m"]["matches_or_beats"] == 1


def test_latents_are_selected_by_their_rules(lm, python_sae):
    from saesteer.sae.output_scores import load_latent_output
    from saesteer.steering.concept_scores import input_scores
    from saesteer.steering.concept_search import search_concepts

    model, tok = lm
    stats = load_latent_stats(python_sae_spec())
    output, _ = load_latent_output(python_sae_spec())
    sel = select_latents(model, tok, python_sae, stats, CATS, ["input", "output", "search"], output)
    score = input_scores(model, tok, {"s": python_sae}, {"s": stats}, CATS.positive, CATS.negative)["s"]
    pool = score.topk(OUTPUT_POOL).indices.tolist()
    assert sel["input"]["latent"] == int(score.argmax())
    assert sel["output"]["latent"] in pool
    assert float(output.output_score[sel["output"]["latent"]]) == max(float(output.output_score[i]) for i in pool)
    hit = search_concepts(model, tok, {"s": python_sae}, {"s": stats}, CATS.positive, CATS.negative, top_k=1)[0]
    assert sel["search"]["latent"] == hit.latent
    setup = setup_concept(model, tok, python_sae, stats, CATS, ("latent_output", "prompting"), output)
    plan = make_plan("latent_output", 4.0, setup, "s", python_sae.cfg.hook_point)
    edit = plan.latent_edits[0]
    assert edit.latent == sel["output"]["latent"] and edit.op == "clamp"
    assert edit.value == pytest.approx(4.0 * float(stats.typical_activation[edit.latent]))
    assert not make_plan("prompting", 1.0, setup, "s", python_sae.cfg.hook_point)  # its change is the system prompt
    with pytest.raises(ValueError, match="output scores"):
        select_latents(model, tok, python_sae, stats, CATS, ["output"], None)


def test_effect_score_is_the_judged_concept_of_fluent_steered_answers(lm, python_sae, judge):
    """``effect_scores`` against a direct computation: each candidate clamped at each strength on
    each prompt, generated one answer at a time, judged; a never-fired latent scores -inf. The
    ``latent_effect`` rule takes the pool's best effect score."""
    from saesteer.steering.generate import GenerationSpec, generate
    from saesteer.steering.hooks import Steerer
    from saesteer.steering.plan import InterventionPlan, LatentEdit, typical_to_raw

    model, tok = lm
    stats = load_latent_stats(python_sae_spec())
    fired = [int(i) for i in torch.nonzero(stats.typical_activation > 0).flatten()[:2]]
    dead = next((i for i in range(python_sae.cfg.d_sae) if not stats.typical_activation[i] > 0), None)
    cands = fired + ([dead] if dead is not None else [])
    prompts, strengths = ("Tell me something interesting.", "Write one short sentence."), (4.0, 8.0)
    got = effect_scores(model, tok, python_sae, stats, CATS, cands, judge, prompts=prompts, strengths=strengths,
                        max_new_tokens=8, batch_size=3)
    scorer = ConceptScorer(judge, CATS)
    steerer = Steerer(model, {"sae": python_sae})
    for c, latent in enumerate(fired):
        per_strength = []
        for st in strengths:
            vals = []
            for p in prompts:
                plan = InterventionPlan(latent_edits=[LatentEdit("sae", latent, "clamp", typical_to_raw(st, stats.typical(latent)), "all")])
                r = generate(model, tok, [GenerationSpec(render_prompt(tok, None, [{"role": "user", "content": p}]), max_new_tokens=8,
                                                         plan=plan)], steerer)[0]
                fluent = distinct_bigrams([t for t in r.tokens if t != tok.eos_token_id]) >= FLUENT_DISTINCT_BIGRAMS
                sim = float(scorer.scores([r.text])[0][0])
                vals.append(float(fluent and sim > 0.4) + 0.1 * (sim if fluent else 0.0))
            per_strength.append(sum(vals) / len(vals))
        assert got[c] == pytest.approx(max(per_strength), abs=1e-5)
    if dead is not None:
        assert got[-1] == -math.inf
    sel = select_latents(model, tok, python_sae, stats, CATS, ["effect"], judge=judge)["effect"]
    assert len(sel["effect_pool"]) == OUTPUT_POOL and sel["latent"] in sel["effect_pool"]
    assert sel["effect_pool"][sel["latent"]] == max(sel["effect_pool"].values())
    assert sel["effect_score"] == pytest.approx(sel["effect_pool"][sel["latent"]], abs=1e-4)
    with pytest.raises(ValueError, match="judge"):
        select_latents(model, tok, python_sae, stats, CATS, ["effect"])


def test_plans_use_meaningful_units(lm, python_sae):
    model, tok = lm
    stats = load_latent_stats(python_sae_spec())
    setup = setup_concept(model, tok, python_sae, stats, CATS)
    assert setup.typical == pytest.approx(float(stats.typical_activation[setup.latent]))
    clamp = make_plan("latent_clamp", 3.0, setup, "s", python_sae.cfg.hook_point)
    assert clamp.latent_edits[0].value == pytest.approx(3.0 * setup.typical)
    vec = make_plan("mean_diff", 0.5, setup, "s", python_sae.cfg.hook_point)
    assert float(vec.vector_edits[0].vector.norm()) == pytest.approx(0.5 * stats.resid_norm_mean, rel=1e-5)
    assert not make_plan("decoder", 0.0, setup, "s", python_sae.cfg.hook_point)
    for where in ("prompt", "generated"):  # eval-steering --positions: every edit of the point applies there
        assert make_plan("latent_clamp", 3.0, setup, "s", python_sae.cfg.hook_point, where).latent_edits[0].positions == where
        assert make_plan("mean_diff", 0.5, setup, "s", python_sae.cfg.hook_point, where).vector_edits[0].positions == where
    with pytest.raises(ValueError, match="unknown method"):
        make_plan("nope", 1.0, setup, "s", python_sae.cfg.hook_point)


def test_latent_mix_is_the_latents_part_of_the_mean_difference(lm, python_sae):
    """latent_mix against a direct float64 computation: per-token codes of the concept and contrast
    sentences, the m latents of largest |mean difference|, their decoder rows weighted by it. With
    every latent the mix is the mean difference of the reconstructions, close to the mean-difference
    vector itself (the SAE reconstructs the residual stream); a few latents carry less of it."""
    from saesteer.sae.activations import hook_activations, sink_mask
    from saesteer.steering.concept_scores import hook_rows

    model, tok = lm
    sae = python_sae
    pos, neg = (hook_rows(model, tok, sae.cfg.hook_point, texts) for texts in (CATS.positive, CATS.negative))
    direction, weights = latent_mix(sae, pos, neg, m=8, signs="both")

    def codes(texts):
        rows = []
        for t in texts:
            a = hook_activations(model, sae.cfg.hook_point, torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]))
            rows.append(sae.encode(a[sink_mask(a)]).double())
        return torch.cat(rows)

    dz = codes(CATS.positive).mean(0) - codes(CATS.negative).mean(0)
    idx = dz.abs().topk(8).indices
    ref = dz[idx] @ (sae.W_dec.double()[idx] / sae.cfg.input_scale)
    assert list(weights) == idx.tolist()
    w = torch.tensor(list(weights.values()), dtype=torch.float64)
    assert float((w - dz[idx] / ref.norm()).abs().max() / w.abs().max()) < 1e-5
    ref = ref / ref.norm()
    assert float((direction.double() - ref).norm()) < 1e-5
    md = pos.mean(0) - neg.mean(0)  # the mean-difference vector, from the rows already read
    full, _ = latent_mix(sae, pos, neg, m=sae.cfg.d_sae, signs="both")
    cos_full, cos_8 = float(full @ md / md.norm()), float(direction @ md / md.norm())
    assert cos_full > 0.8 and 0 < cos_8 < cos_full, (cos_full, cos_8)  # measured 0.85 and 0.31
    setup = setup_concept(model, tok, sae, load_latent_stats(python_sae_spec()), CATS, methods=("latent_mix",))
    plan = make_plan("latent_mix", 0.5, setup, "s", sae.cfg.hook_point)  # add edits on the latents themselves
    assert not plan.vector_edits and {e.op for e in plan.latent_edits} == {"add"}
    assert [e.latent for e in plan.latent_edits] == list(setup.mix_latents)
    added = torch.tensor([e.value for e in plan.latent_edits], dtype=torch.float64) @ sae.decoder_directions(
        torch.tensor([e.latent for e in plan.latent_edits])).double()
    assert float(added.norm()) == pytest.approx(0.5 * setup.resid_norm, rel=1e-4)
    assert float(torch.nn.functional.cosine_similarity(added.float(), setup.mix, dim=0)) > 0.9999


@pytest.mark.slow
def test_sweep_finds_a_strength_where_the_concept_appears(lm, python_sae, judge, tmp_path):
    """The notes' known-good steer: a mean-difference vector for cats at block 10 (the default SAE's
    hook), with the benchmark's cat sentences; the useful range is narrow (about 0.5 x the residual norm)."""
    model, tok = lm
    stats = load_latent_stats(python_sae_spec())
    cats = next(c for c in load_concepts(BENCH_CONCEPTS) if c.name == "cats")
    cfg = SweepConfig(methods=("mean_diff",), strengths={"mean_diff": (0.45, 0.5, 0.55)}, prompts=NOTES_PROMPTS, max_new_tokens=24)
    report = sweep(model, tok, python_sae, stats, cats, judge, cfg, progress=False)
    pts = {p["strength"]: p for p in report["points"]}
    assert set(pts) == {0.0, 0.45, 0.5, 0.55}
    assert pts[0.0]["concept_rate"] < 0.5  # the unsteered answers are not about cats
    best = max(pts.values(), key=lambda p: p["concept_rate"])
    assert best["strength"] > 0 and best["concept_rate"] >= 2 / 3
    assert best["keyword_rate"] >= 2 / 3  # the judge agrees with plain keyword matching
    assert best["concept_similarity"] > pts[0.0]["concept_similarity"] and best["concept_margin"] > pts[0.0]["concept_margin"]
    for p in pts.values():
        assert p["perplexity"] > 1 and len(p["samples"]) == 3
        # answers both fluent and on concept, counted from the samples' own flags and similarities
        both = [s["fluent"] and s["concept_similarity"] > cfg.judge_threshold for s in p["samples"]]
        assert p["fluent_concept_rate"] == pytest.approx(sum(both) / 3)
        assert p["fluent_rate"] == pytest.approx(sum(s["fluent"] for s in p["samples"]) / 3)
        assert p["fluent_concept_rate"] <= min(p["fluent_rate"], p["concept_rate"])
    # the report files are written and readable
    paths = write_reports([report], tmp_path)
    back = json.loads(paths["json"].read_text())
    assert back[0]["points"][0]["strength"] == 0.0
    md = paths["markdown"].read_text()
    assert "| mean_diff | 0.5 |" in md and "Best concept rate" in md
    if "plot" in paths:
        assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
