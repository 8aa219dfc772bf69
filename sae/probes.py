"""Linear probes on a hook point's activations or on SAE latents: token-level detectors.

A probe scores a token by ``sigmoid(((f - mean) / std) . w + b)`` where ``f`` is the feature
vector of the token: the raw activation x [d_in] at the hook point, or the codes of chosen SAE
latents ``z[latents]`` (a *sparse probe*, Kantamneni et al., "Are Sparse Autoencoders Useful? A Case
Study in Sparse Probing", ICML 2025: latents chosen by the class-mean difference, then logistic
regression on those alone). Training is L2-regularised logistic regression (L-BFGS, full batch,
classes weighted to balance), in float64 on standardised features.

Probes are saved as safetensors (``w``, ``b``, ``mean``, ``std``, ``latents``) with their kind,
hook point and SAE id in the metadata.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file


@dataclass
class LinearProbe:
    """A trained probe. ``kind``: ``raw`` (features are x [d_in]) or ``sae`` (features are
    ``z[..., latents]`` of SAE ``sae_id``). Tensors float32: ``w``, ``mean``, ``std`` [n_features],
    ``b`` [] ; ``latents`` int64 [n_features] for ``sae`` probes, empty for ``raw``."""

    kind: str
    hook_point: str
    w: torch.Tensor
    b: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    latents: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    sae_id: str = ""
    threshold: float = 0.5

    def features(self, x: torch.Tensor, sae=None) -> torch.Tensor:
        """Features [..., n_features] of activations x [..., d_in] (``sae`` needed for ``sae`` probes)."""
        if self.kind == "raw":
            return x.float()
        if sae is None:
            raise ValueError("an SAE probe needs its SAE to encode the activations")
        return sae.encode_latents(x, self.latents.to(sae.device)).float()

    def score(self, x: torch.Tensor, sae=None) -> torch.Tensor:
        """Probabilities [...] in [0, 1] for activations x [..., d_in]."""
        return self.score_features(self.features(x, sae))

    def score_features(self, f: torch.Tensor) -> torch.Tensor:
        """Probabilities [...] for features f [..., n_features] (``features``' output)."""
        f = (f - self.mean.to(f.device)) / self.std.to(f.device)
        return torch.sigmoid(f @ self.w.to(f.device) + self.b.to(f.device))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The standardisation folded into the weights, computed in float64: ``(w / std [F],
        b - (mean / std) . w [])``, so that ``score_features(f) = sigmoid(f @ w' + b')``."""
        w = self.w.double() / self.std.double()
        return w, self.b.double() - (self.mean.double() * w).sum()


def train_probe(features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-3, max_iter: int = 200) -> tuple:
    """Logistic regression of ``labels`` [N] (0/1) on ``features`` [N, F], standardised.

    Returns:
        ``(w [F], b [], mean [F], std [F])``, float32.

    Raises:
        ValueError: a single class in ``labels``.
    """
    y = labels.double()
    pos = float(y.sum())
    if pos == 0 or pos == len(y):
        raise ValueError("a probe needs examples of both classes")
    X = features.double()
    mean, std = X.mean(0), X.std(0).clamp(min=1e-6)
    X = (X - mean) / std
    weight = torch.where(y > 0, len(y) / (2 * pos), len(y) / (2 * (len(y) - pos)))
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y, weight=weight)
                + l2 * (w * w).sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float(), mean.float(), std.float()


def select_latents(z: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` latents of codes z [N, d_sae] whose mean differs most between the classes
    (positive minus negative mean, largest first): the sparse probe's features. int64 [k]."""
    y = labels.bool()
    diff = z[y].float().mean(0) - z[~y].float().mean(0)
    return diff.topk(k).indices


def save_probe(probe: LinearProbe, path: str | os.PathLike) -> Path:
    """Write ``probe`` to ``path`` (safetensors)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": probe.w.contiguous(), "b": probe.b.reshape(1).contiguous(), "mean": probe.mean.contiguous(),
               "std": probe.std.contiguous(), "latents": probe.latents.contiguous()}, str(p),
              metadata={"kind": probe.kind, "hook_point": probe.hook_point, "sae_id": probe.sae_id,
                        "threshold": repr(float(probe.threshold))})
    return p


def load_probe(path: str | os.PathLike) -> LinearProbe:
    """A probe written by ``save_probe``.

    Raises:
        FileNotFoundError: no such file.
    """
    t = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    return LinearProbe(kind=meta["kind"], hook_point=meta["hook_point"], w=t["w"], b=t["b"][0], mean=t["mean"],
                       std=t["std"], latents=t["latents"], sae_id=meta.get("sae_id", ""),
                       threshold=float(meta.get("threshold", 0.5)))
