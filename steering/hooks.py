"""Steering hooks for transformers models: the ``Steerer`` applies a batch of intervention plans
inside the forward, attaching the steering core (``steering.core.SteeringBatch``) at each hook point
it reads or edits. Hooks are context managers and always remove themselves.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from saesteer.modeling.lm import hook_point_width, hook_point_widths, resolve_hook_point
from saesteer.sae.model import SAE, SAEConfig

from .core import SteeringBatch, StepPositions
from .plan import InterventionPlan


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
                batch = SteeringBatch(plans, saes, memory, full=self.full, device=next(self.model.parameters()).device)
                for hook_point in batch.hook_points:
                    handles.append(resolve_hook_point(self.model, hook_point).attach(
                        lambda x, name=hook_point: batch.apply(name, x, positions)))
                yield batch.watches
                if memory is not None:
                    batch.save(memory)
            finally:
                for h in handles:
                    h.remove()
