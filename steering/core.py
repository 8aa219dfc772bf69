"""The steering core, engine-independent: what one batch of intervention plans does to the
activation x [batch, seq, d_in] at a hook point (``SteeringBatch.apply``). The built-in engine
calls it from transformers hooks (``steering.hooks.Steerer``); the vLLM engine from inside vLLM's
decoder layers, on the flat layout of ``StepPositions`` (every request's tokens as one sequence,
each token's plan given).

For an SAE at hook point h with code z = encode(x) and edited code z', the edited activation is

    x + decode(z') - decode(z)        (the reconstruction error x - decode(z) is kept),

so a batch whose edits change nothing leaves the model exactly as it was. Two ways to compute it:

- sparse delta (default): ``x + sum_i (z'_i - z_i) * W_dec[i] / s`` over the edited latents only;
  for threshold architectures only those latents' pre-activations are computed, O(d_in * edits);
- full (``full=True``, the eager twin): ``decode(z') + (x - decode(z))`` with the whole code.

Plans of one batch differ: every edit is one column of batched tensors (its plan, latent, op,
value, positions), masked to its own plan's tokens, so there is no Python loop over rows or tokens.
Safety policies' detectors (``_Watches``) and ``when`` conditions (``_Conditions``) read x before
any edit at their hook point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from saesteer.modeling.lm import hook_point_order
from saesteer.sae.model import SAE

from .plan import OPS, InterventionPlan, When

_KIND = {"all": 0, "prompt": 1, "generated": 2}
_EXPLICIT = 3
_NO_POSITION = 2**62  # pads explicit position lists: larger than any token index


@dataclass
class StepPositions:
    """Token positions of the forward pass in progress, set by the generation loop.

    Two layouts of the activations x [batch, seq, d_in] a hook sees:

    - padded (``rows`` None; transformers, the built-in engine): batch row b follows plan b;
    - flat (``rows`` given; e.g. vLLM, whose forward runs every request's new tokens as one
      sequence [1, tokens, d_in]): token (b, t) follows plan ``rows[b, t]``. Each plan's tokens
      must come in order (a prefill chunk, then decode steps), as they do in vLLM's batches.

    Attributes:
        abs_pos: [batch, seq] int64 index of each token in its own request's prompt + completion
            (negative for left padding).
        prompt_len: [plans] int64 number of prompt tokens of each plan's request.
        rows: [batch, seq] int64 plan index of each token (flat layout), or None (padded).
    """

    abs_pos: torch.Tensor
    prompt_len: torch.Tensor
    rows: torch.Tensor | None = None

    def row_match(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        """[batch, seq or 1, C] bool: whether each token belongs to the plan of each column
        (``rows`` [C], the columns' plan indices)."""
        rows = rows.to(self.abs_pos.device)
        if self.rows is None:
            return (torch.arange(batch, device=rows.device).view(-1, 1) == rows.view(1, -1)).unsqueeze(1)
        return self.rows.unsqueeze(-1) == rows.view(1, 1, -1)

    def token_prompt_len(self) -> torch.Tensor:
        """[batch, seq or 1, 1]: the prompt length of each token's request."""
        if self.rows is None:
            return self.prompt_len.view(-1, 1, 1)
        return self.prompt_len.to(self.rows.device)[self.rows].unsqueeze(-1)

    def plan_of(self, b: int, t: int) -> int:
        """The plan index of token (b, t)."""
        return b if self.rows is None else int(self.rows[b, t])


class _Conditions:
    """The ``when`` conditions of a batch: each distinct (row, ``When``) pair is one condition k,
    read at its SAE's hook point at every forward (from x before any edit there).

    ``record`` fills, for the forward in progress, ``hold`` [batch, seq, K] bool: where condition k
    holds (its row only, never at the sink or on padding; for ``once``, from its first firing on,
    remembered across the decode steps of one ``steer`` block in ``fired`` [K], and across blocks
    through ``memory``: one dict per row, ``When`` -> fired, read at the start and written back by
    ``save``; the continuous-batching engine steers each decode step in a block of its own).
    """

    def __init__(self, plans: Sequence[InterventionPlan], saes: Mapping[str, SAE],
                 memory: Sequence[dict] | None = None, watches: "_Watches | None" = None):
        self.index: dict[tuple[int, object], int] = {}
        per_sae: dict[str, list[tuple[int, int, When]]] = {}
        per_policy: dict[str, list[tuple[int, int, int, bool]]] = {}  # detector hook point -> (k, column, row, once)
        for row, plan in enumerate(plans):
            for e in (*plan.latent_edits, *plan.vector_edits):
                if e.when is not None and (row, e.when) not in self.index:
                    k = self.index[(row, e.when)] = len(self.index)
                    if isinstance(e.when, When):
                        per_sae.setdefault(e.when.sae_id, []).append((k, row, e.when))
                    else:  # a steer policy's PolicyWhen: its row's watch of that policy
                        col = watches.index[(row, e.when.policy)]
                        per_policy.setdefault(watches.items[col][1].detector.hook_point, []).append((k, col, row, e.when.once))
        self.watches = watches
        self.by_hook: dict[str, list] = {}  # SAE conditions: (sae, ks, rows, latents, above, once)
        for sid, conds in per_sae.items():
            sae = saes[sid]
            dev = sae.device
            ks, rows, ws = zip(*conds)
            self.by_hook.setdefault(sae.cfg.hook_point, []).append((
                sae,
                torch.tensor(ks, dtype=torch.long, device=dev),
                torch.tensor(rows, dtype=torch.long, device=dev),
                torch.tensor([w.latent for w in ws], dtype=torch.long, device=dev),
                torch.tensor([w.above for w in ws], dtype=sae.dtype, device=dev),
                torch.tensor([w.once for w in ws], dtype=torch.bool, device=dev),
            ))
        self.policy_by_hook: dict[str, tuple] = {}  # steer policies' conditions: (ks, watch columns, rows, once)
        for hook_point, conds in per_policy.items():
            self.policy_by_hook[hook_point] = tuple(torch.tensor(c) for c in zip(*conds))
        self.fired = torch.zeros(len(self.index), dtype=torch.bool)
        if memory is not None:
            for (row, when), k in self.index.items():
                self.fired[k] = bool(memory[row].get(when, False))
        self.hold: torch.Tensor | None = None

    def save(self, memory: Sequence[dict]) -> None:
        """Write each condition's fired flag into ``memory[row][when]``."""
        for (row, when), k in self.index.items():
            memory[row][when] = bool(self.fired[k])

    def __len__(self) -> int:
        return len(self.index)

    def hook_points(self) -> set[str]:
        """The hook points where conditions are read."""
        return {*self.by_hook, *self.policy_by_hook}

    def record(self, hook_point: str, x: torch.Tensor, pos: StepPositions) -> None:
        """Read the conditions at ``hook_point`` from its activation x [batch, seq, d_in] (a steer
        policy's from its watch's hits, which ``_Watches.record`` has just filled)."""
        if hook_point not in self.by_hook and hook_point not in self.policy_by_hook:
            return
        B, T = x.shape[:2]
        dev = x.device
        if self.hold is None or self.hold.shape[:2] != (B, T):  # a new forward (new seq length)
            self.hold = torch.zeros((B, T, len(self)), dtype=torch.bool, device=dev)

        for sae, ks, rows, latents, above, once in self.by_hook.get(hook_point, ()):
            row_match = pos.row_match(rows, B)  # each condition in its own plan's tokens only
            z = sae.encode_latents(x, latents)  # [B, T, Kh]
            self._update(ks, once, (z > above) & (pos.abs_pos >= 1).unsqueeze(-1) & row_match, row_match)
        if hook_point in self.policy_by_hook:
            ks, cols, rows, once = self.policy_by_hook[hook_point]
            self._update(ks.to(dev), once.to(dev), self.watches.hit[..., cols.to(dev)], pos.row_match(rows, B))

    def _update(self, ks: torch.Tensor, once: torch.Tensor, hold: torch.Tensor, row_match: torch.Tensor) -> None:
        """Conditions ``ks`` [K] hold where ``hold`` [B, T, K] is true, or for ``once`` ones from
        their first firing on (also in earlier blocks, ``fired``); each in its own plan's tokens
        only (``hold`` is false elsewhere, so the running maximum along the sequence carries a
        firing only to its own plan's later tokens, in either layout)."""
        fired = self.fired.to(hold.device)[ks]
        ever = (hold.to(torch.int8).cummax(dim=1).values.bool() | fired.view(1, 1, -1)) & row_match
        self.fired[ks.cpu()] = (fired | hold.any(dim=(0, 1))).cpu()
        self.hold[..., ks] = torch.where(once.view(1, 1, -1), ever, hold)

    def mask(self, cond: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        """[batch, seq, columns] bool: where the condition of each column (``cond`` [columns],
        a condition index or -1 for none) holds in the forward in progress."""
        free = (cond < 0).view(1, 1, -1)
        if self.hold is None:
            return free.expand(batch, seq, -1)
        return free | self.hold[..., cond.clamp(min=0)]


class _Watches:
    """The safety policies' watches of a batch (``steering.policy``): each (row, ``Watch``) is one
    column w. At every forward, ``record`` scores each detector once over the whole batch at its
    hook point (before any edit there) and fills ``hit`` [batch, seq, W] bool: the watch's row, at
    the positions it watches, score over its threshold; ``score`` [batch, seq, W] holds the scores.
    ``take`` turns the hits of the forward just done into ``Hit`` records (one host sync)."""

    def __init__(self, plans: Sequence[InterventionPlan], saes: Mapping[str, SAE]):
        self.items: list[tuple[int, object]] = [(row, w) for row, plan in enumerate(plans) for w in plan.watches]
        self.index = {(row, w.policy): j for j, (row, w) in enumerate(self.items)}
        by_detector: dict[int, tuple[object, list[int]]] = {}
        for j, (_, w) in enumerate(self.items):
            by_detector.setdefault(id(w.detector), (w.detector, []))[1].append(j)
        self.by_hook: dict[str, list] = {}
        for det, cols in by_detector.values():
            sae = saes[det.sae_id] if det.sae_id else None
            ws = [self.items[j] for j in cols]
            self.by_hook.setdefault(det.hook_point, []).append((
                det, sae, torch.tensor(cols, dtype=torch.long), torch.tensor([r for r, _ in ws], dtype=torch.long),
                torch.tensor([w.threshold for _, w in ws], dtype=torch.float32),
                torch.tensor([w.prompt for _, w in ws]), torch.tensor([w.generated for _, w in ws])))
        self.hit: torch.Tensor | None = None
        self.score: torch.Tensor | None = None
        self.abs_pos: torch.Tensor | None = None
        self.pos: StepPositions | None = None
        self._placed: dict[tuple, list] = {}

    def __len__(self) -> int:
        return len(self.items)

    def deepest(self) -> str | None:
        """The last hook point a detector reads (a forward for checks alone may stop there)."""
        return max(self.by_hook, key=hook_point_order) if self.by_hook else None

    def record(self, hook_point: str, x: torch.Tensor, pos: StepPositions) -> None:
        """Score the detectors at ``hook_point`` on its activation x [batch, seq, d_in]."""
        if hook_point not in self.by_hook:
            return
        B, T = x.shape[:2]
        dev = x.device
        if self.hit is None or self.hit.shape[:2] != (B, T) or self.hit.device != dev:
            self.hit = torch.zeros((B, T, len(self)), dtype=torch.bool, device=dev)
            self.score = torch.zeros((B, T, len(self)), dtype=torch.float32, device=dev)
        self.abs_pos, self.pos = pos.abs_pos, pos
        p = pos.abs_pos.unsqueeze(-1)  # [B, T, 1]
        plen = pos.token_prompt_len()
        in_prompt, in_gen = (p >= 1) & (p < plen), p >= plen
        for det, sae, cols, row_match, thr, prompt, gen in self._on(hook_point, dev, B, pos):
            s = det.score(x, sae).unsqueeze(-1)  # [B, T, 1]
            self.hit[..., cols] = (s > thr) & ((in_prompt & prompt) | (in_gen & gen)) & row_match
            self.score[..., cols] = s.expand(-1, -1, cols.numel())

    def _on(self, hook_point: str, dev: torch.device, batch: int, pos: StepPositions) -> list:
        """The detectors at ``hook_point`` with their column tensors on ``dev``, each watch's
        tokens as a mask [batch, seq or 1, C] (padded layout: made once per device and batch size,
        not per forward; flat layout: per forward, from ``pos.rows``)."""
        key = (hook_point, dev, batch)
        if pos.rows is not None:
            return [(det, sae, cols.to(dev), pos.row_match(rows, batch), thr.to(dev), prompt.to(dev), gen.to(dev))
                    for det, sae, cols, rows, thr, prompt, gen in self.by_hook[hook_point]]
        if key not in self._placed:
            self._placed[key] = [
                (det, sae, cols.to(dev), pos.row_match(rows, batch), thr.to(dev), prompt.to(dev), gen.to(dev))
                for det, sae, cols, rows, thr, prompt, gen in self.by_hook[hook_point]]
        return self._placed[key]

    def take(self) -> list:
        """The hits of the forward just done, as ``steering.policy.Hit`` (plan index, policy,
        action, the token's position in its request, score); cleared."""
        from .policy import Hit

        if self.hit is None:
            return []
        hit, score, abs_pos = self.hit, self.score, self.abs_pos
        if not bool(hit.any()):
            return []
        self.hit = None  # the next forward writes a fresh one (these are returned)
        idx = hit.nonzero().tolist()
        vals = score[hit].tolist()
        pos = abs_pos.tolist()
        return [Hit(self.pos.plan_of(b, t), self.items[w][1].policy, self.items[w][1].action, int(pos[b][t]), float(v))
                for (b, t, w), v in zip(idx, vals)]


class _Columns:
    """Batched edit columns for one group (one SAE, or the raw vectors) at one hook point."""

    def __init__(self, rows: list[int], specs: list, device: torch.device, cond: list[int] | None = None):
        self.cond = torch.tensor(cond if cond is not None else [-1] * len(rows), dtype=torch.long, device=device)
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.kind = torch.tensor(
            [_KIND[p] if isinstance(p, str) else _EXPLICIT for p in specs], dtype=torch.long, device=device
        )
        # explicit positions: each column's sorted list, padded at the end with a sentinel no
        # position reaches; membership is a searchsorted per column, O(batch x seq x columns)
        # memory however long the lists (a broadcast comparison was batch x seq x columns x width)
        width = max([len(p) for p in specs if not isinstance(p, str)] or [1])
        explicit = torch.full((len(specs), width), _NO_POSITION, dtype=torch.long)
        for j, p in enumerate(specs):
            if not isinstance(p, str):
                explicit[j, : len(p)] = torch.tensor(sorted(p), dtype=torch.long)
        self.explicit = explicit.to(device)
        self.any_explicit = any(not isinstance(p, str) for p in specs)

    def mask(self, pos: StepPositions, batch: int, conds: _Conditions | None = None) -> torch.Tensor:
        """[batch, seq, columns] bool: where each column's edit applies (its row, its positions,
        and where its condition holds)."""
        p = pos.abs_pos.unsqueeze(-1)  # [B, T, 1]
        plen = pos.token_prompt_len()
        by_kind = torch.stack(
            torch.broadcast_tensors(
                p >= 1,
                (p >= 1) & (p < plen),
                p >= plen,
                self._explicit_member(pos.abs_pos),
            )
        )  # [4, B, T, C]
        kind = self.kind.view(1, 1, 1, -1).expand(1, *by_kind.shape[1:])
        m = by_kind.gather(0, kind).squeeze(0)
        m = m & pos.row_match(self.rows, batch)
        if conds is not None and len(conds) and bool((self.cond >= 0).any()):
            m = m & conds.mask(self.cond, batch, m.shape[1])
        return m

    def _explicit_member(self, abs_pos: torch.Tensor) -> torch.Tensor:
        """[batch, seq, columns] bool: the position is in the column's explicit list."""
        B, T = abs_pos.shape
        C, W = self.explicit.shape
        if not self.any_explicit:
            return torch.zeros((B, T, C), dtype=torch.bool, device=abs_pos.device)
        q = abs_pos.reshape(1, B * T).expand(C, B * T).contiguous()
        idx = torch.searchsorted(self.explicit, q).clamp_(max=W - 1)  # [C, B*T]
        hit = self.explicit.gather(1, idx) == q
        return hit.t().reshape(B, T, C)


class _SAEGroup:
    def __init__(self, sae: SAE, rows, latents, ops, values, specs, cond=None, sign=None):
        dev = sae.device
        self.sae = sae
        self.cols = _Columns(rows, specs, dev, cond)
        self.sign = torch.tensor(sign if sign is not None else [1.0] * len(rows), dtype=sae.dtype, device=dev)
        self.signed = bool((self.sign != 1).any())
        self.latents = torch.tensor(latents, dtype=torch.long, device=dev)
        self.ops = torch.tensor(ops, dtype=torch.long, device=dev)
        self.values = torch.tensor(values, dtype=sae.dtype, device=dev)
        self.directions = sae.decoder_directions(self.latents)  # [E, d_in], once per batch, not per step

    def edited(self, z: torch.Tensor) -> torch.Tensor:
        """z' for the edited columns z [B, T, E]."""
        v = self.values
        return torch.where(
            self.ops == OPS["clamp"], v,
            torch.where(self.ops == OPS["scale"], z * v, torch.where(self.ops == OPS["add"], z + v, torch.zeros_like(z))),
        )

    def delta(self, x: torch.Tensor, pos: StepPositions, full: bool, conds: _Conditions | None = None) -> torch.Tensor:
        mask = self.cols.mask(pos, x.shape[0], conds).to(self.sae.dtype)
        if not full:
            z = self.sae.encode_latents(x, self.latents)  # [B, T, E]
            # where, not "* mask": a column's inf (an edit that overflowed) times another row's
            # 0 would be NaN in that row; this way a non-finite edit stays in its own row
            dz = torch.where(mask.bool(), self.edited(z) - z, torch.zeros((), dtype=z.dtype, device=z.device))
            if self.signed:
                dz = dz * self.sign
            return (dz @ self.directions).to(x.dtype)
        # eager twin: whole code, edits scattered into it, full decode, error term kept
        z = self.sae.encode(x)  # [B, T, d_sae]
        sel = z[..., self.latents]
        upd = torch.where(mask.bool(), sel + self.sign * (self.edited(sel) - sel) if self.signed else self.edited(sel), sel)
        z_new = z.clone()
        own = pos.row_match(self.cols.rows, x.shape[0]).expand(upd.shape)  # [B, T, E]: each column's plan's tokens
        for j in range(self.latents.numel()):  # eager reference: clarity over speed
            lat = self.latents[j]
            z_new[..., lat] = torch.where(own[..., j], upd[..., j], z_new[..., lat])
        x_ref = x.to(z.dtype)
        out = self.sae.decode(z_new) + (x_ref - self.sae.decode(z))
        return (out - x_ref).to(x.dtype)


class _VectorGroup:
    def __init__(self, rows, vectors, specs, device, dtype, cond=None):
        self.cols = _Columns(rows, specs, device, cond)
        self.vectors = torch.stack(vectors).to(device=device, dtype=dtype)  # [V, d_in]
        self._cast: dict[torch.dtype, tuple] = {}

    def delta(self, x: torch.Tensor, pos: StepPositions, full: bool, conds: _Conditions | None = None) -> torch.Tensor:
        mask = self.cols.mask(pos, x.shape[0], conds)  # [B, T, V] bool
        if x.dtype not in self._cast:  # once per dtype, not per step
            vec = self.vectors.to(x.dtype)  # may overflow in a half dtype
            finite = torch.isfinite(vec).all(-1)  # [V]
            self._cast[x.dtype] = (vec, finite, bool(finite.all()))
        vec, finite, all_finite = self._cast[x.dtype]
        if all_finite:
            return mask.to(x.dtype) @ vec
        # a non-finite vector reaches its own rows only (as NaN), never others through 0 x inf
        out = mask.to(x.dtype) @ torch.where(finite.unsqueeze(-1), vec, torch.zeros((), dtype=vec.dtype, device=vec.device))
        poisoned = (mask & ~finite).any(-1, keepdim=True)  # [B, T, 1]
        return torch.where(poisoned, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)


class SteeringBatch:
    """The steering of one batch of plans at every hook point, independent of any engine: what a
    hook at ``hook_point`` does to its activation is ``apply(hook_point, x, positions)``. The
    ``Steerer`` calls it from transformers hooks; another engine (vLLM) calls it from inside its
    own layers, with the flat layout of ``StepPositions`` (each token's plan in ``rows``).

    Args:
        plans: one ``InterventionPlan`` per row (plan index = row, in either layout).
        saes: every SAE the plans name, loaded.
        memory: one dict per plan carrying ``once_fired`` conditions' state in (``save`` writes
            it back); None: none carried.
        full: the eager twin (whole code, full decode) instead of the sparse delta.
        device: where raw steering vectors live (the model's device).

    Attributes:
        hook_points: the hook points where this batch reads or edits, in forward order.
        watches: the safety policies' watches (``take()`` after each forward gives their hits).
    """

    def __init__(self, plans: Sequence[InterventionPlan], saes: Mapping[str, SAE],
                 memory: Sequence[dict] | None = None, full: bool = False, device: torch.device | str = "cpu"):
        self.full = full
        self.watches = _Watches(plans, saes)
        self.conds = _Conditions(plans, saes, memory, self.watches)
        self.groups = self._groups(plans, saes, self.conds, torch.device(device))
        self.hook_points = sorted({*self.groups, *self.conds.hook_points(), *self.watches.by_hook}, key=hook_point_order)

    @staticmethod
    def _groups(plans: Sequence[InterventionPlan], saes: Mapping[str, SAE], conds: _Conditions,
                device: torch.device) -> dict[str, list]:
        def cond(row, e):
            return -1 if e.when is None else conds.index[(row, e.when)]

        per_sae: dict[str, list] = {}
        per_vec: dict[str, list] = {}
        for row, plan in enumerate(plans):
            for e in plan.latent_edits:
                per_sae.setdefault(e.sae_id, []).append((row, e.latent, OPS[e.op], e.value, e.positions, cond(row, e), e.sign))
            for v in plan.vector_edits:
                per_vec.setdefault(v.hook_point, []).append((row, v.vector, v.positions, cond(row, v)))
        groups: dict[str, list] = {}
        for sid, cols in per_sae.items():
            sae = saes[sid]
            rows, lat, ops, vals, specs, cnd, sign = map(list, zip(*cols))
            groups.setdefault(sae.cfg.hook_point, []).append(_SAEGroup(sae, rows, lat, ops, vals, specs, cnd, sign))
        for hook_point, cols in per_vec.items():
            rows, vecs, specs, cnd = map(list, zip(*cols))
            groups.setdefault(hook_point, []).append(_VectorGroup(rows, vecs, specs, device, torch.float32, cnd))
        return groups

    def apply(self, hook_point: str, x: torch.Tensor, positions: StepPositions) -> torch.Tensor | None:
        """The activation at ``hook_point`` after this batch's edits there: x [batch, seq, d_in]
        plus every edit's delta (the SAE's error term kept), or None where nothing is edited. The
        detectors and conditions read there see x before any edit."""
        self.watches.record(hook_point, x, positions)
        self.conds.record(hook_point, x, positions)
        groups = self.groups.get(hook_point)
        if not groups:
            return None
        out = x
        for g in groups:
            out = out + g.delta(x, positions, self.full, self.conds)
        return out

    def save(self, memory: Sequence[dict]) -> None:
        """Write each ``once_fired`` condition's state into ``memory`` (one dict per plan)."""
        self.conds.save(memory)
