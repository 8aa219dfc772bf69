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
