"""Content-safety policies: detectors read inside the forward pass, and what to do when they fire.

A policies file (JSON or YAML) lists policies; each names a **detector**, the positions it
**watches** (``prompt``, ``generated``), a **threshold** and an **action**::

    {"policies": [
      {"name": "pii", "detector": {"kind": "raw_probe", "probe": "pii_raw_res10.safetensors"},
       "threshold": 0.9, "watch": ["generated"], "action": "refuse"},
      {"name": "python", "detector": {"kind": "concept", "concept": "python"},
       "threshold": 4.0, "action": "steer", "steer": {"op": "ablate"}}]}

Detectors score every token from the activation the model computes anyway (at the detector's hook
point, before any edit there):

- ``concept``: the largest activation among the latents of a named concept (its latent
  interventions) or of ``sae`` + ``latents`` (raw latent units);
- ``sae_probe``: a logistic-regression probe on chosen SAE latents (``sae.probes``; a probability);
- ``raw_probe``: a logistic-regression probe on the raw hook activation (a probability).

Kantamneni et al. ("Are Sparse Autoencoders Useful? A Case Study in Sparse Probing", ICML 2025)
find the raw-activation probe the baseline SAE probes must beat; ``docs/safety_eval.md`` measures
all three here. Actions, applied to every row of every request (``PolicySet.apply``):

- ``flag``: reported in the response's ``safety`` list only;
- ``steer``: from the first token where the detector fires, the concept's latents are ablated or
  scaled (``op`` ``ablate``/``scale``, error term kept) or the probe's direction is subtracted
  (``op`` ``subtract``, ``strength`` in mean residual norms), as conditional interventions;
- ``refuse``: the completion stops before the first token that fires (``finish_reason
  "content_filter"``, OpenAI's name); a hit in the prompt refuses before any token. A generated
  token is checked when it is fed back (the next forward), so the loops hold one token back.

Loading checks everything a running server needs (``load_policies``): a bad file, an unknown
concept, SAE or hook point, or a probe that does not fit raises ``PolicyError`` naming the field,
so the server refuses to start rather than run unprotected.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from saesteer_client.schema import POLICY_NAME, Concept, LatentIntervention

from saesteer.config_files import ConfigFileError, read_document
from saesteer.modeling.lm import HookPointError, hook_point_order
from saesteer.sae.model import LatentRangeError, SAEConfig, check_latent
from saesteer.sae.probes import LinearProbe, load_probe

from .plan import InterventionPlan, LatentEdit, VectorEdit, resid_norm_vector

ACTIONS = ("flag", "steer", "refuse")
MAX_REPORTED_TOKENS = 16
"""Hit tokens listed per policy in a response (``hits`` counts them all)."""


class PolicyError(ValueError):
    """A policies file that cannot be served: ``loc`` names the field (e.g. ``["policies", 0,
    "detector", "concept"]``), ``msg`` the reason."""

    def __init__(self, loc: list, msg: str):
        self.loc, self.msg = list(loc), msg
        super().__init__(f"{'.'.join(str(x) for x in loc)}: {msg}" if loc else msg)


# -- the file (pydantic: unknown fields and wrong types are refused with their path) ------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DetectorSpec(_Strict):
    kind: Literal["concept", "sae_probe", "raw_probe"]
    concept: str | None = Field(None, description="concept: a named concept (its latent interventions' latents)")
    sae: str | None = Field(None, description="concept: the SAE of ``latents`` (instead of a named concept)")
    latents: list[int] | None = Field(None, min_length=1, max_length=256)
    probe: str | None = Field(None, description="sae_probe / raw_probe: the probe file (saesteer policies train), "
                              "relative to the policies file")

    @model_validator(mode="after")
    def _fields_of_kind(self):
        if self.kind == "concept":
            if (self.concept is None) == (self.sae is None or self.latents is None):
                raise ValueError("a concept detector names either concept, or sae and latents")
        elif self.probe is None:
            raise ValueError(f"a {self.kind} detector names its probe file")
        return self


class SteerSpec(_Strict):
    op: Literal["ablate", "scale", "subtract"]
    value: float = Field(0.0, allow_inf_nan=False, ge=0.0, le=1.0, description="scale: the factor kept (0 = ablate)")
    strength: float = Field(1.0, allow_inf_nan=False, gt=0.0, le=10.0,
                            description="subtract: the direction's length, in mean residual norms")


class PolicySpec(_Strict):
    name: str = Field(pattern=POLICY_NAME)
    detector: DetectorSpec
    threshold: float = Field(allow_inf_nan=False)
    watch: list[Literal["prompt", "generated"]] = Field(default_factory=lambda: ["prompt", "generated"], min_length=1)
    action: Literal["flag", "steer", "refuse"]
    steer: SteerSpec | None = None

    @model_validator(mode="after")
    def _steer_iff_action(self):
        if (self.action == "steer") != (self.steer is not None):
            raise ValueError("give steer exactly when action is steer")
        return self


class PolicyFile(_Strict):
    policies: list[PolicySpec] = Field(max_length=32)
    audit_text: bool = Field(False, description="audit log lines carry the hit tokens' text")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [p.name for p in self.policies]
        if len(set(names)) != len(names):
            raise ValueError("policy names must be unique")
        return self


# -- the runtime --------------------------------------------------------------------------------
@dataclass(eq=False)
class Detector:
    """Scores tokens at ``hook_point``. ``kind``: ``concept`` (``latents`` of SAE ``sae_id``, the
    largest activation, raw units), ``sae_probe`` / ``raw_probe`` (``probe``, a probability)."""

    kind: str
    hook_point: str
    sae_id: str | None = None
    latents: torch.Tensor | None = None  # int64 [n], concept detectors
    probe: LinearProbe | None = None
    _folded: tuple | None = field(default=None, repr=False)  # (key, tensors): see ``_weights``

    def _weights(self, x: torch.Tensor, sae) -> tuple:
        """What one score needs, sliced and folded once per SAE, device and dtype (not per token):
        the encoder columns of the latents read (W [d_in, n], b [n], threshold [n] or None), and the
        probe with its standardisation folded in (w / std [n], b - (mean / std) . w [])."""
        key = (id(sae), x.device, x.dtype)
        if self._folded is not None and self._folded[0] == key:
            return self._folded[1]
        enc = None
        lat = self.latents if self.kind == "concept" else (self.probe.latents if self.kind == "sae_probe" else None)
        if lat is not None:
            from saesteer.sae.model import THRESHOLD_ARCHITECTURES

            lat = lat.to(sae.device)
            thr = sae.threshold[lat].to(x.dtype) if sae.cfg.architecture in THRESHOLD_ARCHITECTURES else None
            enc = (sae.W_enc[:, lat].contiguous().to(x.dtype), sae.b_enc[lat].to(x.dtype), thr, lat)
        lin = None
        if self.probe is not None:
            lin = tuple(t.to(device=x.device, dtype=x.dtype) for t in self.probe.folded())
        self._folded = (key, (enc, lin))
        return enc, lin

    def score(self, x: torch.Tensor, sae=None) -> torch.Tensor:
        """Scores [B, T] float32 for activations x [B, T, d_in] (``sae``: the detector's SAE, loaded):
        a concept's largest latent activation (raw units), or a probe's probability."""
        enc, lin = self._weights(x, sae)
        if enc is not None:
            W, b, thr, lat = enc
            if thr is not None:  # threshold architectures: only these latents' pre-activations
                pre = sae.encoder_input(x) @ W + b
                f = torch.relu(pre) * (pre > thr)
            else:  # topk: a latent's membership depends on all the others
                f = sae.encode(x)[..., lat]
        else:
            f = x
        if lin is None:
            return f.float().amax(-1)
        return torch.sigmoid(f @ lin[0] + lin[1]).float()


@dataclass(frozen=True, eq=False)
class Watch:
    """A policy watching one row: where its detector's score over ``threshold`` is a hit."""

    policy: str
    action: str
    detector: Detector
    threshold: float
    prompt: bool
    generated: bool


@dataclass(frozen=True)
class PolicyWhen:
    """The condition of a ``steer`` policy's edits: from the first token where the row's watch of
    policy ``policy`` hits on (``once``)."""

    policy: str
    once: bool = True


@dataclass
class Policy:
    """A loaded policy: its watch and, for ``steer``, the edits it makes (under ``PolicyWhen``)."""

    spec: PolicySpec
    watch: Watch
    latent_edits: list[LatentEdit] = field(default_factory=list)
    vector_edits: list[VectorEdit] = field(default_factory=list)


@dataclass
class PolicySet:
    """The server's policies (empty: none). ``apply`` adds them to a request's plan."""

    policies: list[Policy] = field(default_factory=list)
    audit_text: bool = False

    def names(self) -> list[str]:
        return [p.spec.name for p in self.policies]

    def __len__(self) -> int:
        return len(self.policies)

    def apply(self, plan: InterventionPlan, disable: set[str] | frozenset = frozenset()) -> InterventionPlan:
        """``plan`` with every policy not in ``disable`` added: its watch, and its steer edits."""
        active = [p for p in self.policies if p.spec.name not in disable]
        if not active:
            return plan
        return InterventionPlan(
            latent_edits=[*plan.latent_edits, *(e for p in active for e in p.latent_edits)],
            vector_edits=[*plan.vector_edits, *(v for p in active for v in p.vector_edits)],
            watches=[*plan.watches, *(p.watch for p in active)],
        )


def read_policy_file(path: str | os.PathLike) -> PolicyFile:
    """The policies file at ``path`` (``.yaml``/``.yml``: YAML, else JSON), validated.

    Raises:
        PolicyError: unreadable, not JSON/YAML, or a field that does not validate (named).
    """
    p = Path(path)
    try:
        data = read_document(p)
    except OSError as e:
        raise PolicyError([], f"cannot read the policies file {str(p)!r}: {e.strerror or e}") from None
    except ConfigFileError as e:
        raise PolicyError([], str(e)) from None
    try:
        return PolicyFile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise PolicyError(list(err["loc"]), err["msg"]) from None


def load_policies(
    path: str | os.PathLike | None,
    configs: Mapping[str, SAEConfig],
    concepts: Callable[[str], Concept | None],
    resid_norm: Mapping[str, float] | None = None,
    hook_width: int | None = None,
) -> PolicySet:
    """The policies of the file at ``path`` (None: none), checked against the server.

    Args:
        configs: the served SAEs' configs by id.
        concepts: looks a named concept up (``ConceptStore.get``).
        resid_norm: mean residual norm by hook point (``StrengthUnits.resid_norm``), for ``subtract``.
        hook_width: the model's residual width, to check raw probes (None: checked against an SAE
            at the same hook point if there is one).

    Raises:
        PolicyError: a bad file (see ``read_policy_file``), an unknown concept or SAE, a latent out
            of range, a missing or malformed probe file, a probe whose hook point or width does not
            fit the model, a ``steer`` the detector cannot give (``ablate``/``scale`` need SAE
            latents, ``subtract`` a raw probe and a known residual norm); ``loc`` names the field.
    """
    if path is None:
        return PolicySet()
    spec = read_policy_file(path)
    base = Path(path).parent
    out = PolicySet(audit_text=spec.audit_text)
    for i, ps in enumerate(spec.policies):
        loc = ["policies", i]
        det = _detector(ps.detector, base, configs, concepts, hook_width, loc + ["detector"])
        watch = Watch(ps.name, ps.action, det, float(ps.threshold), "prompt" in ps.watch, "generated" in ps.watch)
        pol = Policy(ps, watch)
        if ps.steer is not None:
            _steer_edits(pol, ps, det, resid_norm or {}, loc + ["steer"])
        out.policies.append(pol)
    return out


def _detector(d: DetectorSpec, base: Path, configs, concepts, hook_width, loc) -> Detector:
    def known_sae(sid: str, at: list) -> SAEConfig:
        if sid not in configs:
            raise PolicyError(at, f"unknown SAE {sid!r}; served SAEs: {', '.join(sorted(configs)) or 'none'}")
        return configs[sid]

    if d.kind == "concept":
        if d.concept is not None:
            concept = concepts(d.concept)
            if concept is None:
                raise PolicyError(loc + ["concept"], f"unknown concept {d.concept!r}; save it first (POST /v1/concepts)")
            edits = [e for e in concept.interventions if isinstance(e, LatentIntervention)]
            saes = {e.sae for e in edits}
            if len(saes) != 1:
                raise PolicyError(loc + ["concept"], f"concept {d.concept!r} has latent interventions on {len(saes)} SAEs; "
                                  "a concept detector reads the latents of exactly one")
            sid, latents, at = saes.pop(), [e.latent for e in edits], loc + ["concept"]
        else:
            sid, latents, at = d.sae, list(d.latents), loc + ["latents"]
        cfg = known_sae(sid, loc + ["sae"] if d.concept is None else loc + ["concept"])
        try:
            for lat in latents:
                check_latent(lat, cfg.d_sae, sid)
        except LatentRangeError as e:
            raise PolicyError(at, str(e)) from None
        return Detector("concept", cfg.hook_point, sid, torch.tensor(sorted(set(latents)), dtype=torch.long))
    path = Path(d.probe) if Path(d.probe).is_absolute() else base / d.probe
    try:
        probe = load_probe(path)
    except FileNotFoundError:
        raise PolicyError(loc + ["probe"], f"no probe file {d.probe!r} (next to the policies file)") from None
    except Exception as e:
        raise PolicyError(loc + ["probe"], f"probe file {d.probe!r} is not a probe: {type(e).__name__}: {e}") from None
    want = "sae" if d.kind == "sae_probe" else "raw"
    if probe.kind != want:
        raise PolicyError(loc + ["kind"], f"{d.probe!r} is a {probe.kind} probe, not a {want} one")
    try:
        hook_point_order(probe.hook_point)
    except HookPointError as e:
        raise PolicyError(loc + ["probe"], f"probe {d.probe!r}: {e}") from None
    n = probe.w.numel()
    if d.kind == "sae_probe":
        cfg = known_sae(probe.sae_id, loc + ["probe"])
        if cfg.hook_point != probe.hook_point:
            raise PolicyError(loc + ["probe"], f"probe {d.probe!r} was trained at {probe.hook_point!r}, SAE "
                              f"{probe.sae_id!r} is at {cfg.hook_point!r}")
        try:
            for lat in probe.latents.tolist():
                check_latent(int(lat), cfg.d_sae, probe.sae_id)
        except LatentRangeError as e:
            raise PolicyError(loc + ["probe"], str(e)) from None
        return Detector("sae_probe", cfg.hook_point, probe.sae_id, probe=probe)
    width = hook_width or next((c.d_in for c in configs.values() if c.hook_point == probe.hook_point), None)
    if width is not None and n != width:
        raise PolicyError(loc + ["probe"], f"probe {d.probe!r} reads {n} values; {probe.hook_point!r} has {width}")
    return Detector("raw_probe", probe.hook_point, None, probe=probe)


def _steer_edits(pol: Policy, ps: PolicySpec, det: Detector, resid_norm: Mapping[str, float], loc: list) -> None:
    when = PolicyWhen(ps.name)
    st = ps.steer
    if st.op in ("ablate", "scale"):
        if det.kind == "concept":
            latents = det.latents.tolist()
        elif det.kind == "sae_probe":
            latents = [int(lat) for lat, w in zip(det.probe.latents.tolist(), det.probe.w.tolist()) if w > 0]
        else:
            raise PolicyError(loc + ["op"], f"{st.op} edits SAE latents; a raw_probe detector has none (use subtract)")
        op, value = ("ablate", 0.0) if st.op == "ablate" or st.value == 0 else ("scale", float(st.value))
        pol.latent_edits = [LatentEdit(det.sae_id, int(lat), op, value, "all", when) for lat in latents]
        return
    if det.kind != "raw_probe":
        raise PolicyError(loc + ["op"], "subtract removes a raw probe's direction; use ablate or scale for SAE latents")
    norm = resid_norm.get(det.hook_point)
    if not norm or not math.isfinite(norm):
        raise PolicyError(loc + ["op"], f"no mean residual norm is known at {det.hook_point!r} (no SAE with latent statistics there)")
    direction = det.probe.w.double() / det.probe.std.double()  # the probe's gradient in activation space
    pol.vector_edits = [VectorEdit(det.hook_point, resid_norm_vector(-direction, st.strength, norm), "all", when)]


# -- what fired ---------------------------------------------------------------------------------
@dataclass
class Hit:
    """A watch over its threshold at one token: ``row`` of the batch, ``abs_pos`` the token's
    index in the row's prompt + completion."""

    row: int
    policy: str
    action: str
    abs_pos: int
    score: float


class SafetyReport:
    """One row's hits, per policy, as the wire's ``PolicyHit`` list (``to_wire``)."""

    def __init__(self):
        self.by_policy: dict[str, dict] = {}

    def add(self, hit: Hit, prompt_len: int) -> None:
        r = self.by_policy.setdefault(hit.policy, {"policy": hit.policy, "action": hit.action, "hits": 0,
                                                   "max_score": -math.inf, "tokens": []})
        r["hits"] += 1
        r["max_score"] = max(r["max_score"], hit.score)
        if len(r["tokens"]) < MAX_REPORTED_TOKENS:
            gen = hit.abs_pos >= prompt_len
            r["tokens"].append({"position": "generated" if gen else "prompt",
                                "index": hit.abs_pos - prompt_len if gen else hit.abs_pos, "score": round(hit.score, 4)})

    def to_wire(self) -> list[dict]:
        return [dict(r, max_score=round(r["max_score"], 4)) for r in self.by_policy.values()]

    def __bool__(self) -> bool:
        return bool(self.by_policy)


def refusal_cut(hits: list[Hit], prompt_len: int) -> int | None:
    """Where a row's completion stops for ``hits`` of one forward: the number of generated tokens
    kept (0 for a hit in the prompt), or None if no ``refuse`` policy hit."""
    cut = [max(0, h.abs_pos - prompt_len) for h in hits if h.action == "refuse"]
    return min(cut) if cut else None


def apply_hits(hits: list[Hit], reports: list[SafetyReport], prompt_lens: list[int], live=lambda row: True) -> dict[int, int]:
    """One forward's ``hits`` added to their rows' ``reports`` (rows for which ``live(row)`` is
    false skipped: they ended before this forward). Returns the rows a ``refuse`` hit ends, each
    with the number of generated tokens it keeps (``refusal_cut``)."""
    by_row: dict[int, list[Hit]] = {}
    for h in hits:
        if live(h.row):
            by_row.setdefault(h.row, []).append(h)
    cuts = {}
    for b, hs in by_row.items():
        for h in hs:
            reports[b].add(h, prompt_lens[b])
        cut = refusal_cut(hs, prompt_lens[b])
        if cut is not None:
            cuts[b] = cut
    return cuts
