"""The trainer: its sparse fast path against the dense eager twin, exact batch L0, and learning."""

from __future__ import annotations

import pytest
import torch

from saesteer.sae.model import SAE, SAEConfig
from saesteer.sae.train import TrainConfig, _sparse_forward, dense_forward, select_topk, train_sae


@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_sparse_training_forward_equals_dense(arch):
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(arch, 16, 64, k=4)).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    xs = torch.randn(32, 16, generator=g, dtype=torch.float64)
    cfg = TrainConfig(architecture=arch, d_sae=64, k=4)
    _, _, xh = _sparse_forward(sae, xs, cfg)
    g_fast = torch.autograd.grad(xh.pow(2).sum(), list(sae.parameters()))
    xh_ref = dense_forward(sae, xs, 4, arch)
    g_ref = torch.autograd.grad(xh_ref.pow(2).sum(), list(sae.parameters()))
    assert ((xh - xh_ref).norm() / xh_ref.norm()) < 1e-12
    for a, b in zip(g_fast, g_ref):
        assert ((a - b).norm() / b.norm()) < 1e-10


def test_batchtopk_batch_l0_is_exactly_k():
    pre = torch.randn(256, 512)
    rows, cols = select_topk(pre, 8, "batchtopk")
    assert rows.numel() == 8 * 256  # k per token on average over the batch, exactly
    per_row = torch.bincount(rows, minlength=256)
    assert per_row.min() < 8 < per_row.max()  # ...while tokens use a variable number
    rows_t, _ = select_topk(pre, 8, "topk")
    assert torch.equal(torch.bincount(rows_t, minlength=256), torch.full((256,), 8))


