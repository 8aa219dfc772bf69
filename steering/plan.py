"""Intervention plans: a request's interventions checked against the SAEs' configs and resolved.

Data flow: request (``saesteer_client.schema``) -> ``build_plan`` -> ``InterventionPlan`` (one per
row of a batch) -> ``steering.hooks.Steerer`` applies the plans of a whole batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from saesteer_client.schema import LatentIntervention, VectorIntervention

from saesteer.sae.model import SAEConfig

OPS = {"clamp": 0, "ablate": 1, "scale": 2, "add": 3}
"""Op codes used in the batched hook tensors."""


class PlanError(ValueError):
    """An intervention that does not fit the loaded model or SAEs.

    Attributes:
        loc: the field's location in the request body, e.g. ``["body", "interventions", 0, "latent"]``.
        msg: the reason.
    """

    def __init__(self, loc: list, msg: str, kind: str = "value_error"):
        super().__init__(msg)
        self.loc, self.msg, self.kind = loc, msg, kind

    def detail(self) -> list[dict]:
        return [{"loc": self.loc, "msg": self.msg, "type": self.kind}]


@dataclass(frozen=True)
class LatentEdit:
    """One edit of one latent: ``op`` in ``OPS``; ``value`` (0 for ablate); ``positions``
    ``"all" | "prompt" | "generated"`` or a tuple of token indices."""

    sae_id: str
    latent: int
    op: str
    value: float
    positions: str | tuple[int, ...]


@dataclass(frozen=True)
class VectorEdit:
    """Add ``vector`` [d_in] (float32, strength already applied) at ``hook``."""

    hook: str
    vector: torch.Tensor
    positions: str | tuple[int, ...]


@dataclass
class InterventionPlan:
    """All edits of one request. An empty plan leaves the model unchanged."""

    latent_edits: list[LatentEdit] = field(default_factory=list)
    vector_edits: list[VectorEdit] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.latent_edits or self.vector_edits)

    def sae_ids(self) -> set[str]:
        """Ids of the SAEs whose weights applying this plan needs (raw vectors need none)."""
        return {e.sae_id for e in self.latent_edits}


def _positions(p) -> str | tuple[int, ...]:
    return p if isinstance(p, str) else tuple(p)


def build_plan(
    interventions: Sequence[LatentIntervention | VectorIntervention],
    configs: Mapping[str, SAEConfig],
    hook_widths: dict[str, int] | None = None,
) -> InterventionPlan:
    """Check interventions against the SAEs' configs and resolve them into a plan (no weights are
    needed: ``Steerer.configs`` or ``SAEPool.configs`` validate a request before any SAE loads).

    Args:
        interventions: validated wire models (``GenerateRequest.interventions``).
        configs: the attached SAEs' configs by id.
        hook_widths: hook points a raw vector may target, with their widths (``Steerer.hook_widths``
            lists every supported one); the SAEs' hook points are always allowed.

    Raises:
        PlanError: unknown SAE id, latent out of range, unknown hook point, or a vector of the
            wrong length; ``loc`` names the field.
    """
    plan = InterventionPlan()
    widths = dict(hook_widths or {})
    for cfg in configs.values():
        widths.setdefault(cfg.hook_name, cfg.d_in)
    for i, iv in enumerate(interventions):
        loc = ["body", "interventions", i]
        if iv.sae is not None and iv.sae not in configs:
            known = ", ".join(sorted(configs)) or "none"
            raise PlanError(loc + ["sae"], f"unknown SAE {iv.sae!r}; loaded SAEs: {known}")
        if isinstance(iv, LatentIntervention):
            d_sae = configs[iv.sae].d_sae
            if iv.latent >= d_sae:
                raise PlanError(loc + ["latent"], f"latent {iv.latent} is out of range for SAE {iv.sae!r} (d_sae {d_sae})")
            plan.latent_edits.append(
                LatentEdit(iv.sae, iv.latent, iv.op, float(iv.value or 0.0), _positions(iv.positions))
            )
        else:
            hook = iv.hook if iv.hook is not None else configs[iv.sae].hook_name
            width = widths.get(hook)
            if width is None:
                raise PlanError(loc + ["hook"], f"hook point {hook!r} is not available on this model")
            if len(iv.vector) != width:
                raise PlanError(loc + ["vector"], f"vector has {len(iv.vector)} values; hook point {hook!r} has d_in {width}")
            vec = torch.tensor(iv.vector, dtype=torch.float32) * float(iv.strength)
            plan.vector_edits.append(VectorEdit(hook, vec, _positions(iv.positions)))
    return plan
