"""SAE evaluation: reconstruction and sparsity on activations, and the LM loss with the SAE spliced in.

Definitions (x [N, d_in] held-out activations, sinks excluded as in collection):

- L0: mean number of non-zero latents per token;
- normalized MSE: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (Gao et al. 2024: relative to always
  predicting the mean);
- explained variance: 1 - sum_d Var(x_d - x_hat_d) / sum_d Var(x_d);
- dead / dense latents: fraction of latents that never fire / fire on more than 10 % of tokens;
- CE loss recovered: (CE_zero - CE_sae) / (CE_zero - CE_clean), where the hook point's activation is
  replaced by the reconstruction (CE_sae) or by zeros (CE_zero) at every non-sink position;
  delta LM loss = CE_sae - CE_clean (nats per token);
- latent statistics (``compute_latent_stats``; the data and files are ``saesteer.sae.stats``):
  each latent's firing frequency, typical activation (mean when it fires), max, top contexts.
"""

from __future__ import annotations

import json
from typing import Iterable

import torch
import torch.nn.functional as F

from tqdm.auto import tqdm

from saesteer.modeling.lm import resolve_hook_point

from .activations import hook_activations, sink_mask, special_token_mask, token_windows
from .model import SAE
from .stats import LatentStats


@torch.no_grad()
def reconstruction_metrics(sae: SAE, acts: torch.Tensor, batch_size: int = 4096) -> dict:
    """L0, NMSE, explained variance, dead and dense fractions of ``sae`` on activations [N, d_in]."""
    n = acts.shape[0]
    fires = torch.zeros(sae.cfg.d_sae)
    sq_err = 0.0
    l0 = 0.0
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_x2 = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_r = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_r2 = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    for i in range(0, n, batch_size):
        x = acts[i : i + batch_size].float().to(sae.device)
        z = sae.encode(x)
        r = (x - sae.decode(z)).double().cpu()
        xd = x.double().cpu()
        fires += (z > 0).sum(0).float().cpu()
        l0 += float((z > 0).sum())
        sq_err += float(r.pow(2).sum())
        sum_x += xd.sum(0)
        sum_x2 += xd.pow(2).sum(0)
        sum_r += r.sum(0)
        sum_r2 += r.pow(2).sum(0)
    var_x = sum_x2 - sum_x.pow(2) / n  # per-dim, times n
    var_r = sum_r2 - sum_r.pow(2) / n
    return {
        "tokens": n,
        "l0": l0 / n,
        "nmse": sq_err / float(var_x.sum()),
        "explained_variance": 1.0 - float(var_r.sum() / var_x.sum()),
        "dead_fraction": float((fires == 0).float().mean()),
        "dense_fraction": float((fires > 0.1 * n).float().mean()),
    }


