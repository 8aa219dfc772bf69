"""What a generation row is (``GenerationSpec``, ``GenerationResult``), how its prompt is rendered
and padded, how its next token is chosen (penalties, sampling), and ``generate``: a batch of rows
run to their ends on the engine (``steering.engine``).

Each row has its own interventions (``Steerer``), sampling settings and seed, so a batch gives
every request what it would get alone (greedy: the same tokens, tested). Prompt positions are
steered once at prefill and each generated position at its decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .hooks import Steerer
from .plan import InterventionPlan


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


def generate(model, tokenizer, specs: Sequence[GenerationSpec], steerer: Steerer | None = None) -> list[GenerationResult]:
    """Generate for a batch of rows, each steered by its own plan, to the end of every row: the
    engine's decode loop (``steering.engine.ContinuousBatch``) run with all rows joining at once,
    each row leaving when it ends. The one decode loop of the project: the server's text worker
    runs the same one.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer (``eos_token_id`` ends a row; ``pad_token_id`` pads).
        specs: one per row.
        steerer: applies the rows' plans; None (or all plans empty) generates unsteered.

    Returns:
        One ``GenerationResult`` per row, in order. A row whose logits become non-finite (an
        overflowing steer) ends at once with ``finish_reason="error"``, ``error=NON_FINITE``;
        the other rows go on unchanged (the hooks keep each row's numbers in its row). A row
        still unfinished at its ``deadline`` ends with ``error=TIMEOUT``; a row whose own forward
        raised during decoding with ``error="exception:<type>"`` (the others go on).

    Raises:
        Whatever the model or the steering hooks raise during the prefill.
    """
    from .engine import ContinuousBatch

    batch = ContinuousBatch(model, tokenizer, steerer)
    last: dict[str, object] = {}
    events = batch.add_many([(str(i), s) for i, s in enumerate(specs)])
    while True:
        last.update((ev.key, ev) for ev in events if ev.finish_reason is not None)
        if not len(batch):
            break
        events = batch.step()
    return [last[str(i)].result(len(s.input_ids)) for i, s in enumerate(specs)]
