"""Intervention plans: a request's interventions checked against the SAEs' configs and resolved.

Data flow: request (``saesteer_client.schema``) -> ``build_plan`` -> ``InterventionPlan`` (one per
row of a batch) -> ``steering.hooks.Steerer`` applies the plans of a whole batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from saesteer_client.schema import (
    MAX_ABS_VALUE,
    Concept,
    ConceptIntervention,
    Condition,
    ErrorItem,
    LatentIntervention,
    VectorIntervention,
)

from saesteer.modeling.lm import HookPointError, hook_point_order
from saesteer.sae.model import LatentRangeError, SAEConfig, check_latent

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
        item: the wire error, ``loc`` naming the field in the request body (e.g. ``["body",
            "interventions", 0, "latent"]``), ``msg`` the reason, ``type`` its kind.
    """

    def __init__(self, loc: list, msg: str, kind: str = "value_error"):
        super().__init__(msg)
        self.item = ErrorItem(loc=loc, msg=msg, type=kind)


@dataclass(frozen=True)
class When:
    """A resolved condition: the edit applies where latent ``latent`` of SAE ``sae_id`` exceeds
    ``above`` (raw units); ``once``: from the first such token on (``Condition.mode="once_fired"``)."""

    sae_id: str
    latent: int
    above: float
    once: bool = False


@dataclass(frozen=True)
class LatentEdit:
    """One edit of one latent: ``op`` in ``OPS``; ``value`` (0 for ablate); ``positions``
    ``"all" | "prompt" | "generated"`` or a tuple of token indices; ``when``: an optional condition."""

    sae_id: str
    latent: int
    op: str
    value: float
    positions: str | tuple[int, ...]
    when: When | None = None
    sign: float = 1.0
    """+1, or -1 to subtract the edit's effect instead of adding it (``negated``)."""


@dataclass(frozen=True)
class VectorEdit:
    """Add ``vector`` [d_in] (float32, strength already applied) at ``hook_point``."""

    hook_point: str
    vector: torch.Tensor
    positions: str | tuple[int, ...]
    when: When | None = None


@dataclass
class InterventionPlan:
    """All edits of one request. An empty plan leaves the model unchanged."""

    latent_edits: list[LatentEdit] = field(default_factory=list)
    vector_edits: list[VectorEdit] = field(default_factory=list)
    watches: list = field(default_factory=list)
    """Safety policies' watches on this row (``steering.policy.Watch``), added by ``PolicySet.apply``."""

    def __bool__(self) -> bool:
        return bool(self.latent_edits or self.vector_edits or self.watches)

    @property
    def watches_generated(self) -> bool:
        """A safety policy watches this row's generated tokens (each is checked when fed back)."""
        return any(w.generated for w in self.watches)

    def sae_ids(self) -> set[str]:
        """Ids of the SAEs whose weights applying this plan needs (raw vectors need none, their
        latent conditions and SAE-based detectors do)."""
        edits = [*self.latent_edits, *self.vector_edits]
        return ({e.sae_id for e in self.latent_edits}
                | {e.when.sae_id for e in edits if isinstance(e.when, When)}
                | {w.detector.sae_id for w in self.watches if w.detector.sae_id})


def negated(plan: InterventionPlan) -> InterventionPlan:
    """The plan whose effect on the hook point is the opposite of ``plan``'s: each latent edit's
    ``decode(z') - decode(z)`` subtracted instead of added (``sign=-1``), each vector negated.
    Concept Steerers (Kim & Ghadiyaram, 2025, Sec. 3) add a steer on the conditional text
    embeddings and subtract it on the unconditional ones; this is that, for every op."""
    from dataclasses import replace

    return InterventionPlan(
        latent_edits=[replace(e, sign=-e.sign) for e in plan.latent_edits],
        vector_edits=[replace(v, vector=-v.vector) for v in plan.vector_edits],
    )


def _positions(p) -> str | tuple[int, ...]:
    return p if isinstance(p, str) else tuple(p)


def typical_to_raw(value: float, typical: float) -> float:
    """A latent strength given in typical activations, in raw latent units: ``value * typical``."""
    return value * typical


def resid_norm_vector(direction: torch.Tensor, strength: float, resid_norm: float) -> torch.Tensor:
    """A steering vector whose strength is given in residual norms: ``direction`` [d_in] scaled to
    unit length (in float64), times ``strength * resid_norm``; float32 [d_in]."""
    unit = torch.nn.functional.normalize(direction.to(torch.float64), dim=0)
    return (unit * (float(strength) * float(resid_norm))).float()