def _synthetic(n=40_000, d=32, n_feat=128, active=4, seed=0):
    """Sparse mixture of unit directions: the kind of data an SAE should recover."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_feat, d, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 3 + 0.5
    return (coef.unsqueeze(-1) * D[idx]).sum(1) + 0.01 * torch.randn(n, d, generator=g)


def test_training_lowers_nmse_and_threshold_matches_k_on_heldout():
    from saesteer.sae.evaluate import reconstruction_metrics

    data = _synthetic()
    train, held = data[:36_000], data[36_000:]
    cfg = TrainConfig(d_sae=256, k=4, batch_size=512, n_tokens=512 * 300, lr=3e-3, dead_tokens=20_000, seed=0)
    res = train_sae(train, cfg, progress=False)
    assert res.log[-1]["nmse"] < 0.5 * res.log[0]["nmse"]
    figs = reconstruction_metrics(res.sae, held)
    assert figs["nmse"] < 0.2
    assert abs(figs["l0"] - cfg.k) / cfg.k < 0.1  # inference threshold reproduces the batch L0


def test_jumprelu_straight_through_gradients_match_the_paper():
    """Rajamanoharan et al. 2024, Eqs. 11-12, in float64: d/dtheta of pre*H(pre-theta) and of H."""
    from saesteer.sae.train import _JumpReLU, _Step

    pre = torch.tensor([[0.10, 0.52, 0.49, 2.0], [0.505, -1.0, 0.3, 0.55]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    eps = 0.1
    z = _JumpReLU.apply(pre, theta, eps)
    assert torch.equal(z.detach(), torch.where(pre > theta, pre, torch.zeros_like(pre)).detach())
    g_pre, g_theta = torch.autograd.grad(z.sum(), [pre, theta])
    in_window = ((pre - theta).abs() < eps / 2).double()
    assert torch.allclose(g_theta, (-(theta / eps) * in_window).sum(0))
    assert torch.allclose(g_pre, (pre > theta).double())
    (g_theta_step,) = torch.autograd.grad(_Step.apply(pre, theta, eps).sum(), [theta])
    assert torch.allclose(g_theta_step, (-(1 / eps) * in_window).sum(0))


@pytest.mark.parametrize("arch,coef", [("jumprelu", {"l0_coef": 0.05}), ("relu", {"l1_coef": 0.3})])
def test_jumprelu_and_relu_training_learn_sparse_codes(arch, coef):
    from saesteer.sae.evaluate import reconstruction_metrics

    data = _synthetic()
    cfg = TrainConfig(architecture=arch, d_sae=256, batch_size=512, n_tokens=512 * 300, lr=3e-3, dead_tokens=20_000,
                      seed=0, jumprelu_init_threshold=0.05, **coef)
    res = train_sae(data[:36_000], cfg, progress=False)
    figs = reconstruction_metrics(res.sae, data[36_000:])
    assert figs["nmse"] < 0.3, figs
    assert figs["l0"] < 0.4 * cfg.d_sae, figs  # sparse (half the latents are on at init)
    stronger = train_sae(data[:36_000], TrainConfig(**{**cfg.__dict__, **{k: 10 * v for k, v in coef.items()}}), progress=False)
    assert reconstruction_metrics(stronger.sae, data[36_000:])["l0"] < figs["l0"]  # the penalty controls L0


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(arch, tmp_path):
    torch.set_num_threads(1)
    data = _synthetic(n=8_000)
    cfg = TrainConfig(architecture=arch, d_sae=64, k=4, batch_size=512, n_tokens=512 * 30, lr=2e-3, dead_tokens=2_000,
                      seed=3, l0_coef=0.05, jumprelu_init_threshold=0.05)
    full = train_sae(data, cfg, progress=False).sae
    train_sae(data, cfg, progress=False, checkpoint_dir=str(tmp_path), stop_after=13)
    resumed = train_sae(data, cfg, progress=False, checkpoint_dir=str(tmp_path), resume=True).sae
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(full, name), getattr(resumed, name)), name


def test_aux_k_revives_dead_latents():
    """Half the latents start dead by construction (a bias that loses every top-k race); without
    the auxiliary loss they never get a gradient and stay dead, with it they come back."""
    from saesteer.sae.train import dataset_input_scale

    data = _synthetic(n=20_000, d=32, n_feat=128, seed=2)
    d_sae = 128
    init = SAE(SAEConfig("batchtopk", 32, d_sae, k=4, input_scale=dataset_input_scale(data)))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        w = torch.randn(d_sae, 32, generator=g)
        init.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        init.W_enc.copy_(init.W_dec.T)
        init.b_enc[d_sae // 2:] = -4.0
    base = dict(d_sae=d_sae, k=4, batch_size=512, n_tokens=512 * 300, lr=3e-3, dead_tokens=3_000, seed=0)
    without = train_sae(data, TrainConfig(**base, aux_coef=0.0), progress=False, init=init).log[-1]["dead_frac"]
    with_aux = train_sae(data, TrainConfig(**base, aux_coef=1 / 32), progress=False, init=init).log[-1]["dead_frac"]
    assert without > 0.4, without
    assert with_aux < 0.6 * without, (with_aux, without)  # measured: 0.49 -> 0.27 in 300 steps


def test_geometric_median_resists_outliers():
    from saesteer.sae.train import geometric_median

    x = torch.zeros(101, 3)
    x[:50, 0], x[50:100, 0], x[100] = 1.0, -1.0, torch.tensor([0, 1e4, 0])
    m = geometric_median(x)  # the optimum sits ~0.01 off the axis; the mean is ~99 away
    assert m.norm() < 0.05 and float(x.mean(0).norm()) > 50


def test_bfloat16_mixed_precision_training_learns():
    data = _synthetic(n=20_000)
    cfg = TrainConfig(d_sae=256, k=4, batch_size=512, n_tokens=512 * 100, lr=3e-3, dead_tokens=20_000, dtype="bfloat16")
    res = train_sae(data, cfg, progress=False)
    assert res.sae.W_enc.dtype == torch.float32  # weights stay fp32
    assert res.log[-1]["nmse"] < 0.5 * res.log[0]["nmse"]


def test_eval_markdown_table_lists_the_figures():
    from saesteer.sae.evaluate import markdown_table

    md = markdown_table({"l0": 31.5, "nmse": 0.125, "ce_loss_recovered": 0.99, "tokens": 100}, title="x")
    assert "| L0 | 31.5000 |" in md and "| normalized MSE | 0.1250 |" in md and "| tokens (reconstruction) | 100 |" in md
