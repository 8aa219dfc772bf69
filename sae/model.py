"""Sparse autoencoder module: one ``nn.Module`` for every architecture we serve.

Notation (shared with SAELens): ``d_in`` is the width of the hook point, ``d_sae`` the number of
latents. Parameters, all of ``cfg.dtype``:

- ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae]
- ``W_dec`` [d_sae, d_in] (row i is latent i's decoder direction), ``b_dec`` [d_in]
- ``threshold`` [d_sae] (architectures ``jumprelu`` and ``batchtopk``)

Forward math, for an input x [..., d_in]:

1. input scaling (Llama Scope, He et al. 2024, Sec. 3): ``x_s = x * input_scale`` where
   ``input_scale = sqrt(d_in) / E||x||`` was measured on the training data (1.0 means none);
2. ``pre = (x_s - b_dec * apply_b_dec_to_input) @ W_enc + b_enc``;
3. the architecture's activation (``ARCHITECTURES``) turns ``pre`` into the code z [..., d_sae];
4. ``x_hat = (z @ W_dec + b_dec) / input_scale``.

The math here does no IO: ``saesteer.sae.io`` reads and writes checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

ActivationFn = Callable[[torch.Tensor, "SAE"], torch.Tensor]


def _relu(pre: torch.Tensor, sae: "SAE") -> torch.Tensor:
    """Standard SAE (ReLU + L1 training): ``z = relu(pre)``."""
    return torch.relu(pre)


def _topk(pre: torch.Tensor, sae: "SAE") -> torch.Tensor:
    """TopK SAE (Gao et al., 2024): keep each token's k largest pre-activations, then ReLU."""
    k = int(sae.cfg.k)
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))


def _jumprelu(pre: torch.Tensor, sae: "SAE") -> torch.Tensor:
    """JumpReLU (Rajamanoharan et al., 2024, Eq. 2): ``z = relu(pre) * (pre > threshold)``.

    Also the inference rule of BatchTopK SAEs (Bussmann et al., 2024, Sec. 3.2): one threshold,
    estimated during training, replaces the batch top-k.
    """
    return torch.relu(pre) * (pre > sae.threshold)


ARCHITECTURES: dict[str, ActivationFn] = {
    "relu": _relu,
    "topk": _topk,
    "jumprelu": _jumprelu,
    "batchtopk": _jumprelu,
}
Architecture = Literal[tuple(ARCHITECTURES)]  # type: ignore[valid-type]
"""The architecture names, as a type (config models validate against it)."""
K_ARCHITECTURES = frozenset({"topk", "batchtopk"})
"""Architectures with a k (latents per token, exact or on average)."""
THRESHOLD_ARCHITECTURES = frozenset({"jumprelu", "batchtopk", "relu"})
"""Architectures whose latent i depends on pre_i alone (relu's threshold is 0): a steering hook
may compute only the latents it edits. TopK needs the whole code."""


class LatentRangeError(IndexError):
    """A latent index outside ``[0, d_sae)``."""


