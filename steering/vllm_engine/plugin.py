"""Per-request SAE steering inside upstream vLLM (V1 model runner, ``enforce_eager``): the
``vllm.general_plugins`` entry point ``register``, the steered architecture
``SaeSteerLlamaForCausalLM`` and the worker extension ``SaeSteerWorkerExtension``.

How one step is steered:

1. A request carries its steering spec in ``SamplingParams.extra_args["saesteer"]``: one JSON
   string ``{"interventions": [...]}`` in the wire schema (``saesteer_client.schema``), which
   ``vllm_xargs`` can carry over HTTP too (strings only, no nested objects), or, from our own
   server's engine (``engine.VllmEngine``, vLLM in the same process), the ``InterventionPlan``
   its text worker built. ``steer_request``
   builds the sampling extras and the prompt's ``cache_salt`` (prefix caching must never share KV
   between requests steered differently).
2. The model (chosen with ``hf_overrides={"architectures": ["SaeSteerLlamaForCausalLM"]}``) is
   vLLM's own Llama; at construction it loads the SAEs that ``additional_config["saesteer"]["saes"]``
   names (``--sae`` specs) into the worker, outside the module tree (vLLM's loader accepts no
   parameter the checkpoint lacks), and gives every decoder layer the ``_SteerAfter`` mixin.
3. Each step, the runner's ``_model_forward`` (wrapped once per process, acting only for models
   that carry ``saesteer_state``) maps every token of the flat batch to its request: row i of
   ``input_batch.req_ids`` owns tokens ``[query_start_loc[i], query_start_loc[i+1])``; tokens past
   the last row are padding. The request's plan is built once (``steering.plan.build_plan``, the
   built-in engine's code) and cached by request id until the request leaves ``runner.requests``.
   The step gets a ``steering.core.SteeringBatch`` over the steered requests' plans and a flat
   ``StepPositions``: each token's plan row (-1: none), its absolute position (vLLM's
   ``positions``) and its request's prompt length.
4. After decoder layer L vLLM holds the residual stream as the pair ``(h, r)`` (the add is
   deferred to the next layer's norm). Where the step edits ``blocks.L.hook_resid_post`` the layer
   forms ``x = h + r``, lets the steering core compute the edited stream (sparse SAE edit, error
   term kept) and returns ``(h + (x' - x), r)``: the edit enters one member of the pair only, and
   tokens of unsteered requests get an exact zero.

Limits of this first piece: the V1 runner only (CPU builds run it; GPU builds default to the
second runner, which never calls ``_model_forward`` the same way), compilation mode NONE
(``enforce_eager=True``; a traced graph would bake one step's Python in, so other modes are
refused at model construction), Llama-architecture models, hook points ``blocks.L.hook_resid_post``,
no read-out and no safety policies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from vllm.model_executor.models.llama import LlamaForCausalLM

from saesteer.sae.sources import parse_sae_spec
from saesteer.steering.core import SteeringBatch, StepPositions
from saesteer.steering.plan import InterventionPlan, PlanError, build_plan

log = logging.getLogger("saesteer.vllm")

ARCH = "SaeSteerLlamaForCausalLM"
"""The architecture name that selects the steered model (``hf_overrides``)."""
EXTRA_KEY = "saesteer"
"""The ``SamplingParams.extra_args`` key (and ``vllm_xargs`` field) holding a request's spec."""
CONFIG_KEY = "saesteer"
"""The ``additional_config`` key of the plugin's settings: ``{"saes": [SAE specs]}``."""
WORKER_EXTENSION = "saesteer.steering.vllm_engine.plugin.SaeSteerWorkerExtension"
"""The ``worker_extension_cls`` (``--worker-extension-cls``) that answers ``saesteer_*`` RPCs."""


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register ``SaeSteerLlamaForCausalLM`` (lazily, by
    name; vLLM calls this in every process it starts, so it must be idempotent)."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, f"{__name__}:SaeSteerLlamaForCausalLM")


# -- the request side ---------------------------------------------------------------------------

