"""Latent mixes: a concept as several latents added together, and their fit to the model's output.

One latent rarely steers as well as a mean-difference vector on SmolLM2 (0.085 against 0.147
AxBench score on 12 everyday concepts, ``docs/general_sae.md``), so a concept search with positive
sentences also suggests, per SAE, a mix of latents (``concept_mixes``): with dz [d_sae] the mean
SAE code over the positive sentences' tokens minus that over the negative ones', the ``m`` latents
of largest dz (``signs="positive"``, the default: the latents the concept turns up) or of largest
|dz| (``"both"``), each added in proportion to its dz (``latent_mix``), the whole scaled so that it
adds ``strength`` times the mean residual norm at the hook point. With both signs it is the part of
the mean-difference vector those latents carry (cos 0.78-0.88 of it at m = 128 on the default
SAE); the positive mix leaves out the contrast sentences' own features, and reached the vector's
concept rate at equal fluency where the both-signs mix fell short (0.369 and 0.320 against 0.370,
``docs/general_sae.md``). Sent as ordinary ``add`` edits on latents. ``fit_mix`` reweights a mix
by its effect on the model's output; ``search_cost`` counts what a search with mixes costs, and
``SearchDeadline`` stops one past its deadline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence, get_args

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from saesteer.modeling.lm import resolve_hook_point
from saesteer.sae.model import SAE
from saesteer.sae.stats import LatentStats
from saesteer.steering.concept_scores import NEUTRAL_SENTENCES, hook_rows
from saesteer.steering.generate import left_padded, pad_id, render_prompt, right_padded
from saesteer_client.schema import (
    DEFAULT_MIX_LATENTS, DEFAULT_MIX_POSITIONS, DEFAULT_MIX_SIGNS, DEFAULT_MIX_STRENGTH, MIX_SIGNS, PositionKind,
)


@torch.no_grad()
def latent_mix(sae: SAE, positive: torch.Tensor, negative: torch.Tensor, m: int = DEFAULT_MIX_LATENTS,
               signs: str = DEFAULT_MIX_SIGNS, frequency: torch.Tensor | None = None,
               max_frequency: float | None = None) -> tuple[torch.Tensor, dict[int, float]]:
    """A mix of latents for a concept (module docstring): with dz [d_sae] the mean SAE code of the
    ``positive`` rows minus that of the ``negative`` rows, the ``m`` latents of largest dz
    (``signs="positive"``: latents the concept turns up, at most as many as have dz > 0) or of
    largest |dz| (``signs="both"``: those it turns down too), and ``u = sum_i dz_i W_dec[i]`` over
    them (decoder rows in the input's units).

    Args:
        positive, negative: [N, d_in] activations at the SAE's hook point (``hook_rows`` of the
            concept sentences and of the contrast set).
        m: latents in the mix (at most d_sae).
        signs: ``"positive"`` or ``"both"`` (``MIX_SIGNS``). With ``"both"`` the mix is the SAE's
            code of the mean-difference vector, which also subtracts the contrast sentences'
            own features; ``"positive"`` adds the concept's features only (on the default SAE it
            steered more answers at equal fluency, ``docs/general_sae.md``).
        frequency, max_frequency: the latents' firing frequencies [d_sae] (fraction of tokens,
            ``LatentStats.frequency``) and the largest one a latent of the mix may have; denser
            latents are left out before the ``m`` are chosen (None: none left out). Dense latents
            fire on most concrete sentences whatever their topic, so the contrast with a neutral
            set turns them up for every concept (FGAA, Soo et al. 2025, filter them the same way).

    Returns:
        (``u / |u|``, float32 [d_in]; {latent: dz_i / |u|}, largest first): the weights sum the
        latents' decoder directions to that unit direction, so ``s * R * weight`` as ``add`` values
        add a vector of norm ``s * R``.

    Raises:
        ValueError: m < 1; ``signs`` not in ``MIX_SIGNS``; ``"positive"`` and no latent has dz > 0;
            ``max_frequency`` without ``frequency``.
    """
    if m < 1:
        raise ValueError(f"a latent mix needs at least one latent, not {m}")
    if signs not in MIX_SIGNS:
        raise ValueError(f"signs must be one of {MIX_SIGNS}, not {signs!r}")

    def mean_z(rows: torch.Tensor) -> torch.Tensor:
        return sae.encode(rows.to(sae.device, sae.dtype)).double().cpu().mean(0)

    dz = mean_z(positive) - mean_z(negative)
    if max_frequency is not None:
        if frequency is None:
            raise ValueError("max_frequency needs the latents' frequencies (the SAE's statistics)")
        dz = torch.where(frequency.double().cpu() > max_frequency, torch.zeros_like(dz), dz)
    if signs == "both":
        idx = dz.abs().topk(min(m, dz.numel())).indices
    else:
        top = dz.topk(min(m, dz.numel()))
        idx = top.indices[top.values > 0]
        if not len(idx):
            raise ValueError("no latent is more active on the positive sentences than on the negative ones")
    u = dz[idx] @ sae.decoder_directions(idx.to(sae.device)).double().cpu()
    n = float(u.norm()) or 1.0
    return (u / n).float(), {int(i): float(dz[i]) / n for i in idx}


FIT_PROMPTS = (
    "Tell me something interesting.",
    "What are you thinking about right now?",
    "Write two sentences about anything you like.",
)
"""The chat prompts ``fit_mix`` steers (none of them among ``eval-steering``'s held-out prompts)."""
FIT_LR = 0.2
"""Adam's learning rate on the log-weights in ``fit_mix``."""
FIT_MAX_SENTENCES = 12
"""``fit_mix`` answers with at most this many positive sentences (evenly spaced among those given),
so that its cost is bounded: 3 prompts x 12 sentences is one batch of 36 short sequences."""


@dataclass
class MixFit:
    """What ``fit_mix`` returns.

    Attributes:
        direction: the fitted mix's unit direction, float32 [d_in].
        weights: {latent: weight}, the same latents as given, largest |weight| first; the weights
            sum the decoder directions to ``direction``.
        nll_start, nll_end: the objective (mean negative log-likelihood per token of the positive
            sentences as answers, nats) with the mix as given and as fitted.
    """

    direction: torch.Tensor
    weights: dict[int, float]
    nll_start: float
    nll_end: float


class SearchDeadline(TimeoutError):
    """A concept search ran past its ``deadline`` (``time.monotonic()`` seconds); its work stops."""


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise SearchDeadline("the concept search ran past its deadline")


def search_cost(tokenizer, positive: Sequence[str], negative: Sequence[str], n_saes: int, n_hook_points: int,
                mixes: bool, fit_steps: int, prompts: Sequence[str] = FIT_PROMPTS) -> int:
    """What a concept search costs, in token forward passes (a backward pass counted as two
    forwards): the ranking's one forward per sentence, and with ``mixes`` one more per sentence and
    hook point plus, per SAE, ``fit_mix``'s ``fit_steps + 1`` forwards and ``fit_steps`` backwards
    over its answer batch. Counted with the tokenizer, without running the model, so that a server
    can refuse a search before starting it (``max_search_tokens``).

    Args:
        positive, negative: the request's sentences (an empty ``negative`` counts
            ``NEUTRAL_SENTENCES``); n_saes, n_hook_points: the SAEs searched and their hook points.
        mixes: whether mixes are suggested (positive sentences and ``mix_latents`` > 0).
        fit_steps: ``mix_fit_steps``.
    """
    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    negative = list(negative) or list(NEUTRAL_SENTENCES)
    sentences = sum(n_tokens(t) for t in [*positive, *negative]) if positive else 0
    cost = sentences
    if mixes and positive:
        cost += sentences * n_hook_points
        if fit_steps:
            used = positive if len(positive) <= FIT_MAX_SENTENCES else [
                positive[round(i * (len(positive) - 1) / (FIT_MAX_SENTENCES - 1))] for i in range(FIT_MAX_SENTENCES)]
            answer = sum(len(render_prompt(tokenizer, None, [{"role": "user", "content": p}])) for p in prompts) \
                + len(prompts) * sum(n_tokens(t) for t in used)  # the prompts once, then their answers
            cost += n_saes * (3 * fit_steps + 1) * answer
    return cost


def fit_mix(model, tokenizer, sae: SAE, positive: Sequence[str], weights: Mapping[int, float], resid_norm: float,
            strength: float = DEFAULT_MIX_STRENGTH, steps: int = 10, lr: float = FIT_LR,
            prompts: Sequence[str] = FIT_PROMPTS, positions: str = DEFAULT_MIX_POSITIONS,
            deadline: float | None = None) -> MixFit:
    """Reweight a latent mix by its effect on the model's output: the weights that make the
    positive sentences most likely as the model's answers to neutral chat prompts when the mix is
    added on the prompts' tokens.

    The latents stay those of ``weights`` (a ``latent_mix``), and every weight keeps its sign: with
    theta [m] (zeros at the start), w = w0 * exp(theta), u = sum_i w_i W_dec[i], and the edit adds
    ``strength * resid_norm * u / |u|`` to the hook point's activation at ``positions`` as a request's
    do (``"prompt"``: every prompt token but the first, the attention sink; ``"all"``: the answer's
    tokens too; ``"generated"``: the answer's only), teacher-forced. The objective is the
    mean negative log-likelihood per token of each positive sentence as the assistant's answer to
    each of ``prompts`` (rendered with the chat template); ``steps`` Adam steps on theta, full
    batch. Only the direction changes: the norm is fixed, so the strength keeps its meaning.

    This is Arad et al. 2025's output side (select latents by what they do to the output, not by
    what activates them) measured over the whole remaining forward pass instead of the logit lens,
    and the objective of trained steering vectors (BiPO, Cao et al. 2024; ReFT, Wu et al. 2024)
    restricted to the SAE's concept latents. On SmolLM2-135M the fitted mix brought concepts into
    more answers at equal perplexity than the mean-difference vector (10 of 12 everyday concepts),
    though its answers repeat themselves more (``docs/general_sae.md``).

    Args:
        positive: the concept's sentences (at most ``FIT_MAX_SENTENCES`` are used, evenly spaced).
        weights: {latent: weight} to start from (``latent_mix``'s).
        resid_norm: the mean residual norm at the hook point (model units).
        strength: the norm of the edit while fitting, in residual norms.
        steps: Adam steps (0: the mix as given, with its objective measured).
        prompts: the chat prompts answered; positions: where the edit applies (``PositionKind``).
        deadline: ``time.monotonic()`` seconds past which the fit stops (checked before each step).

    Returns:
        ``MixFit``. Cost: (steps + 1) forward and steps backward passes over the ``len(prompts)``
        prompts and the ``len(prompts) * min(len(positive), FIT_MAX_SENTENCES)`` answers that follow
        them (``search_cost`` counts it).

    Raises:
        ValueError: no positive sentence, no latent, steps < 0, or unknown positions.
        SearchDeadline: past ``deadline``.
    """
    if not positive or not weights:
        raise ValueError("fitting a mix needs at least one positive sentence and one latent")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, not {steps}")
    if positions not in get_args(PositionKind):
        raise ValueError(f"positions must be one of {get_args(PositionKind)}, not {positions!r}")
    if len(positive) > FIT_MAX_SENTENCES:
        positive = [positive[round(i * (len(positive) - 1) / (FIT_MAX_SENTENCES - 1))] for i in range(FIT_MAX_SENTENCES)]
    param = next(model.parameters())
    idx = torch.tensor(list(weights), device=sae.device)
    dirs = sae.decoder_directions(idx).detach().float().to(param.device)  # [m, d_in]
    w0 = torch.tensor(list(weights.values()), dtype=torch.float32, device=param.device)
    # every answer to one prompt shares that prompt's tokens: each step runs the prompts once
    # (left-padded, with the edit where ``positions`` puts it), copies their keys and values to the
    # answers that follow them, and runs the answers on that cache (right-padded). The same NLL as
    # running every prompt + answer sequence whole, on a third to a quarter of the tokens.
    dev = param.device
    pad = pad_id(tokenizer)
    prefixes = [render_prompt(tokenizer, None, [{"role": "user", "content": p}]) for p in prompts]
    answers = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in positive]
    p_ids, p_attn, p_pos, p_lens = left_padded(prefixes, pad)  # [P, Lp]
    a_ids, a_attn = right_padded(answers, pad)  # [n, C]
    of = torch.arange(len(prefixes)).repeat_interleave(len(answers))  # [N]: each sequence's prompt
    a_ids, a_attn = a_ids.repeat(len(prefixes), 1), a_attn.repeat(len(prefixes), 1)  # [N, C]
    a_pos = p_lens[of].unsqueeze(1) + torch.arange(a_ids.shape[1])  # [N, C]
    full_attn = torch.cat([p_attn[of], a_attn], dim=1)  # [N, Lp + C]
    p_where = (p_pos >= 1).float().unsqueeze(-1) if positions in ("prompt", "all") else torch.zeros((*p_ids.shape, 1))
    a_where = a_attn.float().unsqueeze(-1) if positions in ("all", "generated") else torch.zeros((*a_ids.shape, 1))
    labels = torch.where(a_attn.bool(), a_ids, torch.full_like(a_ids, -100))  # [N, C]: the answers' tokens
    n_tokens = int(a_attn.sum())
    p_ids, p_attn, p_pos, a_ids, a_pos, full_attn, p_where, a_where, labels, of = (
        t.to(dev) for t in (p_ids, p_attn, p_pos.clamp(min=0), a_ids, a_pos, full_attn, p_where, a_where, labels, of))
    theta = torch.zeros(len(w0), device=dev, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    edit: dict[str, torch.Tensor] = {}
    handle = resolve_hook_point(model, sae.cfg.hook_point).attach(
        lambda x: x + edit["where"].to(x.dtype) * edit["v"].to(x.dtype))
    nll = []
    try:
        with torch.enable_grad():
            for step in range(steps + 1):
                _check_deadline(deadline)
                u = (w0 * theta.exp()) @ dirs
                edit["v"] = strength * resid_norm * u / u.norm()
                edit["where"] = p_where
                out = model(input_ids=p_ids, attention_mask=p_attn, position_ids=p_pos, use_cache=True)
                cache = DynamicCache(config=model.config)
                for i, layer in enumerate(out.past_key_values.layers):
                    cache.update(layer.keys.index_select(0, of), layer.values.index_select(0, of), i)
                edit["where"] = a_where
                logits = model(input_ids=a_ids, attention_mask=full_attn, position_ids=a_pos, past_key_values=cache,
                               use_cache=True).logits.float()  # [N, C, V]
                # each answer's first token is predicted at its prompt's last position
                first = F.cross_entropy(out.logits[:, -1].float()[of], labels[:, 0], reduction="sum")
                rest = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                       ignore_index=-100, reduction="sum")
                loss = (first + rest) / n_tokens
                nll.append(float(loss.detach()))
                if step < steps:
                    (grad,) = torch.autograd.grad(loss, [theta])  # no gradient reaches the model's weights
                    theta.grad = grad
                    opt.step()
    finally:
        handle.remove()
    w = (w0 * theta.detach().exp()).double().cpu()
    u = w @ dirs.double().cpu()
    n = float(u.norm()) or 1.0
    order = w.abs().argsort(descending=True, stable=True).tolist()
    lat = idx.tolist()
    return MixFit((u / n).float(), {int(lat[j]): float(w[j]) / n for j in order}, nll[0], nll[-1])