class UnitError(ValueError):
    """A strength unit this server cannot resolve; ``field`` is the request field to name."""

    def __init__(self, field: str, msg: str):
        super().__init__(msg)
        self.field = field


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
            u.typical[sid] = st.typical_activation.float()
            if st.resid_norm_mean == st.resid_norm_mean and st.resid_norm_mean > 0:  # not nan
                u.resid_norm.setdefault(configs[sid].hook_point, float(st.resid_norm_mean))
        return u

    def latent_value(self, sae_id: str, latent: int, value: float, unit: str) -> float:
        """``value`` of a clamp or add on ``latent`` of SAE ``sae_id`` in raw latent units.

        Raises:
            UnitError: ``typical`` for an SAE without statistics (field ``unit``) or a latent that
                never fired in them (field ``latent``).
        """
        if unit == "raw":
            return value
        if sae_id not in self.typical:
            raise UnitError("unit", f"SAE {sae_id!r} has no latent statistics (saesteer stats), so no typical activation; use unit 'raw'")
        typical = float(self.typical[sae_id][latent])
        if typical <= 0:
            raise UnitError("latent", f"latent {latent} of SAE {sae_id!r} never fired in its statistics, so it has no typical activation; use unit 'raw'")
        return typical_to_raw(value, typical)

    def vector(self, hook_point: str, vector: torch.Tensor, strength: float, unit: str) -> torch.Tensor:
        """The float32 [d_in] vector added at ``hook_point`` for ``vector`` at ``strength`` in ``unit``.

        Raises:
            UnitError: ``resid_norm`` at a hook point without a known residual norm (field ``unit``).
        """
        if unit == "raw":
            return vector.float() * float(strength)
        if hook_point not in self.resid_norm:
            raise UnitError("unit", f"no residual norm is known at {hook_point!r} (no SAE with latent statistics there); use unit 'raw'")
        return resid_norm_vector(vector, strength, self.resid_norm[hook_point])


MAX_EDITS = 1024
"""Edits one request may expand to, named concepts included (each concept holds up to
``MAX_INTERVENTIONS``): every latent edit is a column the hook computes at every token."""


def expand_concept(iv: ConceptIntervention, concept: Concept) -> list[LatentIntervention | VectorIntervention]:
    """The edits a concept intervention stands for: the concept's stored edits with clamp/add
    values and vector strengths times ``iv.strength`` (scale factors and ablations as stored), at
    ``iv.positions`` and under ``iv.when``."""
    out = []
    for e in concept.interventions:
        upd = {"positions": iv.positions, "when": iv.when}
        if isinstance(e, LatentIntervention) and e.op in ("clamp", "add"):
            upd["value"] = e.value * iv.strength
        elif isinstance(e, VectorIntervention):
            upd["strength"] = e.strength * iv.strength
        out.append(e.model_copy(update=upd))
    return out


