"""Is a later block harder to reconstruct within issue 15's loss target? A probe without training.

At each block's residual stream (``blocks.B.hook_resid_post``), the activations are replaced by
their best rank-r linear reconstruction (PCA over ``--n-tokens`` activations of the corpus's
validation split: ``mu + P P^T (x - mu)``, P the top r principal directions) with r chosen so that
its normalized MSE is 0.10 and then 0.15, spliced in exactly where an SAE's reconstruction goes
(sinks and special tokens kept out, ``ce_loss_metrics``). The delta LM loss at equal NMSE says how
much the rest of the model minds losing the residual's low-variance directions at that block. It
is a probe of the block, not of an SAE: an SAE's error lies in other directions, so compare blocks
with it, and SAEs with their own figures.

    python benchmarks/block_sensitivity.py --blocks 10 12 14 16 18 20 --out docs/general_sae/block_sensitivity.json

Needs the corpus of ``saesteer corpus build`` (``--data``, default ``runs/corpus``).
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch

from saesteer.sae.activations import collect_activations, iter_texts
from saesteer.sae.evaluate import ce_loss_metrics
from saesteer.modeling.lm import load_model


def pca_splice(acts: torch.Tensor, hook_point: str, nmse: float) -> tuple[SimpleNamespace, int, float]:
    """A stand-in SAE whose ``decode(encode(x))`` is the rank-r PCA reconstruction of x [n, d_in].

    r is the smallest rank whose normalized MSE on ``acts`` [N, d_in] is at most ``nmse``; the
    principal directions come from the float64 covariance. Returns (stand-in, r, its NMSE)."""
    x = acts.double()
    mu = x.mean(0)
    evals, evecs = torch.linalg.eigh((x - mu).T @ (x - mu) / len(x))
    evals, evecs = evals.flip(0), evecs.flip(1)
    left = 1 - evals.cumsum(0) / evals.sum()  # NMSE of keeping the first i+1 directions
    r = int((left > nmse).sum()) + 1
    p, m = evecs[:, :r].float(), mu.float()
    sae = SimpleNamespace(cfg=SimpleNamespace(hook_point=hook_point),
                          encode=lambda h: (h.float() - m) @ p, decode=lambda z: m + z @ p.T)
    return sae, r, float(left[r - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[10, 12, 14, 16, 18, 20])
    ap.add_argument("--data", default="runs/corpus")
    ap.add_argument("--n-tokens", type=int, default=40_000, help="activations per block for the PCA")
    ap.add_argument("--ce-tokens", type=int, default=8192, help="next-token predictions per CE figure")
    ap.add_argument("--nmse", type=float, nargs="+", default=[0.10, 0.15])
    ap.add_argument("--out", help=".json for the table")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model()
    hooks = [f"blocks.{b}.hook_resid_post" for b in a.blocks]
    acts = collect_activations(model, tok, hooks, iter_texts(a.data, "validation"), a.n_tokens, progress=False)
    rows = {}
    print("| block | " + " | ".join(f"NMSE {t}: rank, delta LM, CE loss recovered" for t in a.nmse) + " |")
    for b, h in zip(a.blocks, hooks):
        cells = {}
        for t in a.nmse:
            sae, r, got = pca_splice(acts[h], h, t)
            ce = ce_loss_metrics(model, tok, sae, iter_texts(a.data, "validation"), n_tokens=a.ce_tokens)
            cells[str(t)] = {"rank": r, "nmse": got, "delta_lm": ce["delta_lm_loss"], "ce_loss_recovered": ce["ce_loss_recovered"]}
        rows[b] = cells
        print(f"| {b} | " + " | ".join(f"{c['rank']}, {c['delta_lm']:.3f}, {c['ce_loss_recovered']:.4f}" for c in cells.values()) + " |",
              flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"n_tokens": a.n_tokens, "ce_tokens": a.ce_tokens, "blocks": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