def check_latent(latent: int, d_sae: int, sae_id: str | None = None) -> None:
    """The one latent-range check (requests, the latent lookup, the statistics).

    Raises:
        LatentRangeError: ``latent`` outside ``[0, d_sae)``; the message names the SAE when given.
    """
    if not 0 <= latent < d_sae:
        of = f" for SAE {sae_id!r}" if sae_id is not None else ""
        raise LatentRangeError(f"latent {latent} is out of range{of} (d_sae {d_sae})")


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE's numerics, plus where it attaches.

    Attributes:
        architecture: one of ``ARCHITECTURES`` (``relu``, ``topk``, ``batchtopk``, ``jumprelu``).
        d_in: width of the hook point (576 for SmolLM2-135M's residual stream).
        d_sae: number of latents.
        k: latents per token (topk) or mean latents per token (batchtopk); None otherwise.
        apply_b_dec_to_input: subtract ``b_dec`` from the (scaled) input before encoding.
        input_scale: dataset-norm factor s multiplying the input (decode divides by it).
        hook_point: TransformerLens-style hook point, e.g. ``blocks.10.hook_resid_post``.
        model_name: the model the SAE was trained on (informational).
        dtype: parameter dtype name (``float32``, ``float16``, ``bfloat16``).
        metadata: free-form provenance (training recipe, figures); saved, never used by the math.
    """

    architecture: str
    d_in: int
    d_sae: int
    k: float | None = None
    apply_b_dec_to_input: bool = True
    input_scale: float = 1.0
    hook_point: str = ""
    model_name: str = ""
    dtype: str = "float32"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown SAE architecture {self.architecture!r}; expected one of {sorted(ARCHITECTURES)}"
            )
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if self.architecture in K_ARCHITECTURES and (self.k is None or self.k <= 0):
            raise ValueError(f"architecture {self.architecture!r} needs a positive k, got {self.k}")
        if self.architecture == "topk" and self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}")
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise ValueError(f"input_scale must be a positive finite number, got {self.input_scale}")

    def to_dict(self) -> dict:
        return asdict(self)


class SAE(nn.Module):
    """A sparse autoencoder over a hook point of width ``d_in``.

    Args:
        cfg: the configuration; parameters are allocated zero-filled in ``cfg.dtype`` and filled by
            a loader or a trainer.

    Raises:
        ValueError: from ``SAEConfig`` for an inconsistent configuration.
    """

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        # relu is a threshold architecture with threshold 0; keep the buffer for every architecture
        # so the sparse steering path reads one rule.
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=dtype))
        self._act: ActivationFn = ARCHITECTURES[cfg.architecture]

    # -- encoder -------------------------------------------------------------------------------
    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled, centred input ``x * s - b_dec`` [..., d_in], in the SAE's dtype."""
        x = x.to(self.W_enc.dtype) * self.cfg.input_scale
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x

    def pre_acts(self, x: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-activations [..., d_sae] (or [..., len(latents)] for a subset of latent indices)."""
        xin = self.encoder_input(x)
        if latents is None:
            return xin @ self.W_enc + self.b_enc
        return xin @ self.W_enc[:, latents] + self.b_enc[latents]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Code z [..., d_sae] for an input x [..., d_in] (inference rule of the architecture)."""
        return self._act(self.pre_acts(x), self)

    def encode_latents(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Activations [..., len(latents)] of the given latents only.

        For threshold architectures this costs O(d_in * len(latents)); for topk it needs the full
        code (a latent's membership in the top k depends on all the others).
        """
        if self.cfg.architecture in THRESHOLD_ARCHITECTURES:
            pre = self.pre_acts(x, latents)
            return torch.relu(pre) * (pre > self.threshold[latents])
        return self.encode(x)[..., latents]

    # -- decoder -------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat [..., d_in] of a code z [..., d_sae], in the input's units."""
        return (z @ self.W_dec + self.b_dec) / self.cfg.input_scale

    def decoder_directions(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoder rows [len(latents), d_in] in the input's units (``W_dec[i] / input_scale``)."""
        return self.W_dec[latents] / self.cfg.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat [..., d_in]."""
        return self.decode(self.encode(x))

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @torch.no_grad()
    def fold_input_scale(self) -> "SAE":
        """Fold ``input_scale`` into the weights so the SAE reads raw activations (s becomes 1).

        ``W_enc *= s``, ``b_dec /= s``, ``W_dec /= s``; ``b_enc`` and ``threshold`` are unchanged,
        so encode and decode give the same numbers. SAELens does the same for its
        ``norm_scaling_factor``. Returns self.
        """
        s = self.cfg.input_scale
        self.W_enc.mul_(s)
        self.b_dec.div_(s)
        self.W_dec.div_(s)
        self.cfg.metadata.setdefault("folded_input_scale", s)
        self.cfg.input_scale = 1.0
        return self

    @torch.no_grad()
    def unfold_input_scale(self) -> "SAE":
        """Undo :meth:`fold_input_scale` on an SAE saved folded (``metadata["folded_input_scale"]``,
        s), so it reads scaled activations again: ``W_enc /= s``, ``b_dec *= s``, ``W_dec *= s``,
        ``input_scale = s``. Encode and decode give the same numbers before and after; what changes
        is the units the weights live in, which the trainer needs (unit-norm decoder rows in the
        scaled space). No-op when the SAE is not folded. Returns self.
        """
        s = self.cfg.metadata.get("folded_input_scale")
        if not s or self.cfg.input_scale != 1.0:
            return self
        self.W_enc.div_(s)
        self.b_dec.mul_(s)
        self.W_dec.mul_(s)
        self.cfg.input_scale = float(s)
        del self.cfg.metadata["folded_input_scale"]
        return self
