"""Batched, steered text generation with a KV cache.

One forward over the left-padded prompts (prefill), then one token per row per step. Each row has
its own interventions (``Steerer``), sampling settings and seed, so a batch gives every request
what it would get alone (greedy: the same tokens, tested). Prompt positions are steered once at
prefill and each generated position at its decode step.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import torch

from saesteer.sae.activations import forward_until

from .hooks import Steerer, StepPositions
from .plan import InterventionPlan
from .policy import SafetyReport, apply_hits


@dataclass
class GenerationSpec:
    """One row: prompt token ids, sampling settings, and its intervention plan.

    The penalties (``penalized``) change the logits before greedy choice or sampling:
    ``repetition_penalty`` as transformers' ``RepetitionPenaltyLogitsProcessor`` (CTRL, Keskar et
    al. 2019: every token of the prompt or the completion so far has a positive logit divided by it
    and a negative one multiplied; 1 is off), ``frequency_penalty`` and ``presence_penalty`` as
    OpenAI's API (subtracted once per earlier occurrence in the completion, and once if it occurs
    at all; 0 is off)."""

    input_ids: list[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    plan: InterventionPlan = field(default_factory=InterventionPlan)
    deadline: float | None = None  # time.monotonic() past which the row ends with error TIMEOUT
    ignore_eos: bool = False  # run to max_new_tokens even past EOS (benchmarks)


@dataclass
class GenerationResult:
    """One row's output. ``finish_reason``: "stop" (EOS or a stop string), "length",
    "content_filter" (a ``refuse`` safety policy hit: the completion stops before the token that
    fired), or "error" (the row ended early; ``error`` says why, e.g. ``NON_FINITE``).
    ``safety``: the policies that fired on the row (the wire's ``PolicyHit`` as dicts)."""

    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    error: str | None = None
    safety: list[dict] = field(default_factory=list)


NON_FINITE = "non_finite"
"""``GenerationResult.error`` of a row whose logits became inf or NaN (its steering overflowed)."""
TIMEOUT = "timeout"
"""``GenerationResult.error`` of a row still generating at its ``GenerationSpec.deadline``."""


def render_prompt(tokenizer, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
    """Token ids of a raw prompt (no special tokens added) or of chat messages rendered with the
    tokenizer's chat template and the assistant turn opened."""
    if messages is not None:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def pad_id(tokenizer) -> int:
    """The id that fills left padding: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_padded(prompts: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts left-padded into one batch (CPU tensors).

    Returns:
        ``(ids, attn, abs_pos, lens)``: ids [B, T] int64 (``pad`` on the left), attn [B, T] int64
        (0 on padding), abs_pos [B, T] int64 (each token's index in its own prompt, negative on
        padding), lens [B] int64 (prompt lengths); T the longest prompt.
    """
    lens = torch.tensor([len(p) for p in prompts])
    B, T = len(prompts), int(lens.max())
    ids = torch.full((B, T), pad, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        attn[b, T - len(p):] = 1
    abs_pos = torch.arange(T).unsqueeze(0) - (T - lens).unsqueeze(1)
    return ids, attn, abs_pos, lens


def right_padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole sequences (prompt and completion together, teacher-forced) right-padded into one batch
    (CPU tensors): every row's positions start at 0, so no position ids are needed.

    Returns:
        ``(ids, attn)``: ids [B, T] int64 (``pad`` on the right), attn [B, T] int64 (0 on padding);
        T the longest sequence.
    """
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        attn[b, : len(s)] = 1
    return ids, attn


def row_generator(spec: GenerationSpec) -> torch.Generator | None:
    """The row's own sampling generator, seeded with ``spec.seed`` (None without a seed)."""
    return torch.Generator().manual_seed(spec.seed) if spec.seed is not None else None


def stop_cut(text: str, stops: Sequence[str]) -> str | None:
    """``text`` cut before the first of ``stops`` it contains, or None if it contains none."""
    hit = [text.find(x) for x in stops if x in text]
    return text[: min(hit)] if hit else None


def penalized(logits: torch.Tensor, spec: GenerationSpec, generated: Sequence[int]) -> torch.Tensor:
    """One row's logits [vocab] (any float dtype, any device) with ``spec``'s repetition, frequency
    and presence penalties applied (``GenerationSpec``), given the tokens it has generated so far;
    the logits themselves when every penalty is off. The result is float32 when a penalty applies."""
    rep, freq, pres = spec.repetition_penalty, spec.frequency_penalty, spec.presence_penalty
    if rep == 1.0 and not ((freq or pres) and generated):
        return logits
    out = logits.float().unsqueeze(0)
    if rep != 1.0:
        from transformers import RepetitionPenaltyLogitsProcessor

        seen = torch.tensor([list(spec.input_ids) + list(generated)], dtype=torch.long, device=logits.device)
        out = RepetitionPenaltyLogitsProcessor(float(rep))(seen, out)
    if (freq or pres) and generated:
        counts = torch.bincount(torch.tensor(list(generated), device=logits.device), minlength=out.shape[-1])[: out.shape[-1]]
        out = out - freq * counts - pres * (counts > 0).float()
    return out[0]


def _sample(logits: torch.Tensor, spec: GenerationSpec, gen: torch.Generator | None, generated: Sequence[int] = ()) -> int | None:
    """The next token of one row from its finite logits [vocab], after its penalties (``penalized``,
    given the row's ``generated`` tokens so far); None if sampling probabilities come out non-finite."""
    logits = penalized(logits, spec, generated)
    if spec.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / spec.temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        return None
    if spec.top_p < 1.0:
        p_sorted, idx = probs.sort(descending=True)
        keep = p_sorted.cumsum(0) - p_sorted < spec.top_p
        keep[0] = True  # the most likely token always stays, whatever the rounding of a tiny top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p_sorted[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


@torch.inference_mode()
def generate(model, tokenizer, specs: Sequence[GenerationSpec], steerer: Steerer | None = None) -> list[GenerationResult]:
    """Generate for a batch of rows, each steered by its own plan.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer (``eos_token_id`` ends a row; ``pad_token_id`` pads).
        specs: one per row.
        steerer: applies the rows' plans; None (or all plans empty) generates unsteered.

    Returns:
        One ``GenerationResult`` per row, in order. A row whose logits become non-finite (an
        overflowing steer) ends at once with ``finish_reason="error"``, ``error=NON_FINITE``;
        the other rows go on unchanged (the hooks keep each row's numbers in its row). A row
        still unfinished at its ``deadline`` (checked before each decode step) ends with
        ``error=TIMEOUT``.

    Runs under ``torch.inference_mode`` (no autograd bookkeeping on any of its ~1,000 small
    operations per decode step; the KV cache is ``sae.kv_cache.spare_cache``).
    """
    dev = next(model.parameters()).device
    B = len(specs)
    pad = pad_id(tokenizer)
    ids, attn, abs_pos, lens = left_padded([s.input_ids for s in specs], pad)
    positions = StepPositions(abs_pos=abs_pos.to(dev), prompt_len=lens.to(dev))
    gens = [row_generator(s) for s in specs]
    eos = tokenizer.eos_token_id
    out_tokens: list[list[int]] = [[] for _ in specs]
    finish: list[str | None] = [None] * B
    errors: list[str | None] = [None] * B
    stop_texts: list[str | None] = [None] * B  # text cut at a stop string
    plans = [s.plan for s in specs]
    steering = steerer is not None and any(plans)
    reports = [SafetyReport() for _ in specs]
    # a row whose generated tokens a policy watches is checked one forward after its last token
    # (a token's activation exists once it is fed back): ``checking`` rows have finished but wait
    watch_gen = [s.plan.watches_generated for s in specs]
    checking = [False] * B
    lens_l = lens.tolist()

    from saesteer.sae.kv_cache import spare_cache

    cache = spare_cache(model.config)  # decode steps append in place, not by copying the cache
    cur_ids, cur_attn = ids.to(dev), attn.to(dev)
    pos_ids = abs_pos.clamp(min=0).to(dev)
    ctx = steerer.steer(plans, positions) if steering else nullcontext()
    with ctx as watches:
        step_in = cur_ids
        for step in range(max(s.max_new_tokens for s in specs) + 1):
            inputs = dict(input_ids=step_in, attention_mask=cur_attn, position_ids=pos_ids, past_key_values=cache, use_cache=True)
            if step > 0 and all(f is not None for f in finish):  # only last tokens' checks left: no logits needed
                forward_until(model, watches.deepest(), **inputs)
                police(watches.take(), reports, lens_l, finish, checking, out_tokens, stop_texts)
                break
            logits = model(**inputs).logits[:, -1]
            if watches is not None and len(watches):
                police(watches.take(), reports, lens_l, finish, checking, out_tokens, stop_texts)
            checking = [False] * B
            nxt = torch.full((B,), pad, dtype=torch.long)
            finite = torch.isfinite(logits).all(-1).tolist()  # one device sync per step
            for b, s in enumerate(specs):
                if finish[b] is not None:
                    continue
                tok = _sample(logits[b], s, gens[b], out_tokens[b]) if finite[b] else None
                if tok is None:
                    finish[b], errors[b] = "error", NON_FINITE
                    continue
                nxt[b] = tok
                out_tokens[b].append(tok)
                if tok == eos and not s.ignore_eos:
                    finish[b] = "stop"
                    continue
                if s.stop:
                    stop_texts[b] = stop_cut(tokenizer.decode(out_tokens[b], skip_special_tokens=True), s.stop)
                    if stop_texts[b] is not None:
                        finish[b], checking[b] = "stop", watch_gen[b]
                        continue
                if len(out_tokens[b]) >= s.max_new_tokens:
                    finish[b], checking[b] = "length", watch_gen[b]
            if any(s.deadline is not None for s in specs):
                now = time.monotonic()
                for b, s in enumerate(specs):
                    if finish[b] is None and s.deadline is not None and now > s.deadline:
                        finish[b], errors[b] = "error", TIMEOUT
            if all(f is not None for f in finish) and not any(checking):
                break
            step_in = nxt.view(B, 1).to(dev)
            cur_attn = torch.cat([cur_attn, torch.ones((B, 1), dtype=cur_attn.dtype, device=dev)], dim=1)
            positions.abs_pos = (lens + step).view(B, 1).to(dev)
            pos_ids = positions.abs_pos
    results = []
    for b, s in enumerate(specs):
        toks = out_tokens[b]
        text = stop_texts[b]
        if text is None:
            text = tokenizer.decode([t for t in toks if t != eos], skip_special_tokens=True)
        results.append(GenerationResult(tokens=toks, text=text, finish_reason=finish[b] or "length",
                                        prompt_tokens=len(s.input_ids), error=errors[b], safety=reports[b].to_wire()))
    return results


def police(hits: list, reports: list, prompt_lens: list[int], finish: list, checking: list, out_tokens: list,
           stop_texts: list) -> None:
    """Apply one forward's policy ``hits`` (``steering.policy.Hit``) to the rows' state, in place:
    each hit is reported on its row, unless the row already ended (and is not ``checking`` its last
    token); a ``refuse`` hit ends the row with ``content_filter``, its tokens cut before the token
    that fired (all of them for a hit in the prompt)."""
    for b, cut in apply_hits(hits, reports, prompt_lens, live=lambda b: finish[b] is None or checking[b]).items():
        out_tokens[b][:] = out_tokens[b][:cut]
        stop_texts[b] = None
        finish[b] = "content_filter"

