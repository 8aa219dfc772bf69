"""Concept search (steering/concept_search.py, its scores in concept_scores.py, its mixes in
concept_mix.py) on the real SmolLM2 with a small synthetic SAE in which one latent is planted: its
encoder reads the concept's mean-difference direction and its decoder writes the concept word's
unembedding."""

from __future__ import annotations

import pytest
import torch

from saesteer.sae.activations import hook_activations, sink_mask
from saesteer.sae.model import SAE, SAEConfig
from saesteer.sae.stats import LatentStats
from saesteer.steering import concept_mix as M
from saesteer.steering import concept_scores as C
from saesteer.steering import concept_search as S

HOOK = "blocks.10.hook_resid_post"
PLANTED = 23
POSITIVE = ["The cat purred on my lap.", "My cat chased a mouse across the kitchen.", "Kittens and cats love to nap in the sun."]
NEGATIVE = ["The train was late again this morning.", "I paid the electricity bill yesterday.", "The committee approved the budget."]


def _mean_act(model, tok, texts):
    rows = []
    for t in texts:
        a = hook_activations(model, HOOK, torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]))
        rows.append(a[0][sink_mask(a)[0]].mean(0))
    return torch.stack(rows).mean(0)


def planted_sae(model, tok, d_sae: int = 64, seed: int = 0) -> SAE:
    """Random unit-norm latents (ReLU, a bias that keeps them sparse) plus latent ``PLANTED``:
    encoder along the cat-minus-neutral mean difference, decoder along the unembedding of " cat"."""
    g = torch.Generator().manual_seed(seed)
    d_in = model.config.hidden_size
    sae = SAE(SAEConfig(architecture="relu", d_in=d_in, d_sae=d_sae, hook_point=HOOK, apply_b_dec_to_input=False))
    w = torch.randn(d_sae, d_in, generator=g)
    w = w / w.norm(dim=-1, keepdim=True)
    diff = _mean_act(model, tok, POSITIVE) - _mean_act(model, tok, NEGATIVE)
    cat = tok(" cat", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_enc.fill_(-5.0)  # random latents fire on large projections, on concept and neutral text alike
        sae.W_enc[:, PLANTED] = diff / diff.norm()
        sae.b_enc[PLANTED] = -0.5 * float(diff.norm())
        u = model.lm_head.weight[cat].float()
        sae.W_dec[PLANTED] = u / u.norm()
    return sae


@pytest.fixture(scope="module")
def sae(lm):
    model, tok = lm
    return planted_sae(model, tok)


def test_planted_latent_ranks_first_by_sentences_words_or_both(lm, sae):
    model, tok = lm
    for kw in ({"positive": POSITIVE, "negative": NEGATIVE}, {"words": ["cat"]}, {"positive": POSITIVE, "words": ["cat", "kitten"]}):
        hits = S.search_concepts(model, tok, {"syn": sae}, {"syn": None}, top_k=5, **kw)
        assert hits[0].sae == "syn" and hits[0].latent == PLANTED, (kw, [(h.latent, h.score) for h in hits])
        assert hits[0].score == max(h.score for h in hits)
        assert "cat" in [t.strip().lower() for t in hits[0].top_tokens]
        assert (hits[0].input_score is None) == ("positive" not in kw)
        assert hits[0].unit == "raw"  # no statistics: a raw strength


def test_input_score_is_the_activation_contrast(lm, sae):
    model, tok = lm
    hits = S.search_concepts(model, tok, {"syn": sae}, {"syn": None}, positive=POSITIVE, negative=NEGATIVE, top_k=1)
    pos = C.max_activations(model, tok, {"syn": sae}, POSITIVE)["syn"][:, PLANTED].mean()
    neg = C.max_activations(model, tok, {"syn": sae}, NEGATIVE)["syn"][:, PLANTED].mean()
    assert hits[0].input_score == pytest.approx(float(pos - neg), rel=1e-6)
    assert float(pos) > 0 and hits[0].value == pytest.approx(S.SUGGESTED_TYPICAL * float(pos), rel=1e-4)


def test_output_score_is_the_logit_lens_mass_on_concept_tokens(lm, sae):
    model, tok = lm
    tokens = C.concept_tokens(tok, ["cat"])
    got = C.concept_output_scores(model, sae, tokens)
    d = sae.W_dec[PLANTED].detach().double()
    w = model.model.norm.weight.detach().double()
    normed = d / torch.sqrt(d.pow(2).mean() + model.config.rms_norm_eps) * w
    probs = torch.softmax(normed @ model.lm_head.weight.detach().double().T, -1)
    ref = float(probs[tokens].sum())
    assert abs(float(got[PLANTED]) - ref) <= 1e-4 * ref


def test_with_statistics_strengths_are_typical_and_dead_latents_skipped(lm, sae):
    model, tok = lm
    mean = torch.ones(sae.cfg.d_sae)
    mean[PLANTED] = 0.0  # as if it never fired on the statistics' text
    stats = LatentStats(frequency=mean.clone(), typical_activation=mean, max_activation=mean, n_tokens=1, resid_norm_mean=1.0)
    hits = S.search_concepts(model, tok, {"syn": sae}, {"syn": stats}, words=["cat"], top_k=5)
    assert PLANTED not in [h.latent for h in hits]
    assert all(h.unit == "typical" and h.value == S.SUGGESTED_TYPICAL for h in hits)


def test_bad_input(lm, sae):
    model, tok = lm
    with pytest.raises(ValueError, match="positive sentence or one word"):
        S.search_concepts(model, tok, {"syn": sae}, {"syn": None})
    with pytest.raises(ValueError, match="no concept tokens"):
        C.concept_tokens(tok, [], ["a b"], ["a b"])


@pytest.mark.parametrize("signs", ["positive", "both"])
def test_concept_mix_adds_the_latents_code_difference_at_the_asked_norm(lm, sae, signs):
    """The mix against a direct float64 computation: the latents of largest mean code difference
    (``positive``: only latents the concept turns up) or largest |difference| (``both``), add values
    that sum their decoder rows to ``strength`` times the mean residual norm (here, without
    statistics, the norm of the sentences' own rows)."""
    model, tok = lm
    (mix,) = M.concept_mixes(model, tok, {"syn": sae}, {"syn": None}, POSITIVE, NEGATIVE, m=8, strength=0.3, signs=signs)
    assert mix.sae == "syn" and len(mix.latents) == 8
    pos, neg = (C.hook_rows(model, tok, HOOK, t) for t in (POSITIVE, NEGATIVE))
    code = lambda rows: sae.encode(rows).detach().double().mean(0)  # noqa: E731
    dz = code(pos) - code(neg)
    idx = (dz if signs == "positive" else dz.abs()).topk(8).indices
    assert mix.latents == idx.tolist()
    if signs == "positive":
        assert all(v > 0 for v in mix.values)  # nothing subtracted
    else:
        assert (dz.abs().topk(8).values > dz.topk(8).values).any()  # the planted data has turned-down latents among the top
    r = float(torch.cat([pos, neg]).double().norm(dim=-1).mean())
    added = torch.tensor(mix.values, dtype=torch.float64) @ sae.W_dec.detach().double()[idx]
    ref = dz[idx] @ sae.W_dec.detach().double()[idx]
    assert float(added.norm()) == pytest.approx(0.3 * r, rel=1e-5)
    assert float(torch.nn.functional.cosine_similarity(added, ref, dim=0)) > 1 - 1e-6
    md = (pos.mean(0) - neg.mean(0)).double()
    assert mix.mean_diff_cos == pytest.approx(float(ref @ md / ref.norm() / md.norm()), abs=1e-5)
    if signs == "positive":  # fewer turned-up latents than asked: only those
        n_up = int((dz > 0).sum())
        (every,) = M.concept_mixes(model, tok, {"syn": sae}, {"syn": None}, POSITIVE, NEGATIVE, m=sae.cfg.d_sae, signs=signs)
        assert len(every.latents) == n_up < sae.cfg.d_sae
    with pytest.raises(ValueError, match="at least one latent"):
        M.concept_mixes(model, tok, {"syn": sae}, {"syn": None}, POSITIVE, NEGATIVE, m=0)
    with pytest.raises(ValueError, match="positive sentence"):
        M.concept_mixes(model, tok, {"syn": sae}, {"syn": None}, [], NEGATIVE)
    with pytest.raises(ValueError, match="signs must be one of"):
        M.concept_mixes(model, tok, {"syn": sae}, {"syn": None}, POSITIVE, NEGATIVE, signs="negative")
    with pytest.raises(ValueError, match="no latent is more active"):  # the same sentences on both sides
        M.concept_mixes(model, tok, {"syn": sae}, {"syn": None}, POSITIVE, POSITIVE)


def test_latent_mix_leaves_out_latents_denser_than_asked(lm, sae):
    """``max_frequency``: latents firing on more than that fraction of tokens are left out before
    the ``m`` are chosen; the rest keep their weights relative to each other (float64 reference)."""
    model, tok = lm
    pos, neg = (C.hook_rows(model, tok, HOOK, t) for t in (POSITIVE, NEGATIVE))
    dz = (sae.encode(pos).detach().double().mean(0) - sae.encode(neg).detach().double().mean(0))
    up = dz.topk(4).indices.tolist()
    freq = torch.full((sae.cfg.d_sae,), 0.001)
    freq[up[:2]] = 0.2  # the two latents the concept turns up most are "dense"
    _, every = M.latent_mix(sae, pos, neg, m=4)
    _, sparse = M.latent_mix(sae, pos, neg, m=4, frequency=freq, max_frequency=0.05)
    assert list(every) == up
    assert not set(up[:2]) & set(sparse) and list(sparse)[:2] == up[2:]
    keep = torch.tensor(list(sparse))
    ref = dz[keep] / float((dz[keep] @ sae.W_dec.detach().double()[keep]).norm())
    assert torch.allclose(torch.tensor(list(sparse.values()), dtype=torch.float64), ref, rtol=1e-5)
    _, same = M.latent_mix(sae, pos, neg, m=4, frequency=freq, max_frequency=None)
    assert list(same) == up
    with pytest.raises(ValueError, match="max_frequency needs"):
        M.latent_mix(sae, pos, neg, m=4, max_frequency=0.05)


def _answer_nll(model, tok, prompt: str, sentence: str, v: torch.Tensor, positions: str = "prompt") -> tuple[float, int]:
    """Summed NLL (float64) of ``sentence`` as the chat answer to ``prompt``, ``v`` added at the
    hook point on the prompt's tokens but the first (``"prompt"``) or on the answer's tokens
    (``"generated"``); one unpadded sequence, no batching."""
    from saesteer.modeling.lm import resolve_hook_point
    from saesteer.steering.generate import render_prompt

    a = render_prompt(tok, None, [{"role": "user", "content": prompt}])
    c = tok(sentence, add_special_tokens=False)["input_ids"]
    mask = torch.zeros(1, len(a) + len(c), 1)
    if positions == "prompt":
        mask[0, 1:len(a)] = 1
    else:
        mask[0, len(a):] = 1
    h = resolve_hook_point(model, HOOK).attach(lambda x: x + mask * v.to(x.dtype))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([a + c])).logits[0].double()
    finally:
        h.remove()
    logp = torch.log_softmax(logits[len(a) - 1:-1], -1)
    return -float(logp[torch.arange(len(c)), torch.tensor(c)].sum()), len(c)


