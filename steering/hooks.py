"""Steering hooks for transformers models: apply a batch of intervention plans inside the forward.

For an SAE at hook point h with activation x [batch, seq, d_in], code z = encode(x) and edited
code z', the hook returns

    x + decode(z') - decode(z)        (the reconstruction error x - decode(z) is kept),

so a hook whose edits change nothing leaves the model exactly as it was. Two ways to compute it:

- sparse delta (default): ``x + sum_i (z'_i - z_i) * W_dec[i] / s`` over the edited latents only;
  for threshold architectures only those latents' pre-activations are computed, O(d_in * edits);
- full (``full=True``, the eager twin): ``decode(z') + (x - decode(z))`` with the whole code.

Rows of a batch carry different plans: every edit is one column of batched tensors (its row, latent,
op, value, positions), masked to its own row, so there is no Python loop over rows in the hook.
Hooks are context managers and always remove themselves.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch

from saesteer.sae.model import SAE, SAEConfig

from saesteer.sae.lm import hook_point_order, hook_point_width, hook_point_widths, resolve_hook_point
from .plan import OPS, InterventionPlan, When

_KIND = {"all": 0, "prompt": 1, "generated": 2}
_EXPLICIT = 3
_NO_POSITION = 2**62  # pads explicit position lists: larger than any token index


@dataclass
class StepPositions:
    """Token positions of the forward pass in progress, set by the generation loop.

    Attributes:
        abs_pos: [batch, seq] int64 index of each token in its own row's prompt + completion
            (negative for left padding).
        prompt_len: [batch] int64 number of prompt tokens of each row.
    """

    abs_pos: torch.Tensor
    prompt_len: torch.Tensor


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

        def rows_of(rows):  # [B, 1, K]: the batch row each condition belongs to
            return (torch.arange(B, device=dev).view(-1, 1) == rows.to(dev).view(1, -1)).unsqueeze(1)

        for sae, ks, rows, latents, above, once in self.by_hook.get(hook_point, ()):
            row_match = rows_of(rows)
            z = sae.encode_latents(x, latents)  # [B, T, Kh]
            self._update(ks, once, (z > above) & (pos.abs_pos >= 1).unsqueeze(-1) & row_match, row_match)
        if hook_point in self.policy_by_hook:
            ks, cols, rows, once = self.policy_by_hook[hook_point]
            self._update(ks.to(dev), once.to(dev), self.watches.hit[..., cols.to(dev)], rows_of(rows))

    def _update(self, ks: torch.Tensor, once: torch.Tensor, hold: torch.Tensor, row_match: torch.Tensor) -> None:
        """Conditions ``ks`` [K] hold where ``hold`` [B, T, K] is true, or for ``once`` ones from
        their first firing on (also in earlier blocks, ``fired``); each in its own row only."""
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
        self.abs_pos = pos.abs_pos
        p = pos.abs_pos.unsqueeze(-1)  # [B, T, 1]
        plen = pos.prompt_len.view(-1, 1, 1)
        in_prompt, in_gen = (p >= 1) & (p < plen), p >= plen
        for det, sae, cols, row_match, thr, prompt, gen in self._on(hook_point, dev, B):
            s = det.score(x, sae).unsqueeze(-1)  # [B, T, 1]
            self.hit[..., cols] = (s > thr) & ((in_prompt & prompt) | (in_gen & gen)) & row_match
            self.score[..., cols] = s.expand(-1, -1, cols.numel())

    def _on(self, hook_point: str, dev: torch.device, batch: int) -> list:
        """The detectors at ``hook_point`` with their column tensors on ``dev``, each watch's row as
        a mask [batch, 1, C] (made once per device and batch size, not per forward)."""
        key = (hook_point, dev, batch)
        if key not in self._placed:
            self._placed[key] = [
                (det, sae, cols.to(dev), (torch.arange(batch).view(-1, 1) == rows.view(1, -1)).unsqueeze(1).to(dev),
                 thr.to(dev), prompt.to(dev), gen.to(dev))
                for det, sae, cols, rows, thr, prompt, gen in self.by_hook[hook_point]]
        return self._placed[key]

    def take(self) -> list:
        """The hits of the forward just done, as ``steering.policy.Hit`` (row, policy, action,
        the token's position in its row, score); cleared."""
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
        return [Hit(b, self.items[w][1].policy, self.items[w][1].action, int(pos[b][t]), float(v))
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
        plen = pos.prompt_len.view(-1, 1, 1)
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
        row_match = torch.arange(batch, device=self.rows.device).view(-1, 1) == self.rows.view(1, -1)
        m = m & row_match.unsqueeze(1)
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
        for j in range(self.latents.numel()):  # eager reference: clarity over speed
            r = self.cols.rows[j]
            z_new[r, :, self.latents[j]] = upd[r, :, j]
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


@runtime_checkable
class SAESource(Protocol):
    """What ``Steerer`` needs of the SAEs it applies: every config by id (to check hook points and
    requests without loading weights) and ``use(ids)``, a context manager that yields the SAEs
    ``ids`` by id, loaded, and keeps them so (pinned) until it exits."""

    configs: Mapping[str, SAEConfig]

    def use(self, ids: Iterable[str]) -> AbstractContextManager[dict[str, SAE]]: ...


class LoadedSAEs(dict):
    """A plain ``{id: SAE}`` dict of SAEs already in memory, as an ``SAESource`` (tests, scripts,
    evaluation: everything resident, nothing to pin)."""

    @property
    def configs(self) -> dict[str, SAEConfig]:
        return {sid: sae.cfg for sid, sae in self.items()}

    @contextmanager
    def use(self, ids: Iterable[str]) -> Iterator[dict[str, SAE]]:
        yield {sid: self[sid] for sid in ids}


class Steerer:
    """Applies per-row intervention plans to a transformers causal LM.

    Args:
        model: the LM (``model.model.layers`` or a similar block list).
        saes: an ``SAESource`` (e.g. ``steering.pool.SAEPool``, which loads SAEs on demand), or
            a plain mapping {id: SAE} of loaded SAEs (wrapped in ``LoadedSAEs``). Each SAE's
            ``hook_point`` must be a hook point of ``model``; this is checked from the configs,
            so constructing a Steerer loads no weights.
        full: use the full-decode eager path instead of the sparse delta (for tests and checks).

    Attributes:
        configs: every SAE's config by id (what ``build_plan`` checks requests against).
        hook_widths: every hook point of ``model`` a raw vector may target, with its width.

    Raises:
        HookPointError: an SAE whose hook point the model lacks.
        ValueError: an SAE whose d_in differs from the hook point's width.
    """

    def __init__(self, model, saes: SAESource | Mapping[str, SAE], full: bool = False):
        if not isinstance(saes, SAESource):
            saes = LoadedSAEs(saes)
        self.model, self.saes, self.full = model, saes, full
        self.configs: dict[str, SAEConfig] = dict(saes.configs)
        width = hook_point_width(model)
        self.hook_widths = hook_point_widths(model)
        for sid, cfg in self.configs.items():
            resolve_hook_point(model, cfg.hook_point)
            if cfg.d_in != width:
                raise ValueError(f"SAE {sid!r}: d_in {cfg.d_in} differs from the model's width {width} at {cfg.hook_point}")

    def _groups(self, plans: Sequence[InterventionPlan], saes: Mapping[str, SAE], conds: _Conditions) -> dict[str, list]:
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
        p = next(self.model.parameters())
        for hook_point, cols in per_vec.items():
            rows, vecs, specs, cnd = map(list, zip(*cols))
            groups.setdefault(hook_point, []).append(_VectorGroup(rows, vecs, specs, p.device, torch.float32, cnd))
        return groups

    @contextmanager
    def steer(self, plans: Sequence[InterventionPlan], positions: StepPositions,
              memory: Sequence[dict] | None = None) -> Iterator[None]:
        """Register the hooks for a batch whose row b follows ``plans[b]``; removed on exit.
        Yields the batch's safety watches (``take()`` after each forward gives the policies' hits).

        ``positions`` is read at every forward call: the generation loop updates it in place.
        ``memory``: one dict per row carrying ``once_fired`` conditions' state into and out of this
        block (for a caller that steers each step in a block of its own); None: within the block.
        The SAEs the plans name (and only those) are fetched, and with a pool pinned, until exit.

        Raises:
            saesteer.steering.pool.SAEBudgetError: with a pool, the SAEs the plans name do not
                fit its memory budget together.
        """
        ids = sorted(set().union(*(p.sae_ids() for p in plans)))
        handles = []
        with self.saes.use(ids) as saes:
            try:
                watches = _Watches(plans, saes)
                conds = _Conditions(plans, saes, memory, watches)
                by_point = self._groups(plans, saes, conds)
                for hook_point in sorted({*by_point, *conds.hook_points(), *watches.by_hook}, key=hook_point_order):
                    hp = resolve_hook_point(self.model, hook_point)

                    def apply(x, groups=by_point.get(hook_point, []), name=hook_point):
                        watches.record(name, x, positions)  # detectors and conditions read before any edit here
                        conds.record(name, x, positions)
                        if not groups:
                            return None
                        out = x
                        for g in groups:
                            out = out + g.delta(x, positions, self.full, conds)
                        return out

                    handles.append(hp.attach(apply))
                yield watches
                if memory is not None:
                    conds.save(memory)
            finally:
                for h in handles:
                    h.remove()
