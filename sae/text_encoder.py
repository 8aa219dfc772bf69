"""Activations and latent statistics of SAEs on a text-to-image pipeline's text encoder
(``saesteer.modeling.diffusion`` loads the pipelines): what text-encoder SAEs train on and what
their latents' statistics are read from.
"""

from __future__ import annotations

import torch

from saesteer.modeling.diffusion import prompt_token_ids

from .activations import hook_activations
from .stats import LatentStats


@torch.no_grad()
def prompt_activations(pipe, prompts: list[str], hook_point: str, batch_size: int = 256) -> torch.Tensor:
    """The text encoder's activations at ``hook_point`` for ``prompts``: float32 [len(prompts),
    model_max_length - 1, d_in], every position but the first.

    Position 0 holds the start token, whose activation is the same for every prompt under CLIP's
    causal mask (the text encoder's attention sink): it is left out of SAE training and statistics,
    as the LLM's sinks are. The padding positions after the caption stay in: the UNet cross-attends
    to them and, causally, they summarise the whole caption. The activation source of text-encoder
    SAEs (Concept Steerers, Kim & Ghadiyaram 2025, Sec. 3: a k-sparse SAE on the text encoder's
    residual stream over a prompt set).
    """
    out = []
    for s in range(0, len(prompts), batch_size):
        ids = prompt_token_ids(pipe.tokenizer, prompts[s:s + batch_size]).to(pipe.device)
        out.append(hook_activations(pipe.text_encoder, hook_point, ids)[:, 1:].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def prompt_latent_stats(pipe, sae, prompts: list[str], top_contexts: int = 5):
    """``LatentStats`` of a text-encoder SAE over ``prompts`` (positions as in ``prompt_activations``):
    frequency, typical and largest activation per latent, the mean activation norm, and each latent's
    top prompts (distinct) with the activating token marked ``«»`` (a padding position reads
    ``«<pad>»`` after the caption).

    Raises:
        ValueError: no prompts.
    """
    if not prompts:
        raise ValueError("no prompts for latent statistics")
    acts = prompt_activations(pipe, prompts, sae.cfg.hook_point)  # [P, L-1, d]
    P, L1, _ = acts.shape
    x = acts.reshape(P * L1, -1)
    z = sae.encode(x.to(sae.device, sae.dtype)).float().cpu()  # [P*(L-1), d_sae]
    fired = z > 0
    count = fired.sum(0)
    typical = z.sum(0) / count.clamp(min=1)  # 0 for a latent that never fires
    m = min(top_contexts * 8, z.shape[0])  # candidates: many prompts share a padding summary
    vals, where = z.topk(m, dim=0)
    ids = prompt_token_ids(pipe.tokenizer, prompts)
    eos = pipe.tokenizer.eos_token_id
    words_of: dict[int, list[str]] = {}  # prompt -> its caption's tokens (after the start token), decoded once

    def words(p: int) -> list[str]:
        if p not in words_of:
            toks = ids[p].tolist()
            end = toks.index(eos) if eos in toks else len(toks)
            words_of[p] = [pipe.tokenizer.decode([t]).strip() for t in toks[1:end]]
        return words_of[p]

    contexts: dict[int, list[dict]] = {}
    for latent in torch.nonzero(count > 0).flatten().tolist():
        rows = []
        for v, w in zip(vals[:, latent].tolist(), where[:, latent].tolist()):
            if v <= 0:
                break
            p, at = divmod(w, L1)  # at: the index into the positions after the start token
            ws = words(p)
            token = ws[at] if at < len(ws) else "<pad>"
            text = " ".join(ws[:at] + [f"«{token}»"] + ws[at + 1:]) if at < len(ws) else " ".join(ws + ["«<pad>»"])
            if any(r["text"] == text for r in rows):
                continue
            rows.append({"activation": round(v, 4), "text": text, "token": token})
            if len(rows) == top_contexts:
                break
        contexts[latent] = rows
    return LatentStats(frequency=fired.float().mean(0), typical_activation=typical.float(), max_activation=z.max(0).values,
                       n_tokens=int(z.shape[0]), resid_norm_mean=float(x.norm(dim=-1).mean()), contexts=contexts,
                       meta={"hook_point": sae.cfg.hook_point, "source": f"{P} prompts", "positions": "1.."})
