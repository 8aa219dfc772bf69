"""Latent statistics saved with an SAE: how often each latent fires, how strongly, and on what text.

They give steering strengths a unit (a clamp to "2x typical" means twice the latent's mean
activation when it fires) and make latents searchable by their top activating contexts. Computed on
held-out text (the validation split by default), sinks excluded exactly as in collection and
evaluation (``sae.activations.sink_mask``).

Files written beside the SAE's ``cfg.json``:

- ``latent_stats.safetensors``: ``frequency`` [d_sae] (fraction of tokens where z_i > 0),
  ``typical_activation`` [d_sae] (mean of z_i over the tokens where it fires; 0 for a latent that
  never fires; files written before it had this name call it ``mean_activation``, and still load),
  ``max_activation`` [d_sae], all float32; metadata ``n_tokens``, ``hook_point``,
  ``resid_norm_mean`` (mean L2 norm of the hook point's activation, in the model's units) and the
  text source;
- ``latent_contexts.json``: for each latent that fires, its top activating contexts as
  ``{"activation", "text", "token"}`` with the activating token marked by ``«»`` in ``text``.

This module is the statistics' data and files only (no model runs here, so a server reads them
cheaply); ``saesteer.sae.evaluate.compute_latent_stats`` measures them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from .model import check_latent

STATS_FILE = "latent_stats.safetensors"
CONTEXTS_FILE = "latent_contexts.json"


@dataclass
class LatentStats:
    """Per-latent statistics of one SAE (see the module docstring for the definitions).

    Attributes:
        frequency, typical_activation, max_activation: float32 [d_sae].
        n_tokens: tokens the statistics were measured on.
        resid_norm_mean: mean L2 norm of the hook point's activation (model units).
        contexts: latent -> top contexts, best first (may be empty when not computed or not loaded).
        meta: where the figures came from (hook point, text source, context size).
    """

    frequency: torch.Tensor
    typical_activation: torch.Tensor
    max_activation: torch.Tensor
    n_tokens: int
    resid_norm_mean: float
    contexts: dict[int, list[dict]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def typical(self, latent: int) -> float:
        """The unit of latent strengths: the mean activation of ``latent`` when it fires.

        Raises:
            ValueError: the latent never fired on the statistics' text (no typical activation).
        """
        v = float(self.typical_activation[latent])
        if v <= 0:
            raise ValueError(f"latent {latent} never fired on the {self.n_tokens} tokens of the statistics; it has no typical activation")
        return v


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
            "typical_activation": stats.typical_activation.float().contiguous(),
            "max_activation": stats.max_activation.float().contiguous(),
        },
        str(a),
        metadata=meta,
    )
    b = folder / CONTEXTS_FILE
    b.write_text(json.dumps({str(k): v for k, v in stats.contexts.items()}, ensure_ascii=False, separators=(",", ":")))
    return a, b


def read_latent_files(folder: str | os.PathLike, tensors_file: str, json_file: str, with_json: bool):
    """Per-latent files saved beside an SAE: the safetensors ``tensors_file`` (its tensors and string
    metadata) and, with ``with_json``, ``json_file``, a JSON object keyed by latent index.

    Returns:
        ``(tensors, metadata, {latent: value})`` (the dict empty without ``with_json`` or the file),
        or None when ``tensors_file`` is not there.
    """
    folder = Path(folder)
    path = folder / tensors_file
    if not path.is_file():
        return None
    t = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    side = {}
    if with_json and (folder / json_file).is_file():
        side = {int(k): v for k, v in json.loads((folder / json_file).read_text()).items()}
    return t, meta, side


def load_latent_stats(folder: str | os.PathLike, contexts: bool = False) -> LatentStats | None:
    """The statistics saved beside an SAE, or None when it has none.

    Args:
        contexts: also read ``latent_contexts.json`` (a few MB for thousands of latents).
    """
    got = read_latent_files(folder, STATS_FILE, CONTEXTS_FILE, contexts)
    if got is None:
        return None
    t, meta, ctx = got
    return LatentStats(
        frequency=t["frequency"],
        typical_activation=t["typical_activation"] if "typical_activation" in t else t["mean_activation"],
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
        LatentRangeError: (an IndexError) ``latent`` outside [0, d_sae).
    """
    check_latent(latent, stats.frequency.shape[0])
    return {
        "latent": latent,
        "frequency": float(stats.frequency[latent]),
        "typical_activation": float(stats.typical_activation[latent]),
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
