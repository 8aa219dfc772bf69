"""Latent statistics saved with an SAE: how often each latent fires, how strongly, and on what text.

They give steering strengths a unit (a clamp to "2x typical" means twice the latent's mean
activation when it fires) and make latents searchable by their top activating contexts. Computed on
held-out text (the validation split by default), sinks excluded exactly as in collection and
evaluation (``sae.activations.sink_mask``).

Files written beside the SAE's ``cfg.json``:

- ``latent_stats.safetensors``: ``frequency`` [d_sae] (fraction of tokens where z_i > 0),
  ``mean_activation`` [d_sae] (mean of z_i over the tokens where it fires; 0 for a latent that never
  fires), ``max_activation`` [d_sae], all float32; metadata ``n_tokens``, ``hook_name``,
  ``resid_norm_mean`` (mean L2 norm of the hook point's activation, in the model's units) and the
  text source;
- ``latent_contexts.json``: for each latent that fires, its top activating contexts as
  ``{"activation", "text", "token"}`` with the activating token marked by ``«»`` in ``text``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, safe_open, save_file
from tqdm.auto import tqdm

from .activations import hook_activations, sink_mask, token_windows
from .model import SAE

STATS_FILE = "latent_stats.safetensors"
CONTEXTS_FILE = "latent_contexts.json"


@dataclass
class LatentStats:
    """Per-latent statistics of one SAE (see the module docstring for the definitions).

    Attributes:
        frequency, mean_activation, max_activation: float32 [d_sae].
        n_tokens: tokens the statistics were measured on.
        resid_norm_mean: mean L2 norm of the hook point's activation (model units).
        contexts: latent -> top contexts, best first (may be empty when not computed or not loaded).
        meta: where the figures came from (hook point, text source, context size).
    """

    frequency: torch.Tensor
    mean_activation: torch.Tensor
    max_activation: torch.Tensor
    n_tokens: int
    resid_norm_mean: float
    contexts: dict[int, list[dict]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def typical_activation(self, latent: int) -> float:
        """The unit of latent strengths: the mean activation of ``latent`` when it fires.

        Raises:
            ValueError: the latent never fired on the statistics' text (no typical activation).
        """
        v = float(self.mean_activation[latent])
        if v <= 0:
            raise ValueError(f"latent {latent} never fired on the {self.n_tokens} tokens of the statistics; it has no typical activation")
        return v


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
        acts = hook_activations(model, sae.cfg.hook_name, torch.tensor(chunk))
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
        mean_activation=mean,
        max_activation=peak,
        n_tokens=seen,
        resid_norm_mean=norm_sum / seen,
        contexts=contexts,
        meta={"hook_name": sae.cfg.hook_name, "context_size": context_size},
    )


def save_latent_stats(stats: LatentStats, folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``latent_stats.safetensors`` and ``latent_contexts.json`` into the SAE's ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in stats.meta.items()}
    meta.update(n_tokens=str(stats.n_tokens), resid_norm_mean=repr(stats.resid_norm_mean))
    a = folder / STATS_FILE
    save_file(
        {
            "frequency": stats.frequency.float().contiguous(),
            "mean_activation": stats.mean_activation.float().contiguous(),
            "max_activation": stats.max_activation.float().contiguous(),
        },
        str(a),
        metadata=meta,
    )
    b = folder / CONTEXTS_FILE
    b.write_text(json.dumps({str(k): v for k, v in stats.contexts.items()}, ensure_ascii=False, separators=(",", ":")))
    return a, b


def load_latent_stats(folder: str | os.PathLike, contexts: bool = False) -> LatentStats | None:
    """The statistics saved beside an SAE, or None when it has none.

    Args:
        contexts: also read ``latent_contexts.json`` (a few MB for thousands of latents).
    """
    folder = Path(folder)
    path = folder / STATS_FILE
    if not path.is_file():
        return None
    t = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    ctx = {}
    if contexts and (folder / CONTEXTS_FILE).is_file():
        ctx = {int(k): v for k, v in json.loads((folder / CONTEXTS_FILE).read_text()).items()}
    return LatentStats(
        frequency=t["frequency"],
        mean_activation=t["mean_activation"],
        max_activation=t["max_activation"],
        n_tokens=int(meta.pop("n_tokens", 0)),
        resid_norm_mean=float(meta.pop("resid_norm_mean", "nan")),
        contexts=ctx,
        meta=meta,
    )


def latent_record(stats: LatentStats, latent: int) -> dict:
    """One latent's statistics as plain data: ``latent``, ``frequency``, ``typical_activation``,
    ``max_activation``, ``contexts`` (empty when not loaded).

    Raises:
        IndexError: ``latent`` outside [0, d_sae).
    """
    d_sae = stats.frequency.shape[0]
    if not 0 <= latent < d_sae:
        raise IndexError(f"latent {latent} is out of range (d_sae {d_sae})")
    return {
        "latent": latent,
        "frequency": float(stats.frequency[latent]),
        "typical_activation": float(stats.mean_activation[latent]),
        "max_activation": float(stats.max_activation[latent]),
        "contexts": list(stats.contexts.get(latent, [])),
    }


def search_latents(stats: LatentStats, query: str, top: int = 10) -> list[dict]:
    """Latents whose top activating contexts match ``query`` (case-insensitive, at a word start:
    "cat" finds "cats" and "Cat", not "deprecated"), best first.

    A context counts twice when its activating token matches, once when only the text around it does; ties go to the larger max activation. Needs ``stats.contexts`` (load with
    ``contexts=True``).

    Returns:
        ``latent_record`` dicts with a ``matches`` count.

    Raises:
        ValueError: an empty query, or statistics loaded without contexts.
    """
    q = query.strip()
    if not q:
        raise ValueError("empty search query")
    pattern = re.compile(r"(?<!\w)" + re.escape(q), re.IGNORECASE)
    if not stats.contexts:
        raise ValueError("these latent statistics have no contexts (load them with contexts=True)")
    scored = []
    for lat, ctx in stats.contexts.items():
        score = sum(2 if pattern.search(c["token"].strip()) else 1 for c in ctx if pattern.search(c["text"]))
        if score:
            scored.append((score, float(stats.max_activation[lat]), lat))
    scored.sort(reverse=True)
    return [dict(latent_record(stats, lat), matches=score) for score, _, lat in scored[:top]]
