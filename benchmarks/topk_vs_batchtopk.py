"""Reproduce the BatchTopK paper's claim at our scale: BatchTopK vs TopK at equal k, all else equal.

Trains both architectures at each k on the same cached activations (same seed, data order, lr,
steps), then measures on the validation activations: L0 (TopK: exactly k per token; BatchTopK:
its inference threshold), normalized MSE, explained variance, dead latents, and CE loss recovered
over ``--ce-tokens`` predictions. Writes a Markdown table and JSON, and a PNG (NMSE vs L0, CE loss
recovered vs L0) when matplotlib is installed.

    python benchmarks/topk_vs_batchtopk.py --acts .cache/acts_l10_train.safetensors \\
        --val-acts .cache/acts_l10_val.safetensors --n-tokens 600000 --out docs/topk_vs_batchtopk
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


from saesteer.sae.activations import iter_texts, load_activations
from saesteer.sae.evaluate import ce_loss_metrics, reconstruction_metrics
from saesteer.sae.train import TrainConfig, train_sae
from saesteer.modeling.lm import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--acts", required=True)
    ap.add_argument("--val-acts", required=True)
    ap.add_argument("--hook", default="blocks.10.hook_resid_post")
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--n-tokens", type=int, default=600_000)
    ap.add_argument("--lr", type=float, default=7e-4)
    ap.add_argument("--ce-tokens", type=int, default=8192)
    ap.add_argument("--data", default="../shared/corpus")
    ap.add_argument("--out", default="docs/topk_vs_batchtopk")
    a = ap.parse_args()
    acts, val = load_activations(a.acts), load_activations(a.val_acts)
    model, tok = load_model()
    rows = []
    for k in a.ks:
        for arch in ("topk", "batchtopk"):
            cfg = TrainConfig(architecture=arch, d_sae=a.d_sae, k=k, n_tokens=a.n_tokens, lr=a.lr, seed=0)
            t = time.perf_counter()
            res = train_sae(acts, cfg, hook_point=a.hook, progress=False)
            sae = res.sae.eval().requires_grad_(False)
            figs = reconstruction_metrics(sae, val)
            figs.update(ce_loss_metrics(model, tok, sae, iter_texts(a.data, "validation"), a.ce_tokens))
            rows.append({"architecture": arch, "k": k, **figs, "train_s": round(time.perf_counter() - t, 1)})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2) + "\n")
    lines = [
        f"d_sae {a.d_sae}, {a.n_tokens:,} training tokens, lr {a.lr}, seed 0, hook {a.hook}; "
        f"validation: {rows[0]['tokens']:,} activations, CE over {rows[0]['ce_tokens']:,} predictions.",
        "",
        "| k | architecture | L0 | normalized MSE | explained variance | CE loss recovered | delta LM loss | dead |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['k']} | {r['architecture']} | {r['l0']:.1f} | {r['nmse']:.4f} | {r['explained_variance']:.4f} | "
                     f"{r['ce_loss_recovered']:.4f} | {r['delta_lm_loss']:.4f} | {100 * r['dead_fraction']:.1f} % |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for arch, marker in (("topk", "o"), ("batchtopk", "s")):
        rs = [r for r in rows if r["architecture"] == arch]
        axes[0].plot([r["l0"] for r in rs], [r["nmse"] for r in rs], marker=marker, label=arch)
        axes[1].plot([r["l0"] for r in rs], [r["ce_loss_recovered"] for r in rs], marker=marker, label=arch)
    for ax, name in zip(axes, ("normalized MSE", "CE loss recovered")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L0")
        ax.set_ylabel(name)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M, blocks.10.hook_resid_post, d_sae %d" % a.d_sae)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
