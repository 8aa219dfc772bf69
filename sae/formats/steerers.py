"""Concept Steerers k-sparse autoencoders (kim-dahye/steerers, arXiv 2501.19066).

Reference: kim-dahye/steerers@82326cf7, ``training/k_sparse_autoencoder.py`` (the model and its
checkpoint) and ``utils/hooks.py`` (how it steers). Notes: ``shared/formats.md`` section 7.

On disk: ``Checkpoints/<run>/final/config.json`` (``n_dirs_local`` = F, ``d_model`` = D, ``k``,
``auxk``, ...) and ``state_dict.pth`` = ``{"state_dict": {...}}`` with ``encoder.weight`` [F, D]
(no bias), ``decoder.weight`` [D, F], ``pre_bias`` [D], ``latent_bias`` [F] and the training
buffer ``stats_last_nonzero`` [F].

Numerics: ``pre = (x - pre_bias) @ encoder.weight.T + latent_bias``, ``z`` = each token's top-k
of ``pre`` with ReLU on the kept values, ``x_hat = z @ decoder.weight.T + pre_bias``: our
``topk`` with ``b_dec = pre_bias`` subtracted. (The paper's steering vector is
``strength * relu(pre) @ decoder.weight.T`` on the concept prompt, with no top-k and no bias;
that is a steering rule, not the SAE's forward pass.)
"""

from __future__ import annotations

import os

import torch

from ..io import SAEFormatError
from ..model import SAE, SAEConfig
from ._common import _as_dir, _build_sae, _check_tensors, _f64, _read_json, _require_keys, _resolve_dtype, _torch_load

CONFIG = "config.json"
WEIGHTS = "state_dict.pth"
DEFAULT_HOOK = "text_encoder.text_model.encoder.layers.9"
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


def load_steerers(
    path: str | os.PathLike,
    hook_point: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Load a Concept Steerers k-SAE (``config.json`` + ``state_dict.pth``) with its numerics.

    Reference: kim-dahye/steerers ``training/k_sparse_autoencoder.py``; formats.md section 7.
    ``state_dict.pth`` is read with ``torch.load(..., weights_only=True)``.

    Args:
        path: the checkpoint folder (``.../final``) or a file in it.
        hook_point: hook point (default ``text_encoder.text_model.encoder.layers.9``, the output of
            SD 1.4's CLIP text-encoder layer 9, and then model ``CompVis/stable-diffusion-v1-4``).
        device: where to put the parameters.
        dtype: parameter dtype (default: the stored dtype of ``encoder.weight``).

    Returns:
        A ``topk`` SAE (k from the config): W_enc [D, F] = ``encoder.weight.T``, b_enc [F] =
        ``latent_bias``, W_dec [F, D] = ``decoder.weight.T``, b_dec [D] = ``pre_bias``,
        ``apply_b_dec_to_input=True``.

    Raises:
        SAEFormatError: a missing file or config key (``n_dirs_local``, ``d_model``, ``k``),
            missing or extra tensors (an encoder bias would be one), shapes that disagree with
            the config, or k outside 1..F.
    """
    root = _as_dir(path)
    cfg_path, w_path = root / CONFIG, root / WEIGHTS
    doc = _read_json(cfg_path)
    _require_keys(doc, ["n_dirs_local", "d_model", "k"], cfg_path)
    F, D, k = int(doc["n_dirs_local"]), int(doc["d_model"]), int(doc["k"])
    if not 0 < k <= F:
        raise SAEFormatError(f"{cfg_path}: k={k} must be in 1..n_dirs_local={F}")
    blob = _torch_load(w_path, root)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise SAEFormatError(f"{w_path}: expected {{'state_dict': {{...}}}}, got {type(blob).__name__}")
    tensors = {n: v for n, v in state.items() if isinstance(v, torch.Tensor)}
    _check_tensors(
        tensors,
        {"encoder.weight": (F, D), "decoder.weight": (D, F), "pre_bias": (D,), "latent_bias": (F,)},
        w_path,
        ignored=("stats_last_nonzero",),
    )
    cfg = SAEConfig(
        architecture="topk",
        d_in=D,
        d_sae=F,
        k=k,
        apply_b_dec_to_input=True,
        input_scale=1.0,
        hook_point=hook_point or DEFAULT_HOOK,
        model_name="" if hook_point else DEFAULT_MODEL,
        metadata={
            "source_format": "steerers",
            "source_path": str(root),
            **{key: doc[key] for key in ("auxk", "auxk_coef", "dead_steps_threshold") if key in doc},
        },
    )
    return _build_sae(
        cfg,
        W_enc=_f64(tensors["encoder.weight"]).T,
        b_enc=_f64(tensors["latent_bias"]),
        W_dec=_f64(tensors["decoder.weight"]).T,
        b_dec=_f64(tensors["pre_bias"]),
        dtype=_resolve_dtype(dtype, tensors["encoder.weight"].dtype),
        device=device,
    )
