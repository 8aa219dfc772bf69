"""Concept search: which latents, across SAEs, stand for a concept given as sentences and/or words.

Issue 15, part 4. Each latent i of each searched SAE gets two scores:

- **input score** (needs ``positive`` sentences): how much more it fires on sentences carrying the
  concept than on neutral ones. For each text, a latent's activation is its largest over the text's
  positions (position 0 and other attention sinks left out, as in collection); the score is the mean
  over ``positive`` minus the mean over ``negative`` (default: ``NEUTRAL_SENTENCES``), divided by
  the latent's typical activation when the SAE has statistics (so the unit is "typical
  activations" and latents compare across SAEs), raw otherwise. (Kim & Ghadiyaram 2025's contrast;
  Arad et al. 2025 call such latents input features.)
- **output score**: how much the latent's decoder direction promotes the concept's tokens, by the
  logit lens (Arad et al. 2025, Sec. 3.2): the probability mass ``sum_{c in C} softmax(W_U
  norm_f(d_i))[c]`` on the concept tokens C. C is the first token of each word in ``words`` (as
  written, lower-case and capitalised, with and without a leading space); without words, the
  alphabetic tokens of at least 3 letters that occur in the positive sentences but in no negative
  one and are not function words (``FUNCTION_WORDS``), the 8 most frequent.

Ranking: each available score becomes a robust z-score within its SAE, ``(s - median) /
max(1.4826 * MAD, std)`` (``robust_z``), and latents are ranked by the sum over the available scores, best first. The output score
enters as its logarithm: the mass spans orders of magnitude (most latents put about 1e-5 on the
concept tokens, a few over 0.1), so the raw mass has a MAD near zero and z-scores in the millions
(measured on the general SAE), which drowned the input score. Latents that never
fired in the SAE's statistics are skipped (they have no typical activation to suggest a strength
in). Every result carries a ready-to-send intervention: a clamp to ``SUGGESTED_TYPICAL`` times the
latent's typical activation (``unit: "typical"``; the useful range on the default SAE is 2-4,
``docs/steering_eval.md``), or, for an SAE without statistics, to that many times the latent's mean
activation on the positive sentences in raw units.

**Latent mixes.** One latent rarely steers as well as a mean-difference vector on SmolLM2 (0.085
against 0.147 AxBench score on 12 everyday concepts, ``docs/general_sae.md``), so a search with
positive sentences also suggests, per SAE, a mix of latents (``concept_mixes``): with dz [d_sae]
the mean SAE code over the positive sentences' tokens minus that over the negative ones', the
``m`` latents of largest dz (``signs="positive"``, the default: the latents the concept turns up) or
of largest |dz| (``"both"``), each added in proportion to its dz (``latent_mix``), the whole
scaled so that it adds ``strength`` times the mean residual norm at the hook point. With both signs
it is the part of the mean-difference vector those latents carry (cos 0.78-0.88 of it at m = 128
on the default SAE); the positive mix leaves out the contrast sentences' own features, and reached
the vector's concept rate at equal fluency where the both-signs mix fell short (0.369 and 0.320
against 0.370, ``docs/general_sae.md``). Sent as ordinary ``add`` edits on latents.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence, get_args

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from saesteer.sae.activations import hook_activations, sink_mask
from saesteer.sae.lm import resolve_hook_point
from saesteer.sae.model import SAE
from saesteer.sae.output_scores import final_norm_and_unembedding
from saesteer.sae.stats import LatentStats
from saesteer.steering.generate import left_padded, pad_id, render_prompt, right_padded
from saesteer_client.schema import (
    DEFAULT_MIX_LATENTS, DEFAULT_MIX_POSITIONS, DEFAULT_MIX_SIGNS, DEFAULT_MIX_STRENGTH, MIX_SIGNS, PositionKind,
)

SUGGESTED_TYPICAL = 4.0
MAX_DERIVED_TOKENS = 8
FUNCTION_WORDS = frozenset("""
about above across after again against along also among and another any are around because been before behind
being below beneath beside besides between beyond both but can could did does doing down during each either
every few for from had has have having her here hers herself him himself his how into its itself just like many
more most much must near neither never nor not now off once one only onto other our ours out outside over own
per rather same several she should since some such than that the their theirs them themselves then there these
they this those though through throughout till too toward towards under underneath unless until upon very was
were what when where whether which while who whom whose why will with within without would yet you your yours
""".split())
"""Words never taken as concept tokens when they are derived from sentences (prepositions,
pronouns, auxiliaries, conjunctions): they occur in any topic's sentences, and their logit-lens mass
would rank latents that promote "from" or "outside" for any concept."""
NEUTRAL_SENTENCES = (
    "The meeting was moved to Thursday afternoon.",
    "She opened the window and sat down at the desk.",
    "The report lists the figures for the last quarter.",
    "He walked to the station and waited for the train.",
    "Please fill in the form and sign at the bottom.",
    "The building has four floors and a small car park.",
    "They talked for an hour and then went home.",
    "The price includes delivery within five working days.",
)


@dataclass
class ConceptHit:
    """One latent found for a concept.

    Attributes:
        sae, latent: where it is.
        score: the ranking score (sum of robust z-scores).
        input_score: contrast of activations (typical units where the SAE has statistics), or None
            without positive sentences.
        output_score: logit-lens probability mass on the concept tokens.
        top_tokens: the ten tokens its decoder direction promotes most (logit lens).
        value, unit: the suggested clamp strength.
    """

    sae: str
    latent: int
    score: float
    input_score: float | None
    output_score: float
    top_tokens: list[str] = field(default_factory=list)
    value: float = SUGGESTED_TYPICAL
    unit: str = "typical"


def concept_tokens(tokenizer, words: Sequence[str], positive: Sequence[str] = (), negative: Sequence[str] = ()) -> list[int]:
    """The concept tokens C (module docstring): from ``words`` if any, else derived from the sentences.

    Raises:
        ValueError: no words and no sentences, or nothing to derive from them.
    """
    ids: list[int] = []
    if words:
        for w in words:
            w = w.strip()
            for form in {w, w.lower(), w[:1].upper() + w[1:]}:
                for text in (form, " " + form):
                    t = tokenizer(text, add_special_tokens=False)["input_ids"]
                    if t and t[0] not in ids:
                        ids.append(t[0])
        return ids
    neg = {t for s in negative for t in tokenizer(s, add_special_tokens=False)["input_ids"]}
    counts: Counter = Counter()
    for s in positive:
        for t in tokenizer(s, add_special_tokens=False)["input_ids"]:
            word = tokenizer.decode([t]).strip()
            if t not in neg and re.fullmatch(r"[A-Za-z]{3,}", word or "") and word.lower() not in FUNCTION_WORDS:
                counts[t] += 1
    ids = [t for t, _ in counts.most_common(MAX_DERIVED_TOKENS)]
    if not ids:
        raise ValueError("no concept tokens: give words, or positive sentences with words the negative ones lack")
    return ids


@torch.no_grad()
def text_rows(model, tokenizer, hook_points: Sequence[str], texts: Sequence[str]) -> dict[str, list[torch.Tensor]]:
    """{hook point: one float32 [n_i, d_in] tensor per text}: the activations at the text's
    non-sink token positions (n_i may be 0); one forward pass per text for all hook points."""
    out: dict[str, list[torch.Tensor]] = {hp: [] for hp in hook_points}
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        acts = hook_activations(model, sorted(out), ids)
        for hp, a in acts.items():
            out[hp].append(a[0][sink_mask(a)[0]].float().cpu())
    return out


@torch.no_grad()
def max_activations(model, tokenizer, saes: Mapping[str, SAE], texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """{sae id: [len(texts), d_sae] float32}: each latent's largest activation over each text's
    positions, sinks left out (0 for a text with no other position); one forward pass per text for
    all hook points."""
    rows = text_rows(model, tokenizer, {s.cfg.hook_point for s in saes.values()}, texts)
    return {sid: torch.stack([sae.encode(r.to(sae.device, sae.dtype)).max(0).values.float().cpu() if len(r)
                              else torch.zeros(sae.cfg.d_sae) for r in rows[sae.cfg.hook_point]])
            for sid, sae in saes.items()}


def hook_rows(model, tokenizer, hook_point: str, texts: Sequence[str]) -> torch.Tensor:
    """[N, d_in] float32: the activations at ``hook_point`` at the texts' non-sink token positions,
    all texts' rows together (``text_rows``, one forward pass per text)."""
    return torch.cat(text_rows(model, tokenizer, [hook_point], texts)[hook_point])


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


