"""Inference thresholds after training: ``calibrate_threshold`` re-fits a BatchTopK (or JumpReLU)
SAE's global threshold so that the inference L0 hits a target on given activations, ``mean_l0``
measures that L0, and ``calibrate_cli`` is ``saesteer calibrate``.
"""

from __future__ import annotations

import json
import math
import warnings

import torch

from .model import SAE


@torch.no_grad()
def mean_l0(sae: SAE, acts: torch.Tensor, batch_size: int = 4096) -> float:
    """Mean number of non-zero latents per token of ``sae.encode`` on activations [N, d_in]."""
    total = 0
    for i in range(0, acts.shape[0], batch_size):
        total += int((sae.encode(acts[i : i + batch_size].to(sae.device)) != 0).sum())
    return total / max(acts.shape[0], 1)


@torch.no_grad()
def calibrate_threshold(sae: SAE, acts: torch.Tensor, target_l0: float, batch_size: int = 4096) -> float:
    """Set the SAE's single global threshold so that its mean L0 on ``acts`` [N, d_in] is ``target_l0``.

    BatchTopK SAEs (Bussmann et al., 2024, "BatchTopK Sparse Autoencoders", Sec. 3.2) replace the
    batch top-k at inference by one threshold theta, ``z = relu(pre) * (pre > theta)``; the paper
    *estimates* theta during training (we keep an EMA of the smallest kept activation per batch).
    Calibrating theta afterwards on (held-out) activations, so that the inference L0 matches a
    chosen target, is our addition, not the paper's: an EMA over a short run lags the code and
    lands below k (``docs/topk_vs_batchtopk.md``).

    The threshold acts on the SAE's pre-activations in its own space (``SAE.pre_acts``: input times
    ``input_scale``, minus ``b_dec``, through the encoder), as ``SAE.encode`` does. With
    M = round(N * target_l0), theta lies between the M-th and (M+1)-th largest positive
    pre-activation over all N tokens and d_sae latents (their midpoint), so exactly M entries fire.
    Ties at the M-th value (duplicated tokens, low-precision weights) make exactly M impossible;
    theta then goes to whichever side of the tied group gives the count nearer M. If fewer than M
    pre-activations are positive, theta is 0 (everything positive fires) and a warning says so.

    The top M values are found in one streaming pass (``batch_size`` tokens at a time), keeping a
    buffer of about M floats. Also usable for a JumpReLU SAE: its per-latent thresholds are
    replaced by the one global value.

    Returns:
        The threshold, also written to ``sae.threshold`` (all latents) and recorded in
        ``sae.cfg.metadata["threshold_calibration"]``.

    Raises:
        ValueError: an architecture without a threshold rule (relu, topk), or a target outside
            (0, d_sae].
    """
    if sae.cfg.architecture not in ("batchtopk", "jumprelu"):
        raise ValueError(f"threshold calibration needs a batchtopk or jumprelu SAE, not {sae.cfg.architecture!r}")
    n = acts.shape[0]
    if not (0 < target_l0 <= sae.cfg.d_sae) or n == 0:
        raise ValueError(f"target_l0 must be in (0, d_sae={sae.cfg.d_sae}] and acts non-empty; got {target_l0}, N={n}")
    m = max(1, round(n * target_l0))
    keep = m + max(1024, m // 100)  # room below the M-th value to see past ties
    buf = torch.empty(0)
    lower = 0.0  # only positive pre-activations can fire (z = relu(pre) * (pre > theta))
    complete = True  # buf holds every positive pre-activation seen so far
    for i in range(0, n, batch_size):
        pre = sae.pre_acts(acts[i : i + batch_size].to(sae.device)).float().flatten()
        buf = torch.cat([buf, pre[pre > lower].cpu()])
        if buf.numel() > keep:
            buf = buf.topk(keep, sorted=False).values
            lower = float(buf.min())
            complete = False
    vals = buf.sort(descending=True).values
    if vals.numel() <= m and complete:
        warnings.warn(f"only {vals.numel()} positive pre-activations over {n} tokens (L0 {vals.numel() / n:.2f}), "
                      f"fewer than target L0 {target_l0}: threshold 0", stacklevel=2)
        theta, count = 0.0, vals.numel()
    else:
        a = float(vals[m - 1])
        n_gt, n_ge = int((vals > a).sum()), int((vals >= a).sum())
        # option A: above the tie group of a, n_gt fire
        upper = float(vals[n_gt - 1]) if n_gt > 0 else math.inf
        t_a = (a + upper) / 2 if math.isfinite(upper) else a
        if not (a <= t_a < upper):
            t_a = a
        # option B: below it, n_ge fire; needs the next value down (0 if all positives are held)
        nxt = float(vals[n_ge]) if n_ge < vals.numel() else (0.0 if complete else None)
        t_b = None
        if nxt is not None:
            t_b = (a + nxt) / 2
            if not (nxt <= t_b < a):
                t_b = nxt
        if t_b is not None and n_ge - m <= m - n_gt:
            theta, count = t_b, n_ge
        else:
            theta, count = t_a, n_gt
    before = sae.threshold.detach().float()
    sae.threshold.fill_(theta)
    sae.cfg.metadata["threshold_calibration"] = {
        "method": "global threshold at the target L0 quantile of positive pre-activations (post-hoc)",
        "target_l0": float(target_l0),
        "l0_on_calibration_acts": count / n,
        "tokens": int(n),
        "threshold": float(sae.threshold[0]),
        "previous_threshold": float(before.mean()) if bool((before == before[0]).all()) else "per-latent",
    }
    return float(sae.threshold[0])


def calibrate_cli(a) -> int:
    """``saesteer calibrate SAE_DIR --acts ACTS --l0 K [--out DIR]``: refit the global threshold."""
    from .activations import load_activations
    from .io import load_sae, read_sae_config, save_sae

    disk_dtype = getattr(torch, read_sae_config(a.sae).dtype)
    sae = load_sae(a.sae, dtype=torch.float32)
    acts = load_activations(a.acts)
    if a.max_tokens:
        acts = acts[: a.max_tokens]
    l0_before = mean_l0(sae, acts)
    try:
        theta = calibrate_threshold(sae, acts, a.l0)
    except ValueError as e:
        raise SystemExit(f"saesteer calibrate: {e}") from e
    out = save_sae(sae, a.out or a.sae, dtype=disk_dtype)
    written = load_sae(out, dtype=torch.float32)  # what was written, dtype rounding of theta included
    report = {"sae": str(a.sae), "out": str(out), "target_l0": a.l0, "tokens": int(acts.shape[0]),
              "threshold": theta, "threshold_on_disk": float(written.threshold[0]),
              "l0_before": l0_before, "l0_after": mean_l0(written, acts)}
    (out / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0
