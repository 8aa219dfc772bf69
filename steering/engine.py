"""Continuous batching: rows join and leave the running batch at every decode step.

``generate`` (static batching) runs a fixed batch to its longest row: a 16-token request behind a
512-token one waits for it. ``ContinuousBatch`` keeps one batched KV cache instead; ``add_many`` runs new
rows' prompts (prefill, each row steered by its own plan) and merges its keys and values into the
cache, left-padded to a common length, and ``step`` decodes one token for every row. A row that
finishes (EOS, a stop string, its length, a deadline, non-finite logits) or is cancelled leaves at
once, and the columns no remaining row uses are trimmed. Each row keeps its own plan, sampling
settings, seed and ``once_fired`` state, so its tokens are what it would get alone (greedy: equal
up to float rounding of the batched matmuls, tested).

Rows are steered by the same ``Steerer`` as static generation, one ``steer`` block per forward
(the plans of the rows present), the position of each row's new token given explicitly.

``add_many``, ``step`` and ``cancel`` run under ``torch.inference_mode``: no autograd bookkeeping
on the ~1,000 small operations of a decode step (``docs/continuous_batching.md``), and the KV cache (``modeling.kv_cache.spare_cache``) appends each step's keys and values in
place instead of copying the whole cache. The cache's tensors are inference tensors: read them
(``cache.layers``) only, never update them in place outside these methods.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from saesteer.sae.activations import forward_until
from saesteer.modeling.kv_cache import spare_cache

from .generate import NON_FINITE, TIMEOUT, GenerationResult, GenerationSpec, _sample, left_padded, pad_id, row_generator, stop_cut
from .core import StepPositions
from .hooks import Steerer
from .policy import SafetyReport, apply_hits
from .readout import Readout, read_latents

CANCELLED = "cancelled"
"""``RowEvent.error`` of a row removed by ``ContinuousBatch.cancel`` (its client went away)."""


class Engine(Protocol):
    """What the server's text worker needs of an engine: rows (one per completion; a ``compare``
    request is two) that join with their own plan and settings, one decode step for every running
    row, cancels, and read-outs. ``ContinuousBatch`` is the built-in implementation; a second
    engine (vLLM) implements the same methods, so no route changes with the engine.

    Keys are strings unique among the running rows; every method runs on one thread.
    """

    def add_many(self, rows: list[tuple[str, GenerationSpec]]) -> list["RowEvent"]:
        """Start ``rows`` ((key, spec) pairs): each row's first event, in order. Raises on a
        failure that leaves no row started."""

    def step(self) -> list["RowEvent"]:
        """One decode step for every running row: one event per row; rows that end leave."""

    def cancel(self, key: str) -> "RowEvent | None":
        """Remove a running row now; its last event, or None if it was not running."""

    def keys(self) -> list[str]:
        """The running rows' keys."""

    def __len__(self) -> int:
        """How many rows run."""

    def read_out(self, sae, input_ids: list[int], top_k: int, latents: Sequence[int]) -> Readout:
        """``sae``'s code at every token of ``input_ids`` (one forward to its hook point, no
        generation): ``steering.readout.read_latents``'s ``Readout``."""


