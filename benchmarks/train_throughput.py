"""Training throughput: our BatchTopK trainer against SAELens's, on the same activations, on CPU.

Both train a BatchTopK SAE with the same d_in, d_sae, k, batch size, learning rate and number of
steps, in float32 with Adam, on batches drawn from the same activations. Each side first runs a few
warm-up steps (a separate short run), then a timed run; with ``--repeats`` the timed runs
alternate ours / SAELens and the median is reported. Printed: tokens/s of each and the ratio
ours / SAELens, from the one process.

- Ours: ``saesteer.sae.train.train_sae``; tokens/s over its training loop (set-up excluded).
- SAELens: its public ``SAETrainer`` with a ``BatchTopKTrainingSAE``, fed an iterator of
  activation batches (SAELens's ``DataProvider``, no model); tokens/s over ``SAETrainer.fit()``.
  Its norm-scaling factor is set to ours beforehand, so ``fit`` skips its estimation pass and
  both train in the same scaled space. Dead-latent window: the same number of tokens as ours.

The two recipes are not identical (SAELens: dense decode of the code, activations rescaled by
decoder norms, gradient-norm clipping; ours: sparse decode of the kept activations with
``embedding_bag``, decoder-norm gradient projection and renormalisation); the benchmark times each
library's own trainer as shipped.

Activations: ``--acts FILE`` (``saesteer collect`` output), or by default SYNTHETIC ones: sparse
sums of random unit directions plus Gaussian noise, d_in 576 (SmolLM2-135M's width). Throughput
depends on the shapes, hardly on the values.

sae-lens is not a dependency of saesteer; without it this script times ours alone.

    python benchmarks/train_throughput.py                       # ~5 min on 2 CPU cores
    python benchmarks/train_throughput.py --acts .cache/acts_l10_train.safetensors --steps 100 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: SAELens's fit() draws a progress bar

import torch  # noqa: E402

from saesteer.sae.train import TrainConfig, dataset_input_scale, train_sae  # noqa: E402


def synthetic_activations(n: int, d_in: int, n_feat: int = 8192, active: int = 24, seed: int = 0) -> torch.Tensor:
    """SYNTHETIC activations [n, d_in]: ``active`` random unit directions (of ``n_feat``) per token,
    exponential coefficients, a shared offset, plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_feat, d_in, generator=g)
    dirs /= dirs.norm(dim=-1, keepdim=True)
    out = 0.3 * torch.randn(n, d_in, generator=g) + torch.randn(d_in, generator=g)
    for i in range(0, n, 1024):
        m = min(1024, n - i)
        idx = torch.randint(0, n_feat, (m, active), generator=g)
        coef = torch.empty(m, active).exponential_(generator=g)
        out[i : i + m] += torch.einsum("ma,mad->md", coef, dirs[idx])
    return out