def spec_json(interventions: Sequence[Any]) -> str:
    """A request's spec as the canonical JSON string carried in ``extra_args`` (wire models or
    plain dicts of the wire schema; key order fixed, so equal specs give equal strings)."""
    items = [iv.model_dump(mode="json", exclude_none=True) if hasattr(iv, "model_dump") else iv for iv in interventions]
    return json.dumps({"interventions": items}, sort_keys=True, separators=(",", ":"))


def cache_salt(spec: str, tag: str = "") -> str | None:
    """The prompt's ``cache_salt`` for a steered request (None for an idle one, which shares
    prefix-cache blocks with plain traffic): a hash of the spec and ``tag`` (model and SAE
    revisions), 32 hex characters. A spec with a ``once_fired`` condition gets a salt of its own
    (a random one): whether the condition has fired is not in the KV cache, so a request that
    reused another's cached prompt blocks would start with the condition unfired."""
    interventions = json.loads(spec).get("interventions")
    if not interventions:
        return None
    if any((iv.get("when") or {}).get("mode") == "once_fired" for iv in interventions):
        return uuid.uuid4().hex
    return hashlib.sha256(f"{tag}\0{spec}".encode()).hexdigest()[:32]


def steer_request(token_ids: list[int], interventions: Sequence[Any], tag: str = "") -> tuple[dict, dict]:
    """``(prompt, extra_args)`` for one steered request: a ``TokensPrompt`` dict (with its
    ``cache_salt`` where it is steered) and the ``SamplingParams.extra_args`` carrying the spec."""
    spec = spec_json(interventions)
    prompt: dict = {"prompt_token_ids": list(token_ids)}
    salt = cache_salt(spec, tag)
    if salt is not None:
        prompt["cache_salt"] = salt
    return prompt, {EXTRA_KEY: spec}


def plan_from_spec(spec: str, configs, units=None, hook_widths: dict[str, int] | None = None) -> InterventionPlan:
    """The plan of a spec string (``spec_json``'s form), checked as ``build_plan`` checks a
    request of the built-in engine. The front end calls it to refuse a bad spec with a 422 before
    the request reaches vLLM (a forward that raises kills the engine).

    Raises:
        PlanError: an intervention that does not fit the SAEs (``loc`` names it).
        ValueError: a string that is not a spec (pydantic's ``ValidationError``, bad JSON).
    """
    from pydantic import TypeAdapter

    from saesteer_client.schema import Intervention

    doc = json.loads(spec)
    ivs = TypeAdapter(list[Intervention]).validate_python(doc.get("interventions", []))
    return build_plan(ivs, configs, hook_widths=hook_widths, units=units)


# -- the worker side ----------------------------------------------------------------------------

@dataclass
class _Step:
    """What the forward in progress steers: the batch of the steered requests' plans and the flat
    token layout (``StepPositions`` [1, tokens])."""

    batch: SteeringBatch
    positions: StepPositions
    req_ids: list[str]
    tokens: int


