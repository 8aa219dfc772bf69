"""Steering specs: the interventions a request applies (latent edits, raw vectors, named concepts),
where (``Positions``) and under which condition (``Condition``)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from .common import FiniteFloat, _Strict

MAX_INTERVENTIONS = 256
MAX_POSITIONS = 512
MAX_POSITION_INDEX = 2**20 - 1
"""Largest token index a ``positions`` list may name; the server also refuses indices past its
token limit (``max_total_tokens``)."""
MAX_ABS_VALUE = 1e5
"""Largest magnitude of a latent ``value``, a vector element or a ``strength``. Typical latent
activations are O(1-100) and residual norms O(10-1000); anything past this is far outside what a
steer can use, and near float32's range (3.4e38) products of such numbers overflow to inf."""

BoundedFloat = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]
PositionKind = Literal["all", "prompt", "generated"]
"""The named kinds of ``Positions``."""
Positions = Union[
    PositionKind,
    Annotated[list[Annotated[int, Field(ge=0, le=MAX_POSITION_INDEX)]], Field(min_length=1, max_length=MAX_POSITIONS)],
]
"""Where an intervention applies, by token index in the rendered prompt + completion:
``all`` (every position but 0), ``prompt`` (prompt positions but 0), ``generated`` (new tokens
only), or an explicit list of indices. Position 0 is the attention sink of most LLMs and is steered
only when listed explicitly."""


class Condition(_Strict):
    """``when``: apply an intervention only where an SAE latent fires above a threshold.

    The condition is read at each token from the activation the model computes anyway (its SAE's
    hook point, before any edit there), so an edit costs nothing where the concept is absent. The
    condition's hook point must be the edit's or an earlier one (later ones are not computed yet
    when the edit applies). ``mode``: ``token`` applies on exactly the tokens where the latent is
    above ``above``; ``once_fired`` applies from the first such token on, for the rest of the
    sequence. The attention sink (position 0) never fires a condition.
    """

    sae: str = Field(min_length=1, description="id of a loaded SAE whose latent is the condition")
    latent: int = Field(ge=0, description="latent index, 0 <= latent < d_sae")
    above: FiniteFloat = Field(0.0, ge=0.0, description="the latent must exceed this activation")
    unit: Literal["raw", "typical"] = Field("raw", description="above in raw units or in multiples of the typical activation")
    mode: Literal["token", "once_fired"] = Field("token", description="only where it fires, or from its first firing on")


class LatentIntervention(_Strict):
    """An edit of one SAE latent inside the forward pass.

    ops: ``clamp`` sets the latent to ``value``; ``ablate`` sets it to 0; ``scale`` multiplies it by
    ``value``; ``add`` adds ``value`` to it (which adds ``value`` times the latent's decoder
    direction to the hook point). The SAE's reconstruction error is kept, so only the edit
    changes the model.

    ``unit`` says what ``value`` of a clamp or add is measured in: ``raw`` latent units, or
    ``typical``, multiples of the latent's typical activation (its mean activation when it fires,
    from the statistics saved with the SAE; ``saesteer stats``). A scale factor is always raw.
    """

    op: Literal["clamp", "ablate", "scale", "add"] = Field(description="what to do to the latent")
    sae: str = Field(min_length=1, max_length=256, description="id of a loaded SAE (see GET /v1/saes)")
    latent: int = Field(ge=0, description="latent index, 0 <= latent < d_sae")
    value: BoundedFloat | None = Field(
        None, description=f"clamp target, scale factor or added amount, |value| <= {MAX_ABS_VALUE:g}; omitted for ablate")
    unit: Literal["raw", "typical"] = Field("raw", description="value in raw latent units or in multiples of the typical activation")
    positions: Positions = "all"
    when: Condition | None = Field(None, description="apply only where this latent fires (see Condition)")

    @model_validator(mode="after")
    def _value_matches_op(self):
        if self.op == "ablate" and self.value is not None:
            raise ValueError("ablate takes no value")
        if self.op != "ablate" and self.value is None:
            raise ValueError(f"{self.op} needs a value")
        if self.unit == "typical" and self.op not in ("clamp", "add"):
            raise ValueError(f"unit 'typical' applies to clamp and add, not {self.op}")
        return self


class VectorIntervention(_Strict):
    """Add a raw steering vector (d_in floats) times ``strength`` at a hook point.

    The hook point is named directly (``hook``) or as the hook point of a loaded SAE (``sae``).
    With ``unit="resid_norm"`` the vector is first scaled to unit length and ``strength`` is a
    multiple of the mean residual norm at the hook point (from the statistics of an SAE there), so
    0.5 adds half a typical activation's norm whatever the vector's own length.
    """

    op: Literal["add_vector"]
    vector: list[BoundedFloat] = Field(min_length=1, max_length=65536, description=f"d_in floats, each |x| <= {MAX_ABS_VALUE:g}")
    strength: BoundedFloat = Field(1.0, description=f"|strength| <= {MAX_ABS_VALUE:g}; the server also bounds the added vector's norm")
    unit: Literal["raw", "resid_norm"] = Field("raw", description="strength as a plain factor or as a multiple of the residual norm")
    hook: str | None = Field(None, max_length=256, description="hook point, e.g. blocks.10.hook_resid_post")
    sae: str | None = Field(None, max_length=256, description="use this SAE's hook point")
    positions: Positions = "all"
    when: Condition | None = Field(None, description="apply only where this latent fires (see Condition)")

    @model_validator(mode="after")
    def _one_target(self):
        if (self.hook is None) == (self.sae is None):
            raise ValueError("give exactly one of hook or sae")
        if self.unit == "resid_norm" and not any(v != 0 for v in self.vector):
            raise ValueError("a zero vector has no direction to scale to the residual norm")
        return self


CONCEPT_NAME = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
"""A named concept's name: lower-case letters, digits, ``_ . -``; at most 64 characters."""


class ConceptIntervention(_Strict):
    """Apply a named concept (``POST /v1/concepts``): each of its stored edits, with clamp and add
    values and vector strengths multiplied by ``strength`` (scale and ablate as stored), at these
    ``positions`` and under this ``when``."""

    op: Literal["concept"]
    concept: str = Field(pattern=CONCEPT_NAME, description="the name of a saved concept (GET /v1/concepts)")
    strength: BoundedFloat = Field(1.0, description="multiplies the concept's clamp/add values and vector strengths")
    positions: Positions = "all"
    when: Condition | None = Field(None, description="apply only where this latent fires (see Condition)")


Intervention = Annotated[Union[LatentIntervention, VectorIntervention, ConceptIntervention], Field(discriminator="op")]
StoredEdit = Annotated[Union[LatentIntervention, VectorIntervention], Field(discriminator="op")]