@dataclass
class ConceptMix:
    """A mix of latents suggested for a concept (``concept_mixes``).

    Attributes:
        sae: the SAE's id.
        latents, values: the latents and their ``add`` amounts (raw latent units), largest first:
            together they add a vector of norm ``strength`` times the mean residual norm.
        strength: in multiples of the mean residual norm at the hook point.
        mean_diff_cos: cosine of the added vector with the mean-difference vector of the same
            sentences (how much of that vector the mix holds).
        fit: the ``fit_mix`` run that set the values (None when not fitted).
    """

    sae: str
    latents: list[int]
    values: list[float]
    strength: float
    mean_diff_cos: float
    fit: MixFit | None = None


@torch.no_grad()
def concept_mixes(
    model, tokenizer, saes: Mapping[str, SAE], stats: Mapping[str, LatentStats | None],
    positive: Sequence[str], negative: Sequence[str] = (),
    m: int = DEFAULT_MIX_LATENTS, strength: float = DEFAULT_MIX_STRENGTH, signs: str = DEFAULT_MIX_SIGNS,
    fit_steps: int = 0, positions: str = DEFAULT_MIX_POSITIONS, deadline: float | None = None,
) -> list[ConceptMix]:
    """One ``ConceptMix`` per SAE of ``saes`` (module docstring), in their order. The residual norm
    R is the SAE's ``resid_norm_mean`` from its statistics, or, without statistics, the mean norm of
    the sentences' own rows.

    Args:
        positive, negative: sentences with and without the concept (negative defaults to
            ``NEUTRAL_SENTENCES``).
        m: latents per mix; strength: the mix's norm in residual norms (the measured best on the
            default SAE is 0.5 on the prompt's tokens, ``docs/general_sae.md``); signs: which
            latents (``latent_mix``); fit_steps: ``fit_mix`` steps that reweight each mix at
            ``strength`` and ``positions`` (0: the contrast weights as they are).
        deadline: ``time.monotonic()`` seconds past which the work stops (checked between passes).

    Raises:
        ValueError: no positive sentence; m < 1; an unknown ``signs``; ``"positive"`` and no latent
            more active on the positive sentences; fit_steps < 0.
        SearchDeadline: past ``deadline``.
    """
    if not positive:
        raise ValueError("a latent mix needs at least one positive sentence")
    negative = list(negative) or list(NEUTRAL_SENTENCES)
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    out = []
    for sid, sae in saes.items():
        _check_deadline(deadline)
        hp = sae.cfg.hook_point
        if hp not in rows:
            rows[hp] = (hook_rows(model, tokenizer, hp, positive), hook_rows(model, tokenizer, hp, negative))
        pos, neg = rows[hp]
        direction, weights = latent_mix(sae, pos, neg, m, signs)
        st = stats.get(sid)
        r = float(st.resid_norm_mean) if st is not None else float(torch.cat([pos, neg]).norm(dim=-1).mean())
        fit = None
        if fit_steps:
            fit = fit_mix(model, tokenizer, sae, positive, weights, r, strength, fit_steps, positions=positions,
                          deadline=deadline)
            direction, weights = fit.direction, fit.weights
        md = (pos.mean(0) - neg.mean(0)).double()
        cos = float(direction.double() @ md / (md.norm() or 1.0))
        out.append(ConceptMix(sid, list(weights), [w * strength * r for w in weights.values()], strength, cos, fit))
    return out