def build_plan(
    interventions: Sequence[LatentIntervention | VectorIntervention],
    configs: Mapping[str, SAEConfig],
    hook_widths: dict[str, int] | None = None,
    units: StrengthUnits | None = None,
    max_position: int | None = None,
    concepts: Callable[[str], Concept | None] | None = None,
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
        concepts: looks a named concept up by name (``{"op": "concept"}`` interventions, expanded
            by ``expand_concept``); None: no concepts (such an intervention is refused).

    Raises:
        PlanError: unknown SAE id, latent out of range, unknown hook point, a vector of the
            wrong length, an unknown concept, a unit this server cannot resolve (no statistics for that SAE or
            hook point, a latent that never fired), a resolved value above
            ``MAX_RESOLVED_VALUE``, a vector whose norm exceeds ``MAX_VECTOR_NORM_RESID``
            residual norms (or ``MAX_VECTOR_NORM`` where that norm is unknown), or a position at
            or past ``max_position``; ``loc`` names the field.
    """
    units = units or StrengthUnits()
    plan = InterventionPlan()
    widths = dict(hook_widths or {})
    for cfg in configs.values():
        widths.setdefault(cfg.hook_point, cfg.d_in)
    flat = []
    for i, iv in enumerate(interventions):
        loc = ["body", "interventions", i]
        if isinstance(iv, ConceptIntervention):
            concept = concepts(iv.concept) if concepts is not None else None
            if concept is None:
                raise PlanError(loc + ["concept"], f"unknown concept {iv.concept!r}" + (
                    "" if concepts is not None else "; this server keeps no concepts (--concepts-dir)"), "not_found")
            flat += [(loc, e) for e in expand_concept(iv, concept)]
        else:
            flat.append((loc, iv))
    if len(flat) > MAX_EDITS:
        raise PlanError(["body", "interventions"], f"the interventions expand to {len(flat)} edits (named concepts "
                        f"included); the limit is {MAX_EDITS}")
    for loc, iv in flat:
        if max_position is not None and not isinstance(iv.positions, str):
            far = max(iv.positions)
            if far >= max_position:
                raise PlanError(loc + ["positions"], f"position {far} is past the token limit ({max_position} tokens)")
        if iv.sae is not None and iv.sae not in configs:
            known = ", ".join(sorted(configs)) or "none"
            raise PlanError(loc + ["sae"], f"unknown SAE {iv.sae!r}; loaded SAEs: {known}")
        try:
            if isinstance(iv, LatentIntervention):
                check_latent(iv.latent, configs[iv.sae].d_sae, iv.sae)
                value = units.latent_value(iv.sae, iv.latent, float(iv.value or 0.0), iv.unit)
                if not abs(value) <= MAX_RESOLVED_VALUE:  # also catches inf and nan
                    raise PlanError(loc + ["value"], f"value resolves to {value:.3g} latent units; the limit is {MAX_RESOLVED_VALUE:g}")
                when = _resolve_when(iv.when, configs[iv.sae].hook_point, configs, units, loc)
                plan.latent_edits.append(LatentEdit(iv.sae, iv.latent, iv.op, value, _positions(iv.positions), when))
                continue
            hook_point = iv.hook if iv.hook is not None else configs[iv.sae].hook_point
            width = widths.get(hook_point)
            if width is None:
                raise PlanError(loc + ["hook"], f"hook point {hook_point!r} is not available on this model")
            if len(iv.vector) != width:
                raise PlanError(loc + ["vector"], f"vector has {len(iv.vector)} values; hook point {hook_point!r} has d_in {width}")
            vec = units.vector(hook_point, torch.tensor(iv.vector, dtype=torch.float64), iv.strength, iv.unit)
            norm = float(vec.double().norm())
            scale = units.resid_norm.get(hook_point)
            limit = MAX_VECTOR_NORM_RESID * scale if scale else MAX_VECTOR_NORM
            if not norm <= limit:  # also catches inf and nan
                what = f"{MAX_VECTOR_NORM_RESID:g} x the mean residual norm ({scale:.3g}) at {hook_point!r}" if scale else f"{MAX_VECTOR_NORM:g}"
                raise PlanError(loc + ["strength"], f"strength x vector has norm {norm:.3g}; the limit is {what}")
            when = _resolve_when(iv.when, hook_point, configs, units, loc)
            plan.vector_edits.append(VectorEdit(hook_point, vec, _positions(iv.positions), when))
        except LatentRangeError as e:
            raise PlanError(loc + ["latent"], str(e)) from None
        except UnitError as e:
            raise PlanError(loc + [e.field], str(e)) from None
    return plan


def _resolve_when(cond: Condition | None, edit_hook_point: str, configs: Mapping[str, SAEConfig],
                  units: StrengthUnits, loc: list) -> When | None:
    """The ``when`` of an intervention at ``edit_hook_point``, checked and in raw units.

    Raises:
        PlanError: an unknown SAE, a latent out of range, an unresolvable unit, or a condition
            whose hook point comes after the edit's (``loc`` names the field under ``when``).
    """
    if cond is None:
        return None
    at = loc + ["when"]
    if cond.sae not in configs:
        raise PlanError(at + ["sae"], f"unknown SAE {cond.sae!r}; loaded SAEs: {', '.join(sorted(configs)) or 'none'}")
    cond_hook = configs[cond.sae].hook_point
    try:
        later = hook_point_order(cond_hook) > hook_point_order(edit_hook_point)
    except HookPointError as e:
        raise PlanError(at + ["sae"], str(e)) from None
    if later:
        raise PlanError(at + ["sae"], f"the condition is read at {cond_hook!r}, after the edit at {edit_hook_point!r}; "
                                      "use an SAE at the same or an earlier hook point")
    try:
        check_latent(cond.latent, configs[cond.sae].d_sae, cond.sae)
        above = units.latent_value(cond.sae, cond.latent, float(cond.above), cond.unit)
    except LatentRangeError as e:
        raise PlanError(at + ["latent"], str(e)) from None
    except UnitError as e:
        raise PlanError(at + [e.field], str(e)) from None
    return When(cond.sae, cond.latent, above, once=cond.mode == "once_fired")
