"""What each latent does to the model's output: logit-lens top tokens and output scores.

Latents picked by the inputs that activate them often do not steer; Arad, Mueller
& Belinkov ("SAEs Are Good for Steering - If You Select the Right Features", EMNLP 2025, Sec. 3)
score each latent by its effect on the output instead and keep the high scorers. Two quantities per
latent i, with decoder direction d_i = ``W_dec[i] / input_scale`` [d_in] (what a clamp or add of
one unit adds at the hook point, ``SAE.decoder_directions``):

**Logit lens** (their Sec. 3.2): ``l_i = W_U · norm_f(d_i)`` [vocab], the model's final norm
(RMSNorm for SmolLM2) and unembedding applied to the direction itself; ``T_i`` are the ``top_k``
tokens of ``l_i`` (largest logits, i.e. largest ``softmax(l_i)``).

**Output score** (their Sec. 3.2, output score; k = 20 and amplification 10 as in their code). On
a neutral prompt x_1..x_n, one forward pass with the hook point's activation at the last position
replaced by ``h_n + alpha * m * d_i``, where ``m = max_j z_j(h_n)`` is the largest latent activation
at that position on the unsteered pass and ``alpha`` the amplification; ``p_i`` is the resulting
next-token distribution [vocab]. With ``rank_i(t)`` the number of tokens u with
``p_i(u) > p_i(t)`` (0 for the most likely token) and V the vocabulary size::

    output_score_i = (1 - min_{t in T_i} rank_i(t) / V) * max_{t in T_i} p_i(t)

It is high when amplifying the latent makes one of its own logit-lens tokens the likely next token.
Over several neutral prompts the score is the mean of the per-prompt scores (Arad et al. use one
prompt, "From my experience,"; we add a chat prompt, where steering happens here).

Only the last position changes, so the prefix's KV cache is computed once per prompt and each batch
of latents runs one token per row (``output_scores``); ``output_score_direct`` is the plain full
forward pass for one latent, the eager twin the tests compare against in float64.

Files beside the SAE's ``cfg.json``: ``latent_output.safetensors`` (``output_score``,
``top_token_prob``, ``min_rank`` [d_sae] float32; ``logit_lens_ids`` [d_sae, top_k] int32 and
``logit_lens_logits`` [d_sae, top_k] float32; metadata: prompts, amplification, top_k, hook point)
and ``latent_top_tokens.json`` (each latent's first ten logit-lens tokens as text).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from saesteer.modeling.lm import resolve_hook_point

from .activations import hook_activations
from .model import SAE
from .stats import read_latent_files

OUTPUT_FILE = "latent_output.safetensors"
TOP_TOKENS_FILE = "latent_top_tokens.json"
DEFAULT_AMPLIFICATION = 10.0
DEFAULT_TOP_K = 20
RAW_PROMPT = "From my experience,"
CHAT_PROMPT = "Tell me something interesting."


def neutral_prompts(tokenizer) -> list[list[int]]:
    """Token ids of the default neutral prompts: Arad et al.'s "From my experience," (raw text) and
    a neutral chat turn rendered with the chat template up to the assistant's first token."""
    raw = tokenizer(RAW_PROMPT, add_special_tokens=False)["input_ids"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], tokenize=True, add_generation_prompt=True)
    if not isinstance(chat, list):  # a BatchEncoding in some transformers versions
        chat = chat["input_ids"]
    return [list(raw), list(chat)]