def test_fit_mix_objective_is_the_answers_nll_and_fitting_lowers_it(lm, sae):
    """``fit_mix``: its objective equals a direct per-sequence computation (no padding, float64
    log-softmax) of the positive sentences' mean NLL per token as answers to the fit prompts with
    the edit on the prompt's tokens; fitting keeps the latents and their signs, keeps the edit's
    norm, and lowers the objective."""
    model, tok = lm
    pos, neg = (C.hook_rows(model, tok, HOOK, t) for t in (POSITIVE, NEGATIVE))
    direction, weights = M.latent_mix(sae, pos, neg, m=8)
    prompts, strength, r = M.FIT_PROMPTS[:2], 0.5, 40.0
    still = M.fit_mix(model, tok, sae, POSITIVE, weights, r, strength, steps=0, prompts=prompts)
    assert still.nll_start == still.nll_end and set(still.weights) == set(weights)
    assert float((still.direction - direction).norm()) < 1e-5
    parts = [_answer_nll(model, tok, p, c, strength * r * direction) for p in prompts for c in POSITIVE]
    ref = sum(n for n, _ in parts) / sum(k for _, k in parts)
    assert still.nll_start == pytest.approx(ref, rel=1e-4)
    fit = M.fit_mix(model, tok, sae, POSITIVE, weights, r, strength, steps=3, prompts=prompts)
    assert fit.nll_start == pytest.approx(still.nll_start, rel=1e-6) and fit.nll_end < fit.nll_start - 0.01, fit
    assert set(fit.weights) == set(weights) and all(w > 0 for w in fit.weights.values())
    w = list(fit.weights.values())
    assert w == sorted(w, reverse=True)
    summed = torch.tensor(w, dtype=torch.float64) @ sae.W_dec.detach().double()[list(fit.weights)]
    assert float((summed.float() - fit.direction).norm()) < 1e-5 and float(fit.direction.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(fit.direction @ direction) < 1 - 1e-4  # the direction moved
    parts = [_answer_nll(model, tok, p, c, strength * r * fit.direction) for p in prompts for c in POSITIVE]
    assert sum(n for n, _ in parts) / sum(k for _, k in parts) == pytest.approx(fit.nll_end, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())  # the model's weights get no gradient
    gen = M.fit_mix(model, tok, sae, POSITIVE, weights, r, strength, steps=0, prompts=prompts, positions="generated")
    parts = [_answer_nll(model, tok, p, c, strength * r * direction, "generated") for p in prompts for c in POSITIVE]
    assert gen.nll_start == pytest.approx(sum(n for n, _ in parts) / sum(k for _, k in parts), rel=1e-4)
    assert abs(gen.nll_start - still.nll_start) > 1e-3  # the positions matter
    with pytest.raises(ValueError, match="positions must be"):
        M.fit_mix(model, tok, sae, POSITIVE, weights, r, positions="middle")
    with pytest.raises(ValueError, match="steps must be"):
        M.fit_mix(model, tok, sae, POSITIVE, weights, r, steps=-1)
    with pytest.raises(ValueError, match="at least one positive sentence"):
        M.fit_mix(model, tok, sae, [], weights, r)
