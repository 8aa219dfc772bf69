"""What the workers that hold the text model share (``ModelAPI``): loading the model and the SAE
pool, the safety policies, rendering and checking a request against the loaded model
(``prepare``: a ``Prepared`` request or a ``Rejected`` one with its 4xx), and building responses.

Lifecycle (LitServe 0.2.19, ``shared/litserve.md``): ``setup`` loads the model once per worker,
and the SAEs too unless a memory budget (``sae_memory_mb``) makes the worker's ``SAEPool`` load
them on first use, evicting the least recently used. A request that does not fit the loaded model
(unknown SAE, latent out of range, too many tokens, SAEs over the memory budget, ...) becomes a
``Rejected`` that answers only that request, never its neighbours. Only plain data crosses the
process boundary.
"""

# No `from __future__ import annotations` here: LitServe reads the real annotation of
# decode_request's `request` parameter as the FastAPI body type.
import hashlib
import logging
from dataclasses import dataclass

import litserve as ls
from saesteer_client.schema import Completion, ErrorItem, GenerateRequest, GenerateResponse, Usage

from saesteer.steering.pool import SAEPool

from .config import ServerSettings
from .runtime import release_free_memory

log = logging.getLogger("saesteer.server")

@dataclass
class Rejected:
    """A request refused in the worker: HTTP ``status`` and the field errors."""

    status: int
    detail: list[ErrorItem]

    @classmethod
    def field(cls, status: int, loc: list, msg: str, kind: str = "value_error") -> "Rejected":
        return cls(status, [ErrorItem(loc=loc, msg=msg, type=kind)])


@dataclass
class Counted:
    """A heavy route's answer (a response model or a ``Rejected``) with the work it cost, in token
    forward passes (``middleware.COST_HEADER``), which the token rate limit charges to the caller."""

    output: object
    cost: int


def encoded(output):
    """What a worker's ``encode_response`` returns for ``output``: the error response of a
    ``Rejected``, the JSON of a ``Counted`` answer with its cost in ``COST_HEADER``, or ``output``."""
    from starlette.responses import JSONResponse

    from .errors import error_response
    from .middleware import COST_HEADER

    headers = {}
    if isinstance(output, Counted):
        output, headers = output.output, {COST_HEADER: str(int(output.cost))}
    if isinstance(output, Rejected):
        return error_response(output.status, output.detail, headers)
    if headers:
        return JSONResponse(output.model_dump(mode="json"), headers=headers)
    return output


def row_failure(error: str, steered: bool, settings: ServerSettings) -> Rejected:
    """The answer to a request one of whose rows ended with ``error`` (``steering.generate``'s
    ``NON_FINITE``/``TIMEOUT``, the engine's ``CANCELLED``, or anything else); ``steered``: the
    request has interventions (then non-finite logits are its own doing: 422)."""
    from saesteer.steering.generate import NON_FINITE, TIMEOUT

    if error == NON_FINITE and steered:
        return Rejected.field(422, ["body", "interventions"],
                              "these interventions drove the model's activations to inf/NaN; use smaller values", "non_finite")
    if error == TIMEOUT:
        return Rejected.field(504, ["body", "max_new_tokens"],
                              f"generation took over {settings.generation_timeout:g} s (the server's "
                              "generation_timeout); ask for fewer tokens", "generation_timeout")
    return Rejected.field(500, ["body"], f"generation failed ({error})", "internal_error")


def response_of(steered, plain=None) -> GenerateResponse:
    """A ``GenerateResponse`` from the steered row's result and, with compare, the unsteered one's
    (objects with ``text``, ``tokens``, ``finish_reason``, ``safety`` and, the steered one,
    ``prompt_tokens``)."""
    return GenerateResponse(
        text=steered.text,
        tokens=steered.tokens,
        finish_reason=steered.finish_reason,
        safety=steered.safety,
        usage=Usage(prompt_tokens=steered.prompt_tokens, completion_tokens=len(steered.tokens),
                    total_tokens=steered.prompt_tokens + len(steered.tokens)),
        unsteered=Completion(text=plain.text, tokens=plain.tokens, finish_reason=plain.finish_reason,
                             safety=plain.safety) if plain else None,
    )


audit_log = logging.getLogger("saesteer.audit")


def request_fingerprint(request) -> str:
    """A short hash of a request's canonical JSON (a pydantic model): how the audit log names a
    request without writing its prompt."""
    return hashlib.sha1(request.model_dump_json().encode()).hexdigest()[:16]


def row_settings(r: GenerateRequest, deadline: float | None) -> dict:
    """The ``GenerationSpec`` fields a ``GenerateRequest`` sets for each of its rows (all but the
    prompt ids and the plan): length, sampling, penalties, stop strings, the ``deadline``
    (``time.monotonic()`` seconds)."""
    return dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, seed=r.seed,
                repetition_penalty=r.repetition_penalty, frequency_penalty=r.frequency_penalty,
                presence_penalty=r.presence_penalty, stop=list(r.stop), deadline=deadline, ignore_eos=r.ignore_eos)