def batches(acts: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled batches [batch_size, d_in] (float32), a fresh permutation each pass, as ours draws them."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(acts.shape[0], generator=g)
        for i in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[order[i : i + batch_size]].float()


def run_ours(acts: torch.Tensor, cfg: TrainConfig) -> float:
    """Tokens/s of our trainer's loop over ``cfg.n_tokens`` tokens."""
    return train_sae(acts, cfg, progress=False).tokens_per_s


def run_saelens(acts: torch.Tensor, cfg: TrainConfig, scale: float) -> float:
    """Tokens/s of SAELens's ``SAETrainer.fit`` over the same number of steps (BatchTopK SAE)."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, SAETrainer
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(cfg.seed)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
        d_in=acts.shape[1], d_sae=cfg.d_sae, k=cfg.k, dtype="float32", device="cpu",
        normalize_activations="expected_average_only_in",
    ))
    n_steps = max(1, cfg.n_tokens // cfg.batch_size)
    tcfg = SAETrainerConfig(
        total_training_samples=n_steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,  # what SAELens's runner config sets; unused by the constant schedule
        lr_warm_up_steps=max(1, int(cfg.warmup_frac * n_steps)),  # ours: linear warm-up, constant, linear decay
        lr_decay_steps=n_steps - int((1 - cfg.decay_frac) * n_steps),
        adam_beta1=cfg.adam_betas[0],
        adam_beta2=cfg.adam_betas[1],
        device="cpu",
        dead_feature_window=math.ceil(cfg.dead_tokens / cfg.batch_size),
        feature_sampling_window=max(n_steps, 1),
    )
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=batches(acts, cfg.batch_size, cfg.seed))
    trainer.activation_scaler.scaling_factor = scale  # as ours: no estimation pass inside fit()
    t0 = time.perf_counter()
    trainer.fit()
    return n_steps * cfg.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acts", default=None, help="activations file (default: SYNTHETIC, d_in --d-in)")
    ap.add_argument("--d-in", type=int, default=576, help="width of the synthetic activations")
    ap.add_argument("--n-acts", type=int, default=65_536, help="synthetic activations to draw batches from")
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per run")
    ap.add_argument("--warmup-steps", type=int, default=3, help="steps of the untimed warm-up run of each trainer")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per trainer, interleaved; the median is printed")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    a = ap.parse_args()

    if a.acts:
        from saesteer.sae.activations import load_activations

        acts, source = load_activations(a.acts), f"activations from {a.acts}"
    else:
        acts = synthetic_activations(a.n_acts, a.d_in)
        source = f"SYNTHETIC activations (sparse random directions + Gaussian noise), {a.n_acts} x {a.d_in}"
    cfg = TrainConfig(architecture="batchtopk", d_sae=a.d_sae, k=a.k, batch_size=a.batch_size,
                      n_tokens=a.steps * a.batch_size, lr=a.lr, seed=0)
    warm = dataclasses.replace(cfg, n_tokens=a.warmup_steps * a.batch_size)
    scale = dataset_input_scale(acts)
    try:
        import sae_lens

        saelens_version = sae_lens.__version__
    except ImportError:
        saelens_version = None

    print(f"data: {source}")
    print(f"BatchTopK, d_in {acts.shape[1]}, d_sae {a.d_sae}, k {a.k}, batch {a.batch_size}, {a.steps} timed steps "
          f"(+{a.warmup_steps} warm-up) x {a.repeats}, float32, CPU")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, sae-lens {saelens_version or 'not installed'}")
    if saelens_version is None:
        print("sae-lens is not installed (pip install sae-lens): timing ours alone")

    ours, theirs = [], []
    run_ours(acts, warm)
    if saelens_version:
        run_saelens(acts, warm, scale)
    for r in range(a.repeats):
        ours.append(run_ours(acts, cfg))
        print(f"  run {r + 1}: ours {ours[-1]:,.0f} tokens/s", end="", flush=True)
        if saelens_version:
            theirs.append(run_saelens(acts, cfg, scale))
            print(f", SAELens {theirs[-1]:,.0f} tokens/s", end="")
        print(flush=True)

    o = statistics.median(ours)
    rows = [("saesteer train_sae", o, 1000 * a.batch_size / o)]
    if theirs:
        t = statistics.median(theirs)
        rows.append((f"SAELens {saelens_version} SAETrainer", t, 1000 * a.batch_size / t))
    print()
    print("| trainer | tokens/s | ms/step |")
    print("|---|---|---|")
    for name, tps, ms in rows:
        print(f"| {name} | {tps:,.0f} | {ms:,.0f} |")
    result = {"source": source, "args": vars(a), "threads": torch.get_num_threads(), "ours_tokens_per_s": ours,
              "saelens_version": saelens_version, "saelens_tokens_per_s": theirs}
    if theirs:
        result["ratio_ours_over_saelens"] = o / statistics.median(theirs)
        print(f"\nours / SAELens: {result['ratio_ours_over_saelens']:.2f}x")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=2)
            fh.write("\n")


if __name__ == "__main__":
    main()