@dataclass
class RowEvent:
    """What one row produced at one step.

    Attributes:
        key: the row's key (given to ``ContinuousBatch.add``).
        token: the token id sampled at this step, or None (a row that ended without one).
        text: text newly safe to show: the decoded completion grows by it. Held back: a trailing
            incomplete UTF-8 character, and text that may still turn out to begin a stop string.
        finish_reason: None while the row runs; then "stop", "length" or "error".
        error: with "error": ``NON_FINITE``, ``TIMEOUT`` or ``CANCELLED``.
        tokens: on the last event, every token of the completion; else None.
        full_text: on the last event, the whole completion text (cut at a stop string).
        release: the token ids the client may see now, where they differ from ``[token]``: a row
            whose generated tokens a safety policy watches releases each token one step late,
            once its own forward has checked it (and none past a ``refuse`` hit).
        safety: on the last event, the policies that fired on the row (wire ``PolicyHit`` dicts).
    """

    key: str
    token: int | None
    text: str
    finish_reason: str | None = None
    error: str | None = None
    tokens: list[int] | None = None
    full_text: str | None = None
    release: list[int] | None = None
    safety: list[dict] | None = None

    def result(self, prompt_tokens: int) -> GenerationResult:
        """A last event as the row's ``GenerationResult`` (``prompt_tokens``: its prompt's length)."""
        return GenerationResult(tokens=list(self.tokens or []), text=self.full_text or "", finish_reason=self.finish_reason,
                                prompt_tokens=prompt_tokens, error=self.error, safety=self.safety or [])

    def shown_tokens(self) -> list[int]:
        """The token ids this event makes visible to the client."""
        if self.release is not None:
            return self.release
        return [self.token] if self.token is not None and self.error is None else []


@dataclass
class _Row:
    key: str
    spec: GenerationSpec
    gen: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    cache_len: int = 0  # tokens of this row in the KV cache (= position of its next input token)
    shown: int = 0  # characters of the completion already sent
    memory: dict = field(default_factory=dict)  # once_fired conditions' state
    stop_text: str | None = None
    report: SafetyReport = field(default_factory=SafetyReport)
    checking: str | None = None  # finished (this reason), its last token waiting for its check

    @property
    def watch_gen(self) -> bool:
        """A safety policy watches this row's generated tokens (they are released one step late)."""
        return self.spec.plan.watches_generated