def audit(fingerprint: str, results, with_text: bool = False) -> None:
    """One JSON log line (logger ``saesteer.audit``) per policy that fired on a request's rows:
    policy, action, hits, largest score, the request's fingerprint; the hit positions too, and the
    completion's text only ``with_text`` (the policies file's ``audit_text``). Never the prompt."""
    import json

    for role, res in zip(("steered", "unsteered"), results):
        for hit in getattr(res, "safety", None) or []:
            line = {"event": "policy_hit", "request": fingerprint, "role": role, "policy": hit["policy"],
                    "action": hit["action"], "hits": hit["hits"], "max_score": hit["max_score"],
                    "finish_reason": res.finish_reason,
                    "tokens": [(t["position"], t["index"]) for t in hit["tokens"]]}
            if with_text:
                line["text"] = res.text
            audit_log.warning(json.dumps(line))


@dataclass
class Prepared:
    """A request ready to generate: its rows (steered, plus unsteered with ``compare``)."""

    request: GenerateRequest
    input_ids: list[int]
    plan: object  # steering.plan.InterventionPlan, the server's policies included
    plain_plan: object = None  # with compare, the unsteered row's: the policies alone


class ModelAPI(ls.LitAPI):
    """A LitAPI whose workers hold the model and the SAE pool (``setup``) and render prompts.

    Args:
        settings: the server settings (model, SAEs, limits); picklable.
        saes: the SAE pool, configs read and nothing loaded yet (it is pickled into each worker,
            whose copy loads the weights); its budget should be ``settings.sae_memory_bytes``.
    """

    runtime_dir: str | None = None  # the server's runtime folder, where a subclass has one
    packs_linears = True
    """Whether this API's workers apply ``settings.pack_linears`` (``FeaturesAPI`` does not: concept
    search backpropagates through the model, which the packed kernels cannot)."""
    engine_worker = False
    """Whether this API's worker runs ``settings.engine`` (the text worker): with ``--engine vllm``
    it loads no transformers model, vLLM holds the weights."""

    def __init__(self, settings: ServerSettings, saes: SAEPool, **kwargs):
        from .concepts import ConceptStore

        super().__init__(**kwargs)
        self.settings = settings
        self.saes = saes
        self.concepts = ConceptStore(settings.concepts_dir)  # named concepts, read from their files

    def setup(self, device):
        import torch

        from saesteer.modeling.lm import hook_point_width, load_model
        from saesteer.steering.hooks import Steerer

        s = self.settings
        dev = s.device if s.device != "cpu" else device
        if s.engine == "vllm" and self.engine_worker:  # vLLM holds the weights and the SAEs; this worker keeps their tokenizer and configs
            self._setup_tables()
            return
        self.model, self.tokenizer = load_model(s.model, s.gguf_file, device=dev, dtype=getattr(torch, s.dtype))
        if s.pack_linears and self.packs_linears:
            from saesteer.modeling.cpu_kernels import speed_up

            info = speed_up(self.model, s.weights)
            log.info("fused %d blocks, packed %d linear layers (%s weights), %d blocks' decode step in TorchScript",
                     info["fused_blocks"], info["linears"], info["weights"], info["scripted_blocks"])
            release_free_memory()  # the unpacked weights
        self.saes.set_device(dev)
        if self.saes.budget_bytes is None:  # no budget: every SAE now, as without a pool
            self.saes.load_all()
        self.steerer = Steerer(self.model, self.saes)  # checks hook points from the configs
        self.hook_width = hook_point_width(self.model)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self._setup_policies()

    def _setup_tables(self) -> None:
        """For the vLLM engine: the model's tokenizer and config (no weights), the SAE configs and
        the hook points a plan may name (``blocks.L.hook_resid_post``, the ones the plugin steers)."""
        from types import SimpleNamespace

        from saesteer.steering.vllm_engine.export import vllm_model_dir
        from transformers import AutoConfig, AutoTokenizer

        self.model = None
        self.vllm_model_dir = vllm_model_dir(self.settings)
        self.tokenizer = AutoTokenizer.from_pretrained(self.vllm_model_dir)
        config = AutoConfig.from_pretrained(self.vllm_model_dir)
        self.hook_width = int(config.hidden_size)
        widths = {f"blocks.{i}.hook_resid_post": self.hook_width for i in range(int(config.num_hidden_layers))}
        self.steerer = SimpleNamespace(configs=dict(self.saes.configs), hook_widths=widths)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        self._setup_policies()

    def _setup_policies(self) -> None:
        self.policies = self.load_policies()  # checked at start by build_server: raises only if changed since
        self._policies_seen = self._policies_mark()
        if not audit_log.handlers:  # one JSON object per line on stderr, as the access log
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            audit_log.addHandler(handler)
            audit_log.propagate = False

    # -- safety policies ---------------------------------------------------------------------------
    def load_policies(self):
        """The policies of ``settings.policies`` checked against this worker's model and SAEs.

        Raises:
            saesteer.steering.policy.PolicyError: a bad file (see ``load_policies``).
        """
        from saesteer.steering.policy import load_policies

        return load_policies(self.settings.policies, self.saes.configs, self.concepts.get,
                             self.saes.units.resid_norm, self.hook_width)

    def record_hits(self, request, results) -> None:
        """Audit a finished request's policy hits (``audit``, naming the request by its
        ``request_fingerprint``) and count them per policy and action (``/metrics``'
        ``saesteer_policy_hits_total``, ``runtime.worker_metrics``; counted per worker process, so
        a restarted worker's counts stay counted)."""
        hits = [h for res in results if res is not None for h in (getattr(res, "safety", None) or [])]
        if not hits:
            return
        from .runtime import worker_metrics

        audit(request_fingerprint(request), results, self.policies.audit_text)
        counter = worker_metrics().policy_hits
        for h in hits:
            counter.labels(policy=h["policy"], action=h["action"]).inc()

    def _policies_mark(self):
        """The reload signal's state (``runtime.PolicyReload``); None without a policies file."""
        from .runtime import PolicyReload

        return PolicyReload(self.runtime_dir).mark() if self.settings.policies else None

    def refresh_policies(self) -> None:
        """Reload the policies if the HTTP process signalled a reload (it checked the file first);
        a file that fails here keeps the policies in force (logged)."""
        mark = self._policies_mark()
        if mark == self._policies_seen:
            return
        self._policies_seen = mark
        try:
            self.policies = self.load_policies()
            log.warning("policies reloaded: %s", ", ".join(self.policies.names()) or "none")
        except Exception as e:
            log.error("policies reload failed, the previous ones stay: %s", e)

    def render(self, request, extra_tokens: int, extra_field: str) -> list[int] | Rejected:
        """The token ids of ``request``'s ``prompt`` or ``messages`` (chat template, assistant turn
        opened), or why they cannot be served: no tokens, over ``max_prompt_tokens``, or with
        ``extra_tokens`` more (named by ``extra_field``) over ``max_total_tokens`` or the model's
        context."""
        from saesteer.steering.generate import render_prompt

        messages = [m.model_dump() for m in request.messages] if request.messages is not None else None
        try:
            ids = render_prompt(self.tokenizer, request.prompt, messages)
        except Exception as e:  # a template that refuses these messages (e.g. role order)
            return Rejected.field(422, ["body", "messages"], f"chat template failed: {e}")
        field = "prompt" if request.prompt is not None else "messages"
        s = self.settings
        if not ids:
            return Rejected.field(422, ["body", field], "prompt renders to no tokens")
        if len(ids) > s.max_prompt_tokens:
            return Rejected.field(422, ["body", field], f"prompt is {len(ids)} tokens; the limit is {s.max_prompt_tokens}", "too_many_tokens")
        limit = min(s.max_total_tokens, self.max_positions or s.max_total_tokens)
        if len(ids) + extra_tokens > limit:
            return Rejected.field(
                422, ["body", extra_field],
                f"prompt ({len(ids)} tokens) + {extra_field} ({extra_tokens}) exceeds {limit}", "too_many_tokens",
            )
        return ids


    def prepare(self, request) -> "Prepared | Rejected":
        """``request`` (a ``GenerateRequest``) checked against the loaded model: its plan and prompt
        ids, or why it cannot be served (422: plan errors, SAEs over the memory budget, too many
        tokens). Raises only on unexpected errors."""
        from saesteer.steering.plan import InterventionPlan, PlanError, build_plan

        s = self.settings
        limit = min(s.max_total_tokens, self.max_positions or s.max_total_tokens)
        try:
            plan = build_plan(request.interventions, self.steerer.configs, self.steerer.hook_widths, self.saes.units,
                              max_position=limit, concepts=self.concepts.get)
        except PlanError as e:
            return Rejected(422, [e.item])
        self.refresh_policies()
        known = set(self.policies.names())
        for i, name in enumerate(request.disable_policies):
            if name not in known:
                return Rejected.field(422, ["body", "disable_policies", i], f"unknown policy {name!r}; this server's "
                                      f"policies: {', '.join(sorted(known)) or 'none'}", "not_found")
        off = set(request.disable_policies)
        plain = self.policies.apply(InterventionPlan(), off)
        plan = self.policies.apply(plan, off)
        if not self.saes.fits(plan.sae_ids()):
            need = sum(self.saes.nbytes(sid) for sid in plan.sae_ids()) / (1 << 20)
            return Rejected.field(
                422, ["body", "interventions"],
                f"the SAEs this request names ({', '.join(sorted(plan.sae_ids()))}) need {need:.1f} MiB "
                f"together; this server holds at most {self.saes.budget_bytes / (1 << 20):.1f} MiB of SAEs",
                "sae_memory",
            )
        ids = self.render(request, request.max_new_tokens, "max_new_tokens")
        if isinstance(ids, Rejected):
            return ids
        return Prepared(request, ids, plan, plain)
