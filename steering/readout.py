"""Reading an SAE at every token: the latents a prompt (and completion) activate, without generating.

The activation at the SAE's hook point is computed by the model (the forward stops there) and
encoded by the SAE, exactly as ``SAE.encode`` would on that activation. Attention-sink positions
(position 0, and tokens whose norm is over 10x the median: ``sae.activations.sink_mask``) are outside
what our SAEs are trained on; they are flagged and read as zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from saesteer.sae.activations import hook_activations, sink_mask
from saesteer.sae.model import SAE


@dataclass
class Readout:
    """What an SAE reads on one token sequence of length T.

    Attributes:
        sink: [T] bool, sink positions (read as zero).
        top_latents, top_values: [T, k] int64 / float32, each token's k largest activations
            (k = min(top_k, d_sae)); entries whose value is 0 did not fire.
        traces: [len(latents), T] float32, the requested latents at every token.
    """

    sink: torch.Tensor
    top_latents: torch.Tensor
    top_values: torch.Tensor
    traces: torch.Tensor


@torch.no_grad()
def read_latents(model, sae: SAE, input_ids: Sequence[int], top_k: int = 8, latents: Sequence[int] = ()) -> Readout:
    """Encode the activation at ``sae.cfg.hook_point`` of ``input_ids`` (one sequence, T tokens).

    Args:
        model: the transformers causal LM the SAE belongs to.
        sae: the SAE (any dtype; the code is returned as float32).
        input_ids: token ids, T >= 1.
        top_k: latents per token in ``top_latents``.
        latents: latent indices traced at every token (each in [0, d_sae): callers check).

    Raises:
        ValueError: no tokens.
    """
    if not input_ids:
        raise ValueError("no tokens to read")
    acts = hook_activations(model, sae.cfg.hook_point, torch.tensor([list(input_ids)]))  # [1, T, d_in]
    T = acts.shape[1]
    keep = sink_mask(acts)[0] if T > 1 else torch.zeros(1, dtype=torch.bool)
    z = sae.encode(acts[0].to(device=sae.device)).float().cpu()  # [T, d_sae]
    z[~keep.cpu()] = 0
    k = min(top_k, z.shape[1])
    top_values, top_latents = z.topk(k, dim=-1) if k else (z[:, :0], z[:, :0].long())
    traces = z[:, torch.tensor(list(latents), dtype=torch.long)].T.contiguous()
    return Readout(sink=~keep.cpu(), top_latents=top_latents, top_values=top_values, traces=traces)