@torch.no_grad()
def ce_loss_metrics(
    model, tokenizer, sae: SAE, texts: Iterable[str], n_tokens: int = 16_384, context_size: int = 128, batch_size: int = 16
) -> dict:
    """CE loss clean / with the SAE spliced in / with the hook point zero-ablated, over windows of
    ``context_size`` tokens from ``texts`` until ``n_tokens`` predictions are scored."""
    hp = resolve_hook_point(model, sae.cfg.hook_point)
    mode = {"m": "clean"}

    def splice(h):
        if mode["m"] == "clean":
            return None
        keep = (sink_mask(h) & special_token_mask(mode["ids"], tokenizer)).unsqueeze(-1)  # only where the SAE was trained
        rep = sae.decode(sae.encode(h)).to(h.dtype) if mode["m"] == "sae" else torch.zeros_like(h)
        return torch.where(keep, rep, h)

    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    scored = 0
    handle = hp.attach(splice)
    try:
        batch: list[list[int]] = []
        for w in token_windows(texts, tokenizer, context_size):
            batch.append(w)
            if len(batch) < batch_size:
                continue
            ids = torch.tensor(batch, device=next(model.parameters()).device)
            batch = []
            mode["ids"] = ids
            for m in totals:
                mode["m"] = m
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
                totals[m] += float(F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"))
            scored += ids[:, 1:].numel()
            if scored >= n_tokens:
                break
    finally:
        handle.remove()
    ce = {m: v / max(scored, 1) for m, v in totals.items()}
    return {
        "ce_tokens": scored,
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
        "delta_lm_loss": ce["sae"] - ce["clean"],
    }


@torch.no_grad()
def compute_latent_stats(
    model,
    tokenizer,
    sae: SAE,
    texts: Iterable[str],
    n_tokens: int = 100_000,
    context_size: int = 128,
    batch_size: int = 16,
    top_contexts: int = 5,
    context_window: tuple[int, int] = (12, 4),
    progress: bool = True,
) -> LatentStats:
    """Run ``texts`` through ``model`` up to the SAE's hook point and gather :class:`LatentStats`.

    Args:
        n_tokens: non-sink tokens to measure (windows of ``context_size`` until reached).
        top_contexts: contexts kept per latent.
        context_window: tokens shown before and after the activating token.
        progress: show a tqdm bar.

    Raises:
        ValueError: the texts gave no tokens.
    """
    d_sae = sae.cfg.d_sae
    count = torch.zeros(d_sae, dtype=torch.float64)
    total = torch.zeros(d_sae, dtype=torch.float64)
    peak = torch.zeros(d_sae)
    best_val = torch.zeros(top_contexts, d_sae)
    best_loc = torch.full((top_contexts, d_sae), -1, dtype=torch.long)
    windows: list[list[int]] = []
    seen, norm_sum = 0, 0.0
    bar = tqdm(total=n_tokens, desc="latent stats", unit="tok", disable=not progress)
    stream = token_windows(texts, tokenizer, context_size)
    while seen < n_tokens:
        chunk = [w for _, w in zip(range(batch_size), stream)]
        if not chunk:
            break
        base = len(windows) * context_size
        windows.extend(chunk)
        acts = hook_activations(model, sae.cfg.hook_point, torch.tensor(chunk))
        keep = sink_mask(acts)
        loc = (base + torch.arange(acts.shape[0] * acts.shape[1])).view(acts.shape[:2])[keep]
        x = acts[keep].float().to(sae.device)
        z = sae.encode(x).float().cpu()
        norm_sum += float(x.norm(dim=-1).sum())
        count += (z > 0).sum(0).double()
        total += z.sum(0).double()
        peak = torch.maximum(peak, z.max(0).values)
        m = min(top_contexts, z.shape[0])
        v, i = z.topk(m, dim=0)  # [m, d_sae]
        cand_v = torch.cat([best_val, v])
        cand_l = torch.cat([best_loc, loc[i]])
        order = cand_v.topk(top_contexts, dim=0).indices
        best_val, best_loc = cand_v.gather(0, order), cand_l.gather(0, order)
        seen += int(keep.sum())
        bar.update(int(keep.sum()))
    bar.close()
    if seen == 0:
        raise ValueError("the texts gave no tokens for latent statistics")
    flat = [t for w in windows for t in w]
    before, after = context_window
    contexts: dict[int, list[dict]] = {}
    fired = (count > 0).nonzero().flatten().tolist()
    for lat in fired:
        rows = []
        for j in range(top_contexts):
            val, at = float(best_val[j, lat]), int(best_loc[j, lat])
            if val <= 0 or at < 0:
                break
            w0 = (at // context_size) * context_size
            lo, hi = max(w0, at - before), min(w0 + context_size, at + after + 1)
            left = tokenizer.decode(flat[lo:at])
            tok = tokenizer.decode(flat[at : at + 1])
            right = tokenizer.decode(flat[at + 1 : hi])
            rows.append({"activation": round(val, 4), "text": f"{left}«{tok}»{right}", "token": tok})
        contexts[lat] = rows
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).float()
    return LatentStats(
        frequency=(count / seen).float(),
        typical_activation=mean,
        max_activation=peak,
        n_tokens=seen,
        resid_norm_mean=norm_sum / seen,
        contexts=contexts,
        meta={"hook_point": sae.cfg.hook_point, "context_size": context_size},
    )


def validation_figures(model, tokenizer, sae: SAE, data, split: str, n_tokens: int, ce_tokens: int) -> dict:
    """``reconstruction_metrics`` on ``n_tokens`` activations collected from ``data``'s ``split``
    (sinks and special tokens left out) and ``ce_loss_metrics`` on ``ce_tokens`` predictions of the
    same text: the figures ``saesteer eval`` prints and ``saesteer finetune`` writes."""
    from .activations import collect_activations, iter_texts

    acts = collect_activations(model, tokenizer, sae.cfg.hook_point, iter_texts(data, split), n_tokens)
    figs = reconstruction_metrics(sae, acts)
    figs.update(ce_loss_metrics(model, tokenizer, sae, iter_texts(data, split), ce_tokens))
    return figs


def eval_cli(a) -> int:
    """``saesteer eval SAE_DIR``: figures on the validation split, printed as JSON."""
    from saesteer.modeling.lm import load_model

    from .io import load_sae

    sae = load_sae(a.sae, dtype=torch.float32)
    model, tok = load_model(a.model, a.gguf_file)
    figs = validation_figures(model, tok, sae, a.data, a.split, a.n_tokens, a.ce_tokens)
    text = json.dumps(figs, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as fh:
            fh.write(text + "\n")
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write(markdown_table(figs, title=f"{a.sae} on {a.data} ({a.split})"))
    return 0


def markdown_table(figs: dict, title: str = "") -> str:
    """The figures of ``reconstruction_metrics`` / ``ce_loss_metrics`` as a two-column Markdown table."""
    names = {
        "l0": "L0", "nmse": "normalized MSE", "explained_variance": "explained variance",
        "dead_fraction": "dead latents", "dense_fraction": "dense latents (> 10 % of tokens)",
        "ce_loss_recovered": "CE loss recovered", "delta_lm_loss": "delta LM loss (nats)",
        "ce_clean": "CE clean", "ce_sae": "CE with SAE", "ce_zero_ablation": "CE zero-ablated",
        "tokens": "tokens (reconstruction)", "ce_tokens": "tokens (CE)",
    }
    lines = ([f"**{title}**", ""] if title else []) + ["| figure | value |", "|---|---|"]
    for key, label in names.items():
        if key in figs:
            v = figs[key]
            lines.append(f"| {label} | {v:.4f} |" if isinstance(v, float) else f"| {label} | {v} |")
    return "\n".join(lines) + "\n"