class ContinuousBatch:
    """A running batch of generation rows over one model (see the module docstring).
    Rows that arrive together are prefilled together (``add_many``).

    Args:
        model: a transformers causal LM with a ``DynamicCache``-compatible attention.
        tokenizer: its tokenizer (``eos_token_id`` ends a row; ``pad_token_id`` fills padding).
        steerer: applies the rows' plans; None generates unsteered.

    Not thread-safe: one caller drives ``add``, ``step`` and ``cancel``.
    """

    def __init__(self, model, tokenizer, steerer: Steerer | None = None):
        self.model, self.tokenizer, self.steerer = model, tokenizer, steerer
        self.dev = next(model.parameters()).device
        self.eos = tokenizer.eos_token_id
        self.pad = pad_id(tokenizer)
        self.rows: list[_Row] = []
        self.cache = None  # DynamicCache over the rows, [rows, heads, T, head_dim] per layer
        self.attn: torch.Tensor | None = None  # [rows, T] int64, 0 on left padding

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> list[str]:
        """The keys of the rows running, in batch order."""
        return [r.key for r in self.rows]

    @torch.inference_mode()
    def read_out(self, sae, input_ids: list[int], top_k: int = 8, latents: Sequence[int] = ()) -> Readout:
        """``Engine.read_out``: one forward of the model to ``sae``'s hook point, beside the batch
        (whose KV cache it does not touch)."""
        return read_latents(self.model, sae, input_ids, top_k, latents)

    # -- joining --------------------------------------------------------------------------------
    def add(self, key: str, spec: GenerationSpec) -> RowEvent:
        """``add_many`` for one row; its first event."""
        return self.add_many([(key, spec)])[0]

    @torch.inference_mode()
    def add_many(self, rows: list[tuple[str, GenerationSpec]]) -> list[RowEvent]:
        """Prefill the new rows' prompts together (one forward over the left-padded prompts, each
        row steered by its own plan), sample each row's first token and merge the rows that go on
        into the batch.

        Args:
            rows: (key, spec) pairs; each key unique among the rows running and these.

        Returns:
            Each new row's first event, in order (its last one too if it already ended).

        Raises:
            ValueError: a key already runs or repeats, or a spec has no prompt tokens.
            Whatever the model or the steering hooks raise (the batch is left unchanged).
        """
        keys = [k for k, _ in rows] + self.keys()
        if len(set(keys)) != len(keys):
            raise ValueError("row keys must be unique among the rows running and the new ones")
        if any(not s.input_ids for _, s in rows):
            raise ValueError("a row needs at least one prompt token")
        new = [_Row(k, s, row_generator(s)) for k, s in rows]
        ids, attn, abs_pos, lens = left_padded([s.input_ids for _, s in rows], self.pad)
        abs_pos = abs_pos.to(self.dev)
        cache = self._cache_of(())  # empty: the prefill fills it
        positions = StepPositions(abs_pos=abs_pos, prompt_len=lens.to(self.dev))
        with self._steer(new, positions) as watches:
            logits = self.model(input_ids=ids.to(self.dev), attention_mask=attn.to(self.dev),
                                position_ids=abs_pos.clamp(min=0), past_key_values=cache, use_cache=True).logits[:, -1]
        refused = self._police(new, watches)
        finite = torch.isfinite(logits).all(-1).tolist()
        events = []
        for b, row in enumerate(new):
            row.cache_len = int(lens[b])
            if b in refused:
                events.append(self._final(row, "content_filter", release=[]))
                continue
            events.append(self._advance(row, logits[b] if finite[b] else None))
        going = [b for b, ev in enumerate(events) if ev.finish_reason is None]
        if going:
            self._merge([new[b] for b in going], cache, attn.to(self.dev), going)
        return events

    def _cache_of(self, kv) -> object:
        """A ``DynamicCache`` holding ``kv``: one (keys, values) pair per layer, each
        [rows, heads, T, head_dim], appended in place by later steps (``modeling.kv_cache``)."""
        cache = spare_cache(self.model.config)
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        return cache

    def _kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batch's (keys, values) per layer."""
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def _merge(self, rows: list[_Row], cache, attn: torch.Tensor, which: list[int]) -> None:
        """Append ``rows`` (rows ``which`` of a prefill's ``cache`` and ``attn`` [n, P]) to the
        batch, left-padding the shorter side so that every row ends at the last column."""
        idx = torch.tensor(which, dtype=torch.long, device=self.dev)
        new = [(layer.keys.index_select(0, idx), layer.values.index_select(0, idx)) for layer in cache.layers]
        attn = attn.index_select(0, idx)
        P = attn.shape[1]
        if self.cache is None:
            self.cache, self.attn, self.rows = self._cache_of(new), attn, list(rows)
            return
        old = self._kv()
        T = old[0][0].shape[-2]
        L = max(T, P)

        def left_pad(t: torch.Tensor, n: int) -> torch.Tensor:  # [B, H, t, D] -> [B, H, t + n, D]
            return t if n == 0 else torch.cat([t.new_zeros((*t.shape[:2], n, t.shape[3])), t], dim=2)

        merged = self._cache_of((torch.cat([left_pad(ok, L - T), left_pad(nk, L - P)]),
                                 torch.cat([left_pad(ov, L - T), left_pad(nv, L - P)]))
                                for (ok, ov), (nk, nv) in zip(old, new))
        attn_old = torch.cat([self.attn.new_zeros((self.attn.shape[0], L - T)), self.attn], dim=1)
        attn_new = torch.cat([attn.new_zeros((attn.shape[0], L - P)), attn], dim=1)
        self.cache, self.attn = merged, torch.cat([attn_old, attn_new])
        self.rows.extend(rows)

    # -- leaving --------------------------------------------------------------------------------
    @torch.inference_mode()
    def cancel(self, key: str) -> RowEvent | None:
        """Remove the row ``key`` now (its KV freed); its last event (``error=CANCELLED``), or
        None if no such row runs."""
        for row in self.rows:
            if row.key == key:
                self._drop({key})
                return self._final(row, "error", CANCELLED)
        return None

    def _drop(self, keys: set[str]) -> None:
        keep = [i for i, r in enumerate(self.rows) if r.key not in keys]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.attn = None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.dev)
        attn = self.attn.index_select(0, idx)
        first = int(attn.any(0).to(torch.int8).argmax())  # columns before it are padding in every row left
        self.cache = self._cache_of((k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:])
                                    for k, v in self._kv())
        self.attn = attn[:, first:]

    # -- decoding -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RowEvent]:
        """One decode step for every row: one event per row, in batch order; rows that end leave.

        If the batched forward raises (an exception in one row's steering, say), the step is
        redone row by row, and a row whose own forward raises ends with ``error="exception:<type>"``
        while the others get their tokens: one row never ends another.

        Raises:
            Whatever the model or the steering hooks raise with a single row (the batch is left as
            before the step).
        """
        if not self.rows:
            return []
        B = len(self.rows)
        ids = torch.tensor([[r.tokens[-1]] for r in self.rows], dtype=torch.long, device=self.dev)
        pos = torch.tensor([[r.cache_len] for r in self.rows], dtype=torch.long, device=self.dev)
        attn = torch.cat([self.attn, self.attn.new_ones((B, 1))], dim=1)
        positions = StepPositions(abs_pos=pos, prompt_len=torch.tensor([len(r.spec.input_ids) for r in self.rows], device=self.dev))
        lengths = [layer.keys.shape[-2] for layer in self.cache.layers]
        checks_only = all(r.checking is not None for r in self.rows)  # every row waits for its last check
        try:
            with self._steer(self.rows, positions) as watches:
                inputs = dict(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=self.cache, use_cache=True)
                if checks_only:  # no logits needed: the forward stops at the last detector
                    forward_until(self.model, watches.deepest(), **inputs)
                    logits = None
                else:
                    logits = self.model(**inputs).logits[:, -1]
            refused = self._police(self.rows, watches)
        except Exception:
            for layer, n in zip(self.cache.layers, lengths):  # undo a partial append
                layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
            if B == 1:
                raise
            return self._step_one_by_one(ids, pos, attn, positions.prompt_len)
        self.attn = attn
        events = []
        finite = torch.isfinite(logits).all(-1).tolist() if logits is not None else [False] * B
        for b, row in enumerate(self.rows):
            row.cache_len += 1
            events.append(self._after_forward(row, b in refused, logits[b] if finite[b] else None))
        self._drop({e.key for e in events if e.finish_reason is not None})
        return events

    def _after_forward(self, row: _Row, refused: bool, logits: torch.Tensor | None) -> RowEvent:
        """A running row's event once a forward fed its last token: refused by a policy, finished
        now that its last token passed its check, or its next token."""
        if refused:
            return self._final(row, "content_filter", release=[])
        if row.checking is not None:
            return self._final(row, row.checking, release=[row.tokens[-1]])
        return self._advance(row, logits)

    def _police(self, rows: list[_Row], watches) -> set[int]:
        """Report one forward's safety hits on ``rows`` (the forward's batch order) and apply
        ``refuse``: a refused row's tokens are cut before the token that fired. The indices of
        the rows refused."""
        if watches is None or not len(watches):
            return set()
        cuts = apply_hits(watches.take(), [r.report for r in rows], [len(r.spec.input_ids) for r in rows])
        for b, cut in cuts.items():
            del rows[b].tokens[cut:]
            rows[b].stop_text = None
        return set(cuts)

    def _step_one_by_one(self, ids, pos, attn, prompt_len) -> list[RowEvent]:
        """``step`` for each row alone, over its slice of the KV cache; the rows whose forward
        raised end with an error, the others' new key/value columns are put back together."""
        old = self._kv()
        events, cols, ok = [], [], []
        for b, row in enumerate(self.rows):
            sl = slice(b, b + 1)
            sub = self._cache_of((k[sl], v[sl]) for k, v in old)
            try:
                with self._steer([row], StepPositions(abs_pos=pos[sl], prompt_len=prompt_len[sl])) as watches:
                    logits = self.model(input_ids=ids[sl], attention_mask=attn[sl], position_ids=pos[sl],
                                        past_key_values=sub, use_cache=True).logits[0, -1]
                refused = self._police([row], watches)
            except Exception as e:
                events.append(self._final(row, "error", f"exception:{type(e).__name__}"))
                continue
            ok.append(b)
            cols.append([(layer.keys[:, :, -1:], layer.values[:, :, -1:]) for layer in sub.layers])
            row.cache_len += 1
            events.append(self._after_forward(row, bool(refused), logits if bool(torch.isfinite(logits).all()) else None))
        self.rows = [self.rows[b] for b in ok]  # the rows whose forward raised are gone
        if ok:
            idx = torch.tensor(ok, dtype=torch.long, device=self.dev)
            self.cache = self._cache_of((torch.cat([k.index_select(0, idx), torch.cat([c[i][0] for c in cols])], dim=2),
                                         torch.cat([v.index_select(0, idx), torch.cat([c[i][1] for c in cols])], dim=2))
                                        for i, (k, v) in enumerate(old))
            self.attn = attn.index_select(0, idx)
        else:
            self.cache = self.attn = None
        self._drop({e.key for e in events if e.finish_reason is not None})
        return events

    def _steer(self, rows: list[_Row], positions: StepPositions):
        from contextlib import nullcontext

        plans = [r.spec.plan for r in rows]
        if self.steerer is None or not any(plans):
            return nullcontext()
        return self.steerer.steer(plans, positions, memory=[r.memory for r in rows])

    def _advance(self, row: _Row, logits: torch.Tensor | None) -> RowEvent:
        """Sample ``row``'s next token from its ``logits`` [vocab] (None: non-finite) and say what
        changed."""
        s = row.spec
        tok = _sample(logits, s, row.gen, row.tokens) if logits is not None else None
        if tok is None:
            return self._final(row, "error", NON_FINITE)
        # a watched row releases the token its forward has just checked, not the new one
        release = (row.tokens[-1:] if row.watch_gen else None)
        row.tokens.append(tok)
        if tok == self.eos and not s.ignore_eos:
            return self._final(row, "stop", token=tok, release=release + [tok] if release is not None else None)
        end = None
        if s.stop:
            row.stop_text = stop_cut(self._text(row), s.stop)
            if row.stop_text is not None:
                end = "stop"
        if end is None and len(row.tokens) >= s.max_new_tokens:
            end = "length"
        if end is not None:
            if not row.watch_gen:
                return self._final(row, end, token=tok)
            row.checking = end  # one more forward checks the last token
        if s.deadline is not None and time.monotonic() > s.deadline:
            return self._final(row, "error", TIMEOUT, token=tok)
        return RowEvent(row.key, tok, self._show(row, final=False), release=release)

    def _text(self, row: _Row, unchecked: bool = True) -> str:
        """The completion's text; without ``unchecked``, only its tokens that passed the safety
        check (all but the last for a watched row)."""
        tokens = row.tokens if unchecked or not row.watch_gen else row.tokens[:-1]
        text = self.tokenizer.decode([t for t in tokens if t != self.eos], skip_special_tokens=True)
        if row.stop_text is not None and len(row.stop_text) < len(text):
            return row.stop_text
        return text

    def _show(self, row: _Row, final: bool) -> str:
        text = self._text(row, unchecked=final)
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):  # a character whose bytes are still arriving
                safe = len(text.rstrip("\ufffd"))
            if row.spec.stop:
                safe = min(safe, len(text) - max(len(x) for x in row.spec.stop) + 1)
        new = text[row.shown:safe] if safe > row.shown else ""
        row.shown = max(row.shown, safe)
        return new

    def _final(self, row: _Row, reason: str, error: str | None = None, token: int | None = None,
               release: list[int] | None = None) -> RowEvent:
        text = self._show(row, final=True)
        return RowEvent(row.key, token, text, reason, error, tokens=list(row.tokens), full_text=self._text(row),
                        release=release, safety=row.report.to_wire())