@torch.no_grad()
def concept_output_scores(model, sae: SAE, tokens: Sequence[int], batch_size: int = 512) -> torch.Tensor:
    """[d_sae] float32: logit-lens probability mass of ``tokens`` for every latent's decoder direction."""
    norm, unembed = final_norm_and_unembedding(model)
    p = next(model.parameters())
    tok = torch.tensor(list(tokens), device=p.device)
    out = []
    for s in range(0, sae.cfg.d_sae, batch_size):
        lat = torch.arange(s, min(s + batch_size, sae.cfg.d_sae), device=sae.device)
        d = sae.decoder_directions(lat).to(p.device, p.dtype)
        probs = torch.softmax(unembed(norm(d.unsqueeze(0))).squeeze(0).float(), -1)
        out.append(probs[:, tok].sum(-1).cpu())
    return torch.cat(out)


def _typical(st: LatentStats | None) -> torch.Tensor | None:
    """The latents' typical activations [d_sae] float32 from statistics ``st``; None without."""
    return st.typical_activation.float() if st is not None else None


def _in_typical_units(diff: torch.Tensor, typical: torch.Tensor | None) -> torch.Tensor:
    """An activation contrast [d_sae] in typical activations (raw without statistics), so that
    latents compare across SAEs."""
    return diff / typical.clamp(min=1e-6) if typical is not None else diff


