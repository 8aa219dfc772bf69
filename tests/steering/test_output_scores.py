"""Output scores and logit lens (sae/output_scores.py) on the real SmolLM2 and the default SAE's
latents, against direct float64 computations."""

from __future__ import annotations

import copy

import pytest
import torch

from saesteer.sae import output_scores as O
from saesteer.sae.model import SAE

LATENTS = [0, 7, 598, 1725, 3656, 4000]  # a few of the default SAE's, incl. the Python latent 3656


def _subset(sae: SAE, latents: list[int]) -> SAE:
    """An SAE holding only ``latents`` of ``sae`` (same hook point and numerics for those)."""
    cfg = copy.deepcopy(sae.cfg)
    cfg.d_sae = len(latents)
    out = SAE(cfg)
    idx = torch.tensor(latents)
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc[:, idx])
        out.b_enc.copy_(sae.b_enc[idx])
        out.W_dec.copy_(sae.W_dec[idx])
        out.threshold.copy_(sae.threshold[idx])
        out.b_dec.copy_(sae.b_dec)
    return out


@pytest.fixture(scope="module")
def lm64(lm):
    model, tok = lm
    return copy.deepcopy(model).double(), tok


@pytest.fixture(scope="module")
def small(python_sae):
    return _subset(python_sae, LATENTS)


@pytest.fixture(scope="module")
def scored(lm, small):
    model, tok = lm
    return O.output_scores(model, tok, small, batch_size=4, progress=False)  # 6 latents: a full and a partial batch


def test_logit_lens_equals_a_direct_float64_computation(lm64, small, scored):
    model64, _ = lm64
    d = (small.W_dec.double() / small.cfg.input_scale)  # [n, d_in]
    w = model64.model.norm.weight
    eps = model64.config.rms_norm_eps
    normed = d / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + eps) * w  # RMSNorm by its formula
    ref = normed @ model64.lm_head.weight.T  # [n, vocab]
    ref_vals, ref_ids = ref.topk(O.DEFAULT_TOP_K, dim=-1)
    assert torch.equal(scored.logit_lens_ids, ref_ids)
    rel = ((scored.logit_lens_logits.double() - ref_vals).norm() / ref_vals.norm()).item()
    assert rel < 1e-5


@pytest.mark.slow
def test_output_score_equals_a_direct_float64_single_latent_pass(lm, lm64, small, scored):
    model, tok = lm
    model64, _ = lm64
    sae64 = copy.deepcopy(small).double()
    prompts = O.neutral_prompts(tok)
    for j in range(len(LATENTS)):
        per = [O.output_score_direct(model64, sae64, j, ids, scored.logit_lens_ids[j]) for ids in prompts]
        ref_score = sum(p[0] for p in per) / len(per)
        ref_prob = sum(p[1] for p in per) / len(per)
        assert abs(float(scored.output_score[j]) - ref_score) <= 1e-3 * ref_score, (LATENTS[j], float(scored.output_score[j]), ref_score)
        assert abs(float(scored.top_token_prob[j]) - ref_prob) <= 1e-3 * ref_prob
        assert abs(float(scored.min_rank[j]) - sum(p[2] for p in per) / len(per)) <= 1.0  # ties between near-equal tokens


def test_score_formula_on_a_hand_made_distribution():
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1]], dtype=torch.float64)
    score, top, rank = O._score(probs, torch.tensor([[2, 3]]))
    # token 2: two tokens strictly more likely? no: only token 0 (0.5 > 0.2); token 1 ties -> rank 1
    assert float(rank) == 1 and float(top) == 0.2
    assert float(score) == pytest.approx((1 - 1 / 4) * 0.2, rel=1e-12)


def test_amplifying_the_python_latent_promotes_its_tokens(scored, lm):
    _, tok = lm
    j = LATENTS.index(3656)
    words = [tok.decode([t]).strip().lower() for t in scored.logit_lens_ids[j, :10]]
    assert scored.output_score[j] > torch.median(scored.output_score)
    assert words and all(isinstance(w, str) for w in words)


def test_save_and_load_round_trip(tmp_path, scored, lm):
    _, tok = lm
    O.save_latent_output(scored, tmp_path, tok)
    back, toks = O.load_latent_output(tmp_path, top_tokens=True)
    assert torch.equal(back.output_score, scored.output_score)
    assert torch.equal(back.logit_lens_ids, scored.logit_lens_ids)
    assert back.meta["amplification"] == O.DEFAULT_AMPLIFICATION and len(back.meta["prompts"]) == 2
    assert toks[0] == [tok.decode([t]) for t in scored.logit_lens_ids[0, :10].tolist()]
    assert O.load_latent_output(tmp_path / "none") is None


def test_rejects_one_token_prompts(lm, small):
    model, tok = lm
    with pytest.raises(ValueError, match="at least 2 tokens"):
        O.output_scores(model, tok, small, prompts=[[42]], progress=False)
