"""Intervention plans: a request's interventions checked against the SAEs' configs and resolved.

Data flow: request (``saesteer_client.schema``) -> ``build_plan`` -> ``InterventionPlan`` (one per
row of a batch) -> ``steering.hooks.Steerer`` applies the plans of a whole batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from saesteer_client.schema import MAX_ABS_VALUE, LatentIntervention, VectorIntervention

from saesteer.sae.model import SAEConfig

OPS = {"clamp": 0, "ablate": 1, "scale": 2, "add": 3}
"""Op codes used in the batched hook tensors."""

MAX_RESOLVED_VALUE = MAX_ABS_VALUE
"""Largest |value| of a latent edit once its unit is resolved (value x typical activation): the
wire schema's bound on raw values holds for every unit."""
MAX_VECTOR_NORM_RESID = 100.0
"""Largest L2 norm of an added vector (strength applied), in mean residual norms at its hook point
where an SAE's statistics say what that norm is; steering stops being useful near 1."""
MAX_VECTOR_NORM = 1e6
"""Largest L2 norm of an added vector where the residual norm at the hook point is not known."""


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


@dataclass
class StrengthUnits:
    """What the request fields ``unit="typical"`` and ``unit="resid_norm"`` mean on this server.

    Attributes:
        typical: SAE id -> float32 [d_sae], each latent's typical activation (its mean activation
            when it fires, ``sae.stats``; 0 for a latent that never fired).
        resid_norm: hook point -> mean L2 norm of its activation (model units).
    """

    typical: dict[str, torch.Tensor] = field(default_factory=dict)
    resid_norm: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_stats(cls, stats: Mapping[str, object], configs: Mapping[str, SAEConfig]) -> "StrengthUnits":
        """From ``saesteer.sae.stats.LatentStats`` by SAE id (None where an SAE has none)."""
        u = cls()
        for sid, st in stats.items():
            if st is None:
                continue
            u.typical[sid] = st.mean_activation.float()
            if st.resid_norm_mean == st.resid_norm_mean and st.resid_norm_mean > 0:  # not nan
                u.resid_norm.setdefault(configs[sid].hook_name, float(st.resid_norm_mean))
        return u


def build_plan(
    interventions: Sequence[LatentIntervention | VectorIntervention],
    configs: Mapping[str, SAEConfig],
    hook_widths: dict[str, int] | None = None,
    units: StrengthUnits | None = None,
    max_position: int | None = None,
) -> InterventionPlan:
    """Check interventions against the SAEs' configs and resolve them into a plan (no weights are
    needed: ``Steerer.configs`` or ``SAEPool.configs`` validate a request before any SAE loads).

    Args:
        interventions: validated wire models (``GenerateRequest.interventions``).
        configs: the attached SAEs' configs by id.
        hook_widths: hook points a raw vector may target, with their widths (``Steerer.hook_widths``
            lists every supported one); the SAEs' hook points are always allowed.
        units: typical activations and residual norms that resolve ``unit="typical"`` (value x the
            latent's typical activation) and ``unit="resid_norm"`` (unit vector x strength x the
            mean residual norm); None: only raw units are accepted.
        max_position: explicit token positions must be below this (the server's token limit);
            None: no limit beyond the wire schema's.

    Raises:
        PlanError: unknown SAE id, latent out of range, unknown hook point, a vector of the
            wrong length, a unit this server cannot resolve (no statistics for that SAE or
            hook point, a latent that never fired), a resolved value above
            ``MAX_RESOLVED_VALUE``, a vector whose norm exceeds ``MAX_VECTOR_NORM_RESID``
            residual norms (or ``MAX_VECTOR_NORM`` where that norm is unknown), or a position at
            or past ``max_position``; ``loc`` names the field.
    """
    units = units or StrengthUnits()
    plan = InterventionPlan()
    widths = dict(hook_widths or {})
    for cfg in configs.values():
        widths.setdefault(cfg.hook_name, cfg.d_in)
    for i, iv in enumerate(interventions):
        loc = ["body", "interventions", i]
        if max_position is not None and not isinstance(iv.positions, str):
            far = max(iv.positions)
            if far >= max_position:
                raise PlanError(loc + ["positions"], f"position {far} is past the token limit ({max_position} tokens)")
        if iv.sae is not None and iv.sae not in configs:
            known = ", ".join(sorted(configs)) or "none"
            raise PlanError(loc + ["sae"], f"unknown SAE {iv.sae!r}; loaded SAEs: {known}")
        if isinstance(iv, LatentIntervention):
            d_sae = configs[iv.sae].d_sae
            if iv.latent >= d_sae:
                raise PlanError(loc + ["latent"], f"latent {iv.latent} is out of range for SAE {iv.sae!r} (d_sae {d_sae})")
            value = float(iv.value or 0.0)
            if iv.unit == "typical":
                if iv.sae not in units.typical:
                    raise PlanError(loc + ["unit"], f"SAE {iv.sae!r} has no latent statistics (saesteer stats), so no typical activation; use unit 'raw'")
                typical = float(units.typical[iv.sae][iv.latent])
                if typical <= 0:
                    raise PlanError(loc + ["latent"], f"latent {iv.latent} of SAE {iv.sae!r} never fired in its statistics, so it has no typical activation; use unit 'raw'")
                value *= typical
            if not abs(value) <= MAX_RESOLVED_VALUE:  # also catches inf and nan
                raise PlanError(loc + ["value"], f"value resolves to {value:.3g} latent units; the limit is {MAX_RESOLVED_VALUE:g}")
            plan.latent_edits.append(LatentEdit(iv.sae, iv.latent, iv.op, value, _positions(iv.positions)))
        else:
            hook = iv.hook if iv.hook is not None else configs[iv.sae].hook_name
            width = widths.get(hook)
            if width is None:
                raise PlanError(loc + ["hook"], f"hook point {hook!r} is not available on this model")
            if len(iv.vector) != width:
                raise PlanError(loc + ["vector"], f"vector has {len(iv.vector)} values; hook point {hook!r} has d_in {width}")
            vec = torch.tensor(iv.vector, dtype=torch.float32) * float(iv.strength)
            if iv.unit == "resid_norm":
                if hook not in units.resid_norm:
                    raise PlanError(loc + ["unit"], f"no residual norm is known at {hook!r} (no SAE with latent statistics there); use unit 'raw'")
                unit_vec = torch.nn.functional.normalize(torch.tensor(iv.vector, dtype=torch.float64), dim=0)
                vec = (unit_vec * (float(iv.strength) * units.resid_norm[hook])).float()
            norm = float(vec.double().norm())
            scale = units.resid_norm.get(hook)
            limit = MAX_VECTOR_NORM_RESID * scale if scale else MAX_VECTOR_NORM
            if not norm <= limit:  # also catches inf and nan
                what = f"{MAX_VECTOR_NORM_RESID:g} x the mean residual norm ({scale:.3g}) at {hook!r}" if scale else f"{MAX_VECTOR_NORM:g}"
                raise PlanError(loc + ["strength"], f"strength x vector has norm {norm:.3g}; the limit is {what}")
            plan.vector_edits.append(VectorEdit(hook, vec, _positions(iv.positions)))
    return plan