def _skip_never_fired(score: torch.Tensor, typical: torch.Tensor | None) -> torch.Tensor:
    """``score`` with -inf for the latents that never fired in the statistics (no typical
    activation to suggest a strength in); unchanged without statistics."""
    return score if typical is None else torch.where(typical > 0, score, torch.full_like(score, float("-inf")))


def robust_z(x: torch.Tensor) -> torch.Tensor:
    """``(x - median) / max(1.4826 * MAD, std)`` over the finite entries (MAD: median absolute
    deviation; 1 where both are 0).

    The standard deviation floors the scale: most latents score about 0 for any one concept, so the
    MAD alone can be near zero and blow one score's z-values up by orders of magnitude over the
    other's (measured on the general SAE: input z-scores near 100, output ones in the millions)."""
    x = x.double()
    fin = x[torch.isfinite(x)]
    med = fin.median()
    scale = max(float((fin - med).abs().median()) * 1.4826, float(fin.std()) if fin.numel() > 1 else 0.0)
    return ((x - med) / (scale if scale > 0 else 1.0)).float()


@torch.no_grad()
def input_scores(
    model, tokenizer, saes: Mapping[str, SAE], stats: Mapping[str, LatentStats | None],
    positive: Sequence[str], negative: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """{sae id: [d_sae] float32}: each latent's input score (module docstring), in typical
    activations where the SAE has statistics (raw otherwise), -inf for latents that never fired.

    Args:
        positive, negative: sentences with and without the concept (negative defaults to
            ``NEUTRAL_SENTENCES``).

    Raises:
        ValueError: no positive sentence.
    """
    if not positive:
        raise ValueError("input scores need at least one positive sentence")
    negative = list(negative) or list(NEUTRAL_SENTENCES)
    pos = max_activations(model, tokenizer, saes, positive)
    neg = max_activations(model, tokenizer, saes, negative)
    out = {}
    for sid in saes:
        typical = _typical(stats.get(sid))
        out[sid] = _skip_never_fired(_in_typical_units(pos[sid].mean(0) - neg[sid].mean(0), typical), typical)
    return out


@torch.no_grad()
def search_concepts(
    model,
    tokenizer,
    saes: Mapping[str, SAE],
    stats: Mapping[str, LatentStats | None],
    positive: Sequence[str] = (),
    negative: Sequence[str] = (),
    words: Sequence[str] = (),
    top_k: int = 10,
    suggested: float = SUGGESTED_TYPICAL,
) -> list[ConceptHit]:
    """Rank the latents of ``saes`` for a concept (module docstring), best first.

    Args:
        saes: {id: SAE} to search (all on the model's hook points).
        stats: {id: the SAE's saved statistics or None}.
        positive, negative: sentences with and without the concept (negative defaults to
            ``NEUTRAL_SENTENCES``); words: words naming it.
        top_k: hits returned.
        suggested: clamp strength suggested, in typical activations.

    Raises:
        ValueError: neither positive sentences nor words; no usable concept tokens.
    """
    if not positive and not words:
        raise ValueError("give at least one positive sentence or one word")
    negative = list(negative) or list(NEUTRAL_SENTENCES)
    tokens = concept_tokens(tokenizer, words, positive, negative)
    pos_acts = max_activations(model, tokenizer, saes, positive) if positive else {}
    neg_acts = max_activations(model, tokenizer, saes, negative) if positive else {}
    norm, unembed = final_norm_and_unembedding(model)
    p = next(model.parameters())
    hits: list[ConceptHit] = []
    for sid, sae in saes.items():
        out_score = concept_output_scores(model, sae, tokens)
        score = robust_z(out_score.clamp(min=1e-12).log())
        typical = _typical(stats.get(sid))
        in_score = None
        if positive:
            in_score = _in_typical_units(pos_acts[sid].mean(0) - neg_acts[sid].mean(0), typical)
            score = score + robust_z(in_score)
        score = _skip_never_fired(score, typical)
        best = score.topk(min(top_k, sae.cfg.d_sae)).indices
        for i in best.tolist():
            if score[i] == float("-inf"):
                continue
            if typical is not None:
                value, unit = suggested, "typical"
            else:
                mean_pos = float(pos_acts[sid][:, i].mean()) if positive else 0.0
                value, unit = suggested * (mean_pos if mean_pos > 0 else 1.0), "raw"
            hits.append(ConceptHit(sid, i, float(score[i]), None if in_score is None else float(in_score[i]),
                                   float(out_score[i]), value=value, unit=unit))
    hits.sort(key=lambda h: -h.score)
    hits = hits[:top_k]
    for h in hits:  # the logit lens of the returned latents only
        d = saes[h.sae].decoder_directions(torch.tensor([h.latent], device=saes[h.sae].device)).to(p.device, p.dtype)
        top = unembed(norm(d)).float()[0].topk(10).indices.tolist()
        h.top_tokens = [tokenizer.decode([t]) for t in top]
    return hits


@torch.no_grad()
def search_prompt_concepts(
    pipe,
    saes: Mapping[str, SAE],
    stats: Mapping[str, LatentStats | None],
    positive: Sequence[str],
    negative: Sequence[str],
    top_k: int = 10,
    factor: float = -1.0,
) -> list[ConceptHit]:
    """Rank the latents of text-encoder SAEs (a diffusion pipeline's, ``saesteer.sae.diffusion``)
    for a concept given as contrasting prompts, best first.

    A text encoder has no unembedding, so there is no output score; the score is the input contrast
    of Concept Steerers (Kim & Ghadiyaram, 2025, Sec. 3.2): each latent's activation averaged over a
    prompt's positions (all but the start token; the padding positions carry the caption's summary
    to the UNet, so a concept must be found there too), mean over ``positive`` minus mean over
    ``negative``, in typical activations where the SAE has statistics. Ranked by the robust z-score
    of that contrast within each SAE. The suggested intervention scales the latent by ``factor``
    (``value``; unit ``"factor"``): -1 flips the concept's part of each embedding, Concept Steerers'
    removal (their strength s is a factor of 1 + s).

    Raises:
        ValueError: no positive or no negative prompts (a text encoder has no neutral default).
    """
    from saesteer.sae.diffusion import prompt_activations

    if not positive or not negative:
        raise ValueError("give positive and negative prompts: the concept is their contrast")
    hits: list[ConceptHit] = []
    by_hook: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for sid, sae in saes.items():
        hp = sae.cfg.hook_point
        if hp not in by_hook:
            by_hook[hp] = (prompt_activations(pipe, list(positive), hp), prompt_activations(pipe, list(negative), hp))
        pos, neg = by_hook[hp]

        def mean_z(a: torch.Tensor) -> torch.Tensor:  # [P, L-1, d] -> [d_sae]: mean over positions, then prompts
            return sae.encode(a.reshape(-1, a.shape[-1]).to(sae.device, sae.dtype)).float().cpu().view(*a.shape[:2], -1).mean((0, 1))

        typical = _typical(stats.get(sid))
        in_score = _in_typical_units(mean_z(pos) - mean_z(neg), typical)
        score = _skip_never_fired(robust_z(in_score), typical)
        for i in score.topk(min(top_k, sae.cfg.d_sae)).indices.tolist():
            if score[i] != float("-inf"):
                hits.append(ConceptHit(sid, i, float(score[i]), float(in_score[i]), 0.0, value=factor, unit="factor"))
    hits.sort(key=lambda h: -h.score)
    return hits[:top_k]
