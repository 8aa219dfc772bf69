"""``VllmEngine``: the text worker's ``steering.engine.Engine`` on upstream vLLM.

vLLM's ``LLMEngine`` runs in the text worker's own process (engine core in-process,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``; vLLM's executor still starts its own workers for tensor
parallel), so a row's ``InterventionPlan``, already built and checked by the worker's
``prepare`` (named concepts and mixes resolved, policies left out: see below), travels to the model
in memory, as ``SamplingParams.extra_args["saesteer"]``; the plugin (``plugin.py``) steers each
token by its request's plan with the same steering core as the built-in engine. One ``step`` is one
``LLMEngine.step``: vLLM schedules (continuous batching, chunked prefill, paged KV cache), we map
its delta outputs to ``RowEvent``s.

What differs from the built-in engine, by design:
- sampling is vLLM's: greedy tokens agree (tested), seeded sampling draws other random numbers;
- prefix caching: every steered row gets its own ``cache_salt``, so steered KV is never shared,
  not even between two requests steered alike; unsteered rows share blocks as plain vLLM does;
- no read-out (the text worker answers 422; ``read_out`` raises ``NotImplementedError``) and no safety
  policies (the server refuses ``--policies`` with ``--engine vllm`` at start);
- non-finite logits are not detected per row (vLLM samples from what it gets).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from saesteer.steering.engine import CANCELLED, RowEvent
from saesteer.steering.generate import TIMEOUT, GenerationSpec


@dataclass
class _Row:
    key: str
    spec: GenerationSpec
    tokens: list[int] = field(default_factory=list)
    text: str = ""


def vllm_engine_args(model_dir: str, saes: Sequence[str], *, dtype: str = "float32", device: str = "cpu",
                     max_num_seqs: int = 16, max_model_len: int = 4096, extra: dict | None = None) -> dict:
    """The ``vllm.EngineArgs`` keywords of a steered engine: the plugin's architecture, its SAE
    specs in ``additional_config``, eager mode (the one the plugin steers), then ``extra`` (the
    ``--vllm-args`` setting: ``tensor_parallel_size``, ``gpu_memory_utilization``, ...) over them.

    Args:
        model_dir: a folder of safetensors (``export.export_safetensors`` for the GGUF default) or a
            hub id.
        saes: ``--sae`` specs (``sae.sources.parse_sae_spec``'s form), loaded in every vLLM worker.
    """
    from . import plugin

    kw: dict[str, Any] = dict(
        model=model_dir, dtype=dtype, enforce_eager=True, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
        hf_overrides={"architectures": [plugin.ARCH]}, additional_config={plugin.CONFIG_KEY: {"saes": list(saes)}},
        worker_extension_cls=plugin.WORKER_EXTENSION, disable_log_stats=True,
    )
    if device.startswith("cuda") and ":" in device:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", device.split(":", 1)[1])
    kw.update(extra or {})
    return kw


class VllmEngine:
    """``steering.engine.Engine`` on vLLM's ``LLMEngine`` (see the module docstring).

    Args:
        engine_args: ``vllm.EngineArgs`` keywords (``vllm_engine_args``).

    Raises:
        ValueError: settings the plugin cannot steer under (compilation modes, MRV2, DBO), from
            the model's construction.
    """

    def __init__(self, engine_args: dict):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the plan objects stay in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (vLLM's default is 4)
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        from . import plugin

        plugin.register()
        self.llm = LLMEngine.from_engine_args(EngineArgs(**engine_args))
        self.rows: dict[str, _Row] = {}

    # -- Engine ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> list[str]:
        return list(self.rows)

    def add_many(self, rows: list[tuple[str, GenerationSpec]]) -> list[RowEvent]:
        """Queue ``rows`` in vLLM (their prefill runs in the next ``step``s, chunked as vLLM
        schedules it): each row's first event carries no token yet."""
        events = []
        for key, spec in rows:
            prompt, params = self._request(spec)
            self.llm.add_request(key, prompt, params)
            self.rows[key] = _Row(key, spec)
            events.append(RowEvent(key, None, ""))
        return events

    def step(self) -> list[RowEvent]:
        """One ``LLMEngine.step``: an event per row that gained tokens or ended, then rows past
        their deadline (ended with ``TIMEOUT``)."""
        events = []
        for out in self.llm.step():
            row = self.rows.get(out.request_id)
            if row is None or not out.outputs:
                continue
            events.append(self._event(row, out.outputs[0]))
        now = time.monotonic()
        for row in [r for r in self.rows.values() if r.spec.deadline is not None and now > r.spec.deadline]:
            self.llm.abort_request([row.key])
            events.append(self._end(row, "error", TIMEOUT))
        return events

    def cancel(self, key: str) -> RowEvent | None:
        row = self.rows.get(key)
        if row is None:
            return None
        self.llm.abort_request([key])
        return self._end(row, "error", CANCELLED)

    def read_out(self, sae, input_ids: list[int], top_k: int, latents: Sequence[int]):
        """Not built yet: the text worker answers a read-out with 422 before it would load the SAE here."""
        raise NotImplementedError("latent read-out is not available on the vLLM engine yet; serve with --engine builtin")

    def stats(self) -> dict:
        """The plugin's counters from every vLLM worker (``SaeSteerWorkerExtension.saesteer_stats``)."""
        return self.llm.collective_rpc("saesteer_stats")

    def close(self) -> None:
        """Stop vLLM's engine core and workers."""
        core = getattr(self.llm, "engine_core", None)
        if core is not None:
            core.shutdown()

    # -- the parts ------------------------------------------------------------------------------------
    def _request(self, spec: GenerationSpec) -> tuple[dict, Any]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from . import plugin

        prompt: dict = {"prompt_token_ids": list(spec.input_ids)}
        extra = None
        if spec.plan:
            extra = {plugin.EXTRA_KEY: spec.plan}
            prompt["cache_salt"] = uuid.uuid4().hex  # steered KV is never shared (module docstring)
        params = SamplingParams(
            max_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed,
            repetition_penalty=spec.repetition_penalty, frequency_penalty=spec.frequency_penalty,
            presence_penalty=spec.presence_penalty, stop=list(spec.stop) or None, ignore_eos=spec.ignore_eos,
            output_kind=RequestOutputKind.DELTA, extra_args=extra,
        )
        return prompt, params

    def _event(self, row: _Row, out) -> RowEvent:
        new = list(out.token_ids)
        row.tokens += new
        row.text += out.text
        if out.finish_reason is None:
            return RowEvent(row.key, new[-1] if new else None, out.text, release=new if len(new) > 1 else None)
        del self.rows[row.key]
        reason = {"stop": "stop", "length": "length"}.get(out.finish_reason, "error")
        error = None if reason != "error" else f"vllm:{out.finish_reason}"
        return RowEvent(row.key, new[-1] if new else None, out.text, reason, error, tokens=list(row.tokens),
                        full_text=row.text, release=new if len(new) != 1 else None)

    def _end(self, row: _Row, reason: str, error: str) -> RowEvent:
        self.rows.pop(row.key, None)
        return RowEvent(row.key, None, "", reason, error, tokens=list(row.tokens), full_text=row.text)
