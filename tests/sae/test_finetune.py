"""sae.finetune on the real SmolLM2 and the shipped Python-documentation SAE: the KL term is the
KL divergence, a few steps on one batch lower the model's loss of fidelity on it, the decoder rows
keep their norms, the threshold re-fit restores the L0, and the input SAE is left alone."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from saesteer.sae.activations import sink_mask, special_token_mask, token_windows
from saesteer.sae.calibrate import mean_l0
from saesteer.sae.finetune import FinetuneConfig, kl_finetune, kl_loss
from saesteer.modeling.lm import resolve_hook_point

TEXT = ("The river runs past the old mill and under the stone bridge, where children throw bread to the ducks. "
        "In spring the water rises and covers the meadow; by summer it is low and clear again. ") * 6


def test_kl_loss_is_the_kl_divergence_per_position():
    torch.manual_seed(0)
    p, q = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    lp, lq = p.double().log_softmax(-1), q.double().log_softmax(-1)
    want = (lp.exp() * (lp - lq)).sum(-1).mean()
    assert abs(float(kl_loss(p, q)) - float(want)) < 1e-6 * float(want)
    assert float(kl_loss(p, p)) == pytest.approx(0.0, abs=1e-7)
    ref = F.kl_div(lq.float().flatten(0, 1), lp.float().flatten(0, 1), log_target=True, reduction="batchmean")
    assert float(kl_loss(p, q)) == pytest.approx(float(ref), rel=1e-5)


def spliced_kl(model, tok, sae, ids: torch.Tensor) -> float:
    """KL(clean || SAE spliced in at the trained positions) per prediction on ``ids``, directly."""
    hp = resolve_hook_point(model, sae.cfg.hook_point)

    def splice(h):
        keep = (sink_mask(h) & special_token_mask(ids, tok)).unsqueeze(-1)
        return torch.where(keep, sae.decode(sae.encode(h)), h)

    with torch.no_grad():
        clean = model(input_ids=ids).logits[:, :-1]
        handle = hp.attach(splice)
        try:
            spliced = model(input_ids=ids).logits[:, :-1]
        finally:
            handle.remove()
    lp, lq = clean.double().log_softmax(-1), spliced.double().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.slow
def test_a_few_steps_on_one_batch_lower_its_kl_and_keep_the_sae_consistent(lm, python_sae):
    model, tok = lm
    before = copy.deepcopy(python_sae.state_dict())
    cfg = FinetuneConfig(n_tokens=4 * 2 * 63, context_size=64, batch_size=2, lr=2e-4, warmup_frac=0, decay_frac=0,
                         calibration_tokens=10_000)
    # one paragraph over and over: the fine-tune must fit it; judged on its first batch
    windows = list(token_windows([TEXT], tok, 64))[:2]
    assert len(windows) == 2
    res = kl_finetune(model, tok, python_sae, [TEXT] * 8, cfg, progress=False)
    ft = res.sae
    for name, t in before.items():  # the input SAE is not modified
        assert torch.equal(python_sae.state_dict()[name], t), name
    ids = torch.tensor(windows)
    kl0, kl1 = spliced_kl(model, tok, python_sae, ids), spliced_kl(model, tok, ft, ids)
    assert kl1 < 0.8 * kl0, (kl0, kl1)
    assert [r["step"] for r in res.log] == [0, 3] and res.log[0]["kl"] == pytest.approx(kl0, rel=0.05)
    n0, n1 = python_sae.W_dec.norm(dim=-1), ft.W_dec.norm(dim=-1)
    assert torch.allclose(n0, n1, rtol=1e-5), float((n0 - n1).abs().max())
    assert not torch.equal(python_sae.W_dec, ft.W_dec.to(python_sae.dtype))
    meta = ft.cfg.metadata["kl_finetune"]
    refit = meta["threshold_refit"]
    assert meta["steps"] == 4 and refit["tokens"] > 0
    assert refit["l0_after"] == pytest.approx(refit["target_l0"], abs=0.05)
    assert bool((ft.threshold == ft.threshold[0]).all()) and float(ft.threshold[0]) == pytest.approx(refit["threshold"])


def test_too_little_text_is_refused(lm, python_sae):
    model, tok = lm
    with pytest.raises(ValueError, match="fewer than 8 windows"):
        kl_finetune(model, tok, python_sae, ["A short text."], FinetuneConfig(), progress=False)


def test_l0_target_is_the_input_saes_on_the_same_activations(lm, python_sae):
    """The refit's target is measured with the input SAE on the activations the fine-tune saw."""
    model, tok = lm
    windows = list(token_windows([TEXT], tok, 32))[:2]
    cfg = FinetuneConfig(n_tokens=2 * 31, context_size=32, batch_size=2, lr=1e-12, calibration_tokens=10_000)
    res = kl_finetune(model, tok, python_sae, [TEXT], cfg, progress=False)  # its first batch is ``windows``
    from saesteer.sae.activations import hook_activations

    h = hook_activations(model, python_sae.cfg.hook_point, torch.tensor(windows))
    keep = sink_mask(h) & special_token_mask(torch.tensor(windows), tok)
    assert res.sae.cfg.metadata["kl_finetune"]["threshold_refit"]["target_l0"] == pytest.approx(
        mean_l0(python_sae, h[keep]), abs=0.05)


def test_finetune_cli_writes_a_loadable_sae_at_the_input_l0(tmp_path, python_sae):
    from saesteer.cli import main
    from saesteer.sae.io import load_sae, read_sae_config
    from saesteer.server.config import python_sae_spec

    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "ft"
    assert main(["finetune", str(python_sae_spec()), "--data", str(data), "--n-tokens", "31", "--batch-size", "2",
                 "--context-size", "32", "--ce-tokens", "0", "--out", str(out)]) == 0
    assert read_sae_config(out).dtype == read_sae_config(python_sae_spec()).dtype  # the input's dtype on disk
    sae = load_sae(out, dtype=torch.float32)
    meta = sae.cfg.metadata["kl_finetune"]
    assert meta["steps"] == 1 and meta["from"] == Path(python_sae_spec()).name
    assert (sae.cfg.d_sae, sae.cfg.hook_point) == (python_sae.cfg.d_sae, python_sae.cfg.hook_point)
    assert (out / "finetune_log.json").is_file() and not (out / "figures.json").exists()


def test_the_splice_runs_the_saes_own_rule_a_topk_sae_keeps_k(lm, python_sae):
    """A TopK SAE (no threshold) is fine-tuned through its own top-k rule: at most k latents a token."""
    from saesteer.sae.model import SAE, SAEConfig

    model, tok = lm
    topk = SAE(SAEConfig(**{**python_sae.cfg.to_dict(), "architecture": "topk", "k": 8}))
    topk.load_state_dict(python_sae.state_dict())
    cfg = FinetuneConfig(n_tokens=2 * 31, context_size=32, batch_size=2, lr=1e-12)
    res = kl_finetune(model, tok, topk, [TEXT], cfg, progress=False)
    assert 0 < res.log[0]["l0"] <= 8, res.log[0]
    assert "threshold_refit" not in res.sae.cfg.metadata["kl_finetune"]  # no threshold to re-fit