def final_norm_and_unembedding(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The final norm and the unembedding (``lm_head``) of a causal LM.

    Raises:
        ValueError: the model has neither ``model.norm`` nor ``transformer.ln_f``.
    """
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj, model.get_output_embeddings()
    raise ValueError(f"cannot find the final norm of {type(model).__name__}")


@torch.no_grad()
def logit_lens_logits(model, sae: SAE, latents: torch.Tensor | None = None,
                      batch_size: int = 512) -> Iterator[torch.Tensor]:
    """The logit lens ``W_U norm_f(d_i)`` of decoder directions, ``batch_size`` latents at a time:
    float32 [n_batch, vocab] per batch, in the order of ``latents`` (default all ``d_sae``)."""
    norm, unembed = final_norm_and_unembedding(model)
    p = next(model.parameters())
    idx = torch.arange(sae.cfg.d_sae) if latents is None else torch.as_tensor(latents)
    for s in range(0, len(idx), batch_size):
        d = sae.decoder_directions(idx[s : s + batch_size].to(sae.device)).to(p.device, p.dtype)
        yield unembed(norm(d.unsqueeze(0))).squeeze(0).float()


@torch.no_grad()
def logit_lens(model, sae: SAE, latents: torch.Tensor | None = None, top_k: int = DEFAULT_TOP_K,
               batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit-lens top tokens of decoder directions: ``top_k`` of ``W_U norm_f(d_i)`` per latent.

    Args:
        latents: indices [n] (default all ``d_sae``).

    Returns:
        ``(ids, logits)``: int64 [n, top_k] token ids, largest first, and their float32 logits.
    """
    ids, vals = [], []
    for logits in logit_lens_logits(model, sae, latents, batch_size):
        v, i = logits.topk(top_k, dim=-1)
        ids.append(i.cpu())
        vals.append(v.cpu())
    return torch.cat(ids), torch.cat(vals)


def _score(probs: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(score, top_prob, min_rank) [rows] from next-token ``probs`` [rows, vocab] and each row's
    logit-lens tokens [rows, top_k] (the module docstring's formula)."""
    pt = probs.gather(1, tokens)  # [rows, top_k]
    ranks = (probs.unsqueeze(1) > pt.unsqueeze(2)).sum(-1)  # [rows, top_k]: tokens strictly more likely
    min_rank = ranks.min(-1).values.to(probs.dtype)
    top_prob = pt.max(-1).values
    return (1 - min_rank / probs.shape[-1]) * top_prob, top_prob, min_rank


def _last_position_scale(model, sae: SAE, ids: list[int]) -> float:
    """m: the largest latent activation at the prompt's last position, unsteered."""
    h = hook_activations(model, sae.cfg.hook_point, torch.tensor([ids]))[0, -1]
    return float(sae.encode(h.to(sae.device, sae.dtype)).max())


@torch.no_grad()
def output_score_direct(model, sae: SAE, latent: int, ids: list[int], tokens: torch.Tensor,
                        amplification: float = DEFAULT_AMPLIFICATION) -> tuple[float, float, float]:
    """One latent's (score, top_prob, min_rank) on one prompt by a full forward pass with the
    amplified direction added at the last position (no cache, no batching; in the model's dtype).

    Args:
        ids: the prompt's token ids. tokens: the latent's logit-lens tokens [top_k].
    """
    p = next(model.parameters())
    m = _last_position_scale(model, sae, ids)
    delta = (amplification * m * sae.decoder_directions(torch.tensor([latent], device=sae.device))[0]).to(p.device, p.dtype)

    def add(x):
        x = x.clone()
        x[:, -1] += delta
        return x

    handle = resolve_hook_point(model, sae.cfg.hook_point).attach(add)
    try:
        logits = model(input_ids=torch.tensor([ids], device=p.device), use_cache=False).logits[0, -1]
    finally:
        handle.remove()
    probs = torch.softmax(logits.to(p.dtype), -1).unsqueeze(0)
    s, t, r = _score(probs, tokens.view(1, -1).to(probs.device))
    return float(s), float(t), float(r)


@dataclass
class LatentOutput:
    """Output-side figures of every latent (module docstring).

    Attributes:
        output_score, top_token_prob, min_rank: float32 [d_sae], means over the prompts.
        logit_lens_ids: int64 [d_sae, top_k]; logit_lens_logits: float32 [d_sae, top_k].
        meta: prompts (as text), amplification, top_k, hook point, seconds taken.
    """

    output_score: torch.Tensor
    top_token_prob: torch.Tensor
    min_rank: torch.Tensor
    logit_lens_ids: torch.Tensor
    logit_lens_logits: torch.Tensor
    meta: dict = field(default_factory=dict)


@torch.no_grad()
def output_scores(model, tokenizer, sae: SAE, prompts: Sequence[list[int]] | None = None,
                  amplification: float = DEFAULT_AMPLIFICATION, top_k: int = DEFAULT_TOP_K,
                  batch_size: int = 128, progress: bool = True) -> LatentOutput:
    """Logit lens and output score of every latent, batched (module docstring for definitions).

    For each prompt the prefix x_1..x_{n-1} runs once with a KV cache, repeated to ``batch_size``
    rows; each batch of latents then runs the last token on it (cropped back to the prefix after
    each batch), row r adding
    ``amplification * m * d_{i_r}`` at the hook point.

    Args:
        prompts: token-id lists of at least 2 tokens (default ``neutral_prompts(tokenizer)``).

    Raises:
        ValueError: a prompt shorter than 2 tokens.
    """
    t0 = time.time()
    prompts = [list(p) for p in (prompts or neutral_prompts(tokenizer))]
    if any(len(p) < 2 for p in prompts):
        raise ValueError("every prompt needs at least 2 tokens (a prefix to cache and a last position to amplify)")
    ll_ids, ll_logits = logit_lens(model, sae, top_k=top_k)
    p = next(model.parameters())
    d_sae = sae.cfg.d_sae
    score = torch.zeros(d_sae, dtype=torch.float64)
    top_prob = torch.zeros(d_sae, dtype=torch.float64)
    min_rank = torch.zeros(d_sae, dtype=torch.float64)
    hp = resolve_hook_point(model, sae.cfg.hook_point)
    bar = tqdm(total=d_sae * len(prompts), desc="output scores", unit="latent", disable=not progress)
    for ids in prompts:
        m = _last_position_scale(model, sae, ids)
        cache = model(input_ids=torch.tensor([ids[:-1]], device=p.device), use_cache=True).past_key_values
        cache.batch_repeat_interleave(batch_size)  # once per prompt; cropped back to the prefix after each batch
        box: dict[str, torch.Tensor] = {}
        handle = hp.attach(lambda x: x + box["delta"].unsqueeze(1))  # x: [rows, 1, d_in], the last position
        try:
            for s in range(0, d_sae, batch_size):
                lat = torch.arange(s, min(s + batch_size, d_sae))
                rows = len(lat)
                box["delta"] = (amplification * m * sae.decoder_directions(lat.to(sae.device))).to(p.device, p.dtype)
                rows_cache = cache
                if rows < batch_size:  # the last, smaller batch
                    rows_cache = copy.deepcopy(cache)
                    rows_cache.batch_select_indices(torch.arange(rows, device=p.device))
                logits = model(
                    input_ids=torch.full((rows, 1), ids[-1], device=p.device),
                    position_ids=torch.full((rows, 1), len(ids) - 1, device=p.device),
                    past_key_values=rows_cache, use_cache=True,
                ).logits[:, -1]
                if rows_cache is cache:
                    cache.crop(-1)  # drop the last position again (negative: tokens to remove, in every version)
                probs = torch.softmax(logits.float(), -1)
                sc, tp, mr = _score(probs, ll_ids[lat].to(probs.device))
                score[lat] += sc.double().cpu()
                top_prob[lat] += tp.double().cpu()
                min_rank[lat] += mr.double().cpu()
                bar.update(rows)
        finally:
            handle.remove()
    bar.close()
    n = len(prompts)
    return LatentOutput(
        output_score=(score / n).float(), top_token_prob=(top_prob / n).float(), min_rank=(min_rank / n).float(),
        logit_lens_ids=ll_ids, logit_lens_logits=ll_logits,
        meta={"prompts": [tokenizer.decode(q) for q in prompts], "amplification": amplification, "top_k": top_k,
              "hook_point": sae.cfg.hook_point, "seconds": round(time.time() - t0, 1)},
    )


def save_latent_output(out: LatentOutput, folder: str | os.PathLike, tokenizer, n_tokens_json: int = 10) -> tuple[Path, Path]:
    """Write ``latent_output.safetensors`` and ``latent_top_tokens.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a = folder / OUTPUT_FILE
    save_file(
        {
            "output_score": out.output_score.float().contiguous(),
            "top_token_prob": out.top_token_prob.float().contiguous(),
            "min_rank": out.min_rank.float().contiguous(),
            "logit_lens_ids": out.logit_lens_ids.to(torch.int32).contiguous(),
            "logit_lens_logits": out.logit_lens_logits.float().contiguous(),
        },
        str(a),
        metadata={k: json.dumps(v) for k, v in out.meta.items()},
    )
    b = folder / TOP_TOKENS_FILE
    ids = out.logit_lens_ids[:, :n_tokens_json].tolist()
    b.write_text(json.dumps({str(i): [tokenizer.decode([t]) for t in row] for i, row in enumerate(ids)},
                            ensure_ascii=False, separators=(",", ":")))
    return a, b


def load_latent_output(folder: str | os.PathLike, top_tokens: bool = False) -> tuple[LatentOutput, dict[int, list[str]]] | None:
    """The output figures saved beside an SAE, or None when it has none.

    Args:
        top_tokens: also read ``latent_top_tokens.json`` (else the dict is empty).

    Returns:
        ``(LatentOutput, {latent: [token text, ...]})``.
    """
    got = read_latent_files(folder, OUTPUT_FILE, TOP_TOKENS_FILE, top_tokens)
    if got is None:
        return None
    t, raw_meta, toks = got
    meta = {k: json.loads(v) for k, v in raw_meta.items()}
    out = LatentOutput(t["output_score"], t["top_token_prob"], t["min_rank"], t["logit_lens_ids"].long(),
                       t["logit_lens_logits"], meta)
    return out, toks