@dataclass
class SteeringState:
    """The worker's steering state, shared by the model and its layers (a plain object, not a
    module: nothing of it is a checkpoint parameter).

    Attributes:
        saes: the loaded SAEs by id (float32, on the model's device).
        configs, units: their configs and strength units (``SAEPool``'s), for ``plan_from_spec``.
        hook_widths: the hook points a raw vector may target (every ``blocks.L.hook_resid_post``).
        plans: request id -> (spec string, plan or None where the spec is idle or was refused).
        memory: request id -> ``once_fired`` conditions' state, carried across steps.
        counters: steps, steered_steps, steered_tokens (edited layer calls x tokens), refused
            specs, mismatches (a layer saw another token count than the runner prepared).
    """

    saes: dict
    configs: dict
    units: Any
    device: torch.device
    hook_widths: dict = field(default_factory=dict)
    plans: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    step: _Step | None = None
    counters: dict = field(default_factory=lambda: dict.fromkeys(
        ("steps", "steered_steps", "steered_tokens", "refused", "mismatches"), 0))
    _cached: tuple | None = None

    def _plan(self, req_id: str, sampling_params) -> InterventionPlan | None:
        spec = (getattr(sampling_params, "extra_args", None) or {}).get(EXTRA_KEY)
        known = self.plans.get(req_id)
        if known is not None and (known[0] is spec or (isinstance(spec, str) and known[0] == spec)):
            return known[1]
        plan = None
        if isinstance(spec, InterventionPlan):  # built and checked by our own text worker (engine.VllmEngine)
            plan = spec or None
        elif spec:
            try:
                plan = plan_from_spec(spec, self.configs, self.units, self.hook_widths) or None
            except (PlanError, ValueError) as e:  # never raise in the forward: it kills the engine
                self.counters["refused"] += 1
                log.error("saesteer: request %s: steering spec refused, left unsteered: %s", req_id, e)
        self.plans[req_id] = (spec, plan)
        return plan

    def prepare(self, runner, positions: torch.Tensor) -> None:
        """Map the step's tokens to the requests' plans (V1 runner, after ``_prepare_inputs``)."""
        self.counters["steps"] += 1
        self.step = None
        ib = runner.input_batch
        live = runner.requests
        for rid in [r for r in self.plans if r not in live]:  # finished or aborted
            self.plans.pop(rid, None)
            self.memory.pop(rid, None)
        n = ib.num_reqs
        req_ids = list(ib.req_ids[:n])
        plans, keys, prompt_lens = [], [], []
        plan_row = np.full(n, -1, dtype=np.int64)
        for i, rid in enumerate(req_ids):
            req = live.get(rid)
            plan = self._plan(rid, req.sampling_params) if req is not None else None
            if plan:
                if getattr(req, "num_computed_tokens", None) == 0:
                    # a first prefill, or a preempted request recomputed from its first token: its
                    # once_fired conditions start over (they fire again where they first fired)
                    self.memory.pop(rid, None)
                plan_row[i] = len(plans)
                plans.append(plan)
                keys.append(rid)
                prompt_lens.append(req.num_prompt_tokens)
        if not plans:
            return
        qsl = np.asarray(runner.query_start_loc.np[: n + 1], dtype=np.int64)
        token_rows = np.repeat(plan_row, np.diff(qsl))
        total = int(positions.shape[-1])
        rows = torch.full((1, total), -1, dtype=torch.long)
        rows[0, : min(total, token_rows.size)] = torch.from_numpy(token_rows[:total])
        abs_pos = positions.reshape(-1)[:total].to(device=self.device, dtype=torch.long).view(1, total)
        key = tuple(keys)
        if self._cached is None or self._cached[0] != key:
            batch = SteeringBatch(plans, self.saes, memory=[self.memory.setdefault(k, {}) for k in keys], device=self.device)
            self._cached = (key, batch)
        pos = StepPositions(abs_pos=abs_pos, prompt_len=torch.tensor(prompt_lens, dtype=torch.long, device=self.device),
                            rows=rows.to(self.device))
        self.step = _Step(self._cached[1], pos, keys, total)
        self.counters["steered_steps"] += 1

    def finish(self) -> None:
        """After the forward: carry the conditions' state, forget the step."""
        step, self.step = self.step, None
        if step is not None:
            step.batch.save([self.memory.setdefault(k, {}) for k in step.req_ids])

    def edit(self, hook_point: str, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``h`` with the step's edit at ``hook_point`` added ((h, r) after the block; unchanged
        where nothing is edited there)."""
        step = self.step
        if step is None or hook_point not in step.batch.hook_points:
            return h
        if h.shape[0] != step.tokens:
            self.counters["mismatches"] += 1
            log.error("saesteer: %s saw %d tokens, the runner prepared %d: not steered", hook_point, h.shape[0], step.tokens)
            return h
        x = h.float() + r.float()  # the stream after the block, summed in float32 as vLLM's add-norm does
        out = step.batch.apply(hook_point, x.unsqueeze(0), step.positions)
        if out is None:
            return h
        self.counters["steered_tokens"] += int((step.positions.rows >= 0).sum())
        return h + (out[0] - x).to(h.dtype)


class _SteerAfter:
    """Mixed into a decoder layer: after the layer, its ``blocks.L.hook_resid_post`` edit."""

    _saesteer_state: SteeringState
    _saesteer_hook: str

    def forward(self, positions, hidden_states, residual, *args, **kwargs):
        h, r = super().forward(positions, hidden_states, residual, *args, **kwargs)
        return self._saesteer_state.edit(self._saesteer_hook, h, r), r


def _steer_layers(layers: Iterable[nn.Module], start: int, state: SteeringState) -> int:
    """Give each real decoder layer (not a pipeline-parallel placeholder) the ``_SteerAfter``
    mixin, naming its hook point ``blocks.L.hook_resid_post``. Returns how many."""
    from vllm.model_executor.models.utils import PPMissingLayer

    n = 0
    for i, layer in enumerate(layers):
        if isinstance(layer, PPMissingLayer) or i < start:
            continue
        cls = type(layer)
        layer.__class__ = type(f"SaeSteer{cls.__name__}", (_SteerAfter, cls), {})
        layer._saesteer_state = state
        layer._saesteer_hook = f"blocks.{i}.hook_resid_post"
        n += 1
    return n


def _load_state(vllm_config) -> SteeringState:
    from saesteer.steering.pool import SAEPool

    settings = (vllm_config.additional_config or {}).get(CONFIG_KEY, {}) if isinstance(vllm_config.additional_config, dict) else {}
    device = torch.device(vllm_config.device_config.device)
    pool = SAEPool([parse_sae_spec(s) for s in settings.get("saes", [])], device=str(device))
    saes = pool.load_all()
    for sid, sae in saes.items():
        if not sae.cfg.hook_point.endswith(".hook_resid_post"):
            raise ValueError(f"SAE {sid!r}: hook point {sae.cfg.hook_point!r}; the vLLM engine steers blocks.L.hook_resid_post only")
    hf = vllm_config.model_config.hf_config
    widths = {f"blocks.{i}.hook_resid_post": int(hf.hidden_size) for i in range(int(hf.num_hidden_layers))}
    return SteeringState(saes=dict(saes), configs=dict(pool.configs), units=pool.units, device=device, hook_widths=widths)


def _check_config(vllm_config) -> None:
    """Refuse the settings under which this first piece would skip edits silently."""
    from vllm.config import CompilationMode

    mode = vllm_config.compilation_config.mode
    if mode != CompilationMode.NONE:
        raise ValueError(f"saesteer steering on vLLM needs enforce_eager=True for now (compilation mode {mode!r} "
                         "would trace one step's steering into the graph)")
    if getattr(vllm_config, "use_v2_model_runner", False):  # MRV2 (the GPU default) never calls the wrapped V1 method
        raise ValueError("saesteer steering on vLLM supports the V1 model runner only for now: set VLLM_USE_V2_MODEL_RUNNER=0")
    if getattr(vllm_config.parallel_config, "enable_dbo", False):
        raise ValueError("saesteer steering on vLLM does not support dual-batch overlap (enable_dbo)")


class SaeSteerLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama with per-request SAE steering after its decoder layers (see the module
    docstring). Weights, parameter names and ``load_weights`` are the Llama's own."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        _check_config(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.saesteer_state = _load_state(vllm_config)
        _steer_layers(self.model.layers, self.model.start_layer, self.saesteer_state)
        _wrap_runner()
        log.info("saesteer: steering %d SAEs (%s) on %s", len(self.saesteer_state.saes),
                 ", ".join(self.saesteer_state.saes) or "none", type(self).__name__)


_WRAPPED = "_saesteer_wrapped"


def _wrap_runner() -> None:
    """Wrap the V1 runner's ``_model_forward`` (documented as the method to override) once per
    process: before the model runs, the steered model's state maps the step's tokens to plans."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, _WRAPPED, False):
        return

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kw):
        state = getattr(getattr(self, "model", None), "saesteer_state", None)
        if state is None or positions is None:
            return original(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kw)
        state.prepare(self, positions)
        try:
            return original(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kw)
        finally:
            state.finish()

    setattr(_model_forward, _WRAPPED, True)
    GPUModelRunner._model_forward = _model_forward


class SaeSteerWorkerExtension:
    """``worker_extension_cls``: RPCs on every worker (``LLM.collective_rpc("saesteer_stats")``)."""

    def saesteer_stats(self) -> dict:
        """The worker's steering counters and SAE ids (empty for a model without steering)."""
        state = getattr(self.model_runner.get_model(), "saesteer_state", None)
        if state is None:
            return {}
        return {**state.counters, "saes": sorted(state.saes), "cached_plans": len(state.plans)}
