"""Gemma Scope JumpReLU SAEs (google/gemma-scope-{2b,9b,27b}-pt-{res,mlp,att}, 9b-it-res).

Reference: the Gemma Scope release (``layer_{L}/width_{W}/average_l0_{N}/params.npz``) and its
tutorial's ``JumpReLUSAE`` (reproduced by SAELens ``loading/pretrained_sae_loaders.py``,
``gemma_2`` loader). Notes: ``shared/formats.md`` section 4.

On disk: one ``params.npz`` with ``W_enc`` [D, F], ``W_dec`` [F, D], ``b_enc`` [F], ``b_dec`` [D]
and ``threshold`` [F] (per latent), float32; no config, the metadata is in the path.

Numerics: ``pre = x @ W_enc + b_enc`` (``b_dec`` is **not** subtracted, no input
normalisation), ``z = (pre > threshold) * relu(pre)``, ``x_hat = z @ W_dec + b_dec``: exactly
our ``jumprelu`` with ``apply_b_dec_to_input=False``.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..io import SAEFormatError
from ..model import SAE, SAEConfig
from ._common import _build_sae, _check_tensors, _f64, _resolve_dtype

PARAMS = "params.npz"
_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)")
_LAYER = re.compile(r"^layer_(\d+)$")
_WIDTH = re.compile(r"^width_(\d+)([km]?)$")
_L0 = re.compile(r"^average_l0_(\d+)$")


def parse_gemma_scope_path(path: str | os.PathLike) -> dict:
    """What the Gemma Scope path layout says: layer, width, average L0, model, site.

    ``.../gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz`` gives
    ``{"layer": 12, "width": ("16", "k"), "average_l0": 82, "model_name": "google/gemma-2-2b",
    "site": "res"}``; missing parts are absent from the dict (``embedding`` is True for
    ``embedding/...`` SAEs). Layout: the google/gemma-scope-* Hugging Face repos; model sizes
    as in SAELens's ``gemma_2`` loader (formats.md section 4).
    """
    info: dict = {}
    for part in Path(path).parts:
        if m := _LAYER.match(part):
            info["layer"] = int(m.group(1))
        elif m := _WIDTH.match(part):
            info["width"] = (m.group(1), m.group(2))
        elif m := _L0.match(part):
            info["average_l0"] = int(m.group(1))
        elif part == "embedding":
            info["embedding"] = True
        if m := _REPO.search(part):
            size, variant, site = m.groups()
            info["model_name"] = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
            info["site"] = site
    return info


def _width_matches(width: tuple[str, str], d_sae: int) -> bool:
    """``width_16k`` names 16384 latents, ``width_1m`` 1048576: the name is d_sae // 1000 (k) or // 10**6 (m)."""
    n, unit = int(width[0]), width[1]
    return {"": d_sae, "k": d_sae // 1000, "m": d_sae // 10**6}[unit] == n


def load_gemma_scope(
    path: str | os.PathLike,
    hook_point: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Load a Gemma Scope ``params.npz`` JumpReLU SAE with its exact numerics.

    Reference: google/gemma-scope ``params.npz`` layout and tutorial ``JumpReLUSAE``; SAELens
    ``gemma_2`` loader (``loading/pretrained_sae_loaders.py``); formats.md section 4.

    Args:
        path: the ``params.npz`` file or the folder holding it.
        hook_point: hook point. Default, from the path: ``layer_L`` -> ``blocks.L.hook_resid_post``
            (``blocks.L.hook_mlp_out`` under a ``gemma-scope-*-mlp`` folder,
            ``blocks.L.attn.hook_z`` under ``-att``, where the SAE reads z flattened over heads);
            empty for ``embedding/`` SAEs (they read Gemma's embeddings after its sqrt(d_model)
            scaling) or when the path names no layer.
        device: where to put the parameters.
        dtype: parameter dtype (default: the stored float32).

    Returns:
        A ``jumprelu`` SAE, ``apply_b_dec_to_input=False``: W_enc [D, F], b_enc [F], W_dec
        [F, D], b_dec [D], threshold [F] as stored (keys ``w_*`` are read as ``W_*``).

    Raises:
        SAEFormatError: no ``params.npz``, an unreadable file, a missing tensor (``threshold``
            included), inconsistent shapes, or a ``width_*`` folder that disagrees with F.
    """
    p = Path(path)
    npz = p if p.is_file() else p / PARAMS
    if not npz.is_file():
        raise SAEFormatError(f"{p}: no {PARAMS}")
    try:
        with np.load(npz, allow_pickle=False) as f:
            arrays = {(("W" + k[1:]) if k.startswith("w_") else k): np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise SAEFormatError(f"{npz}: unreadable npz file ({e})") from e
    if "W_enc" not in arrays or arrays["W_enc"].ndim != 2:
        raise SAEFormatError(f"{npz}: missing tensors ['W_enc'] (a [d_in, d_sae] matrix)")
    d_in, d_sae = arrays["W_enc"].shape
    _check_tensors(
        arrays,
        {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)},
        npz,
    )
    info = parse_gemma_scope_path(npz.resolve().parent)
    if "width" in info and not _width_matches(info["width"], d_sae):
        raise SAEFormatError(
            f"{npz}: folder width_{''.join(info['width'])} disagrees with the tensors' d_sae={d_sae}"
        )
    if hook_point is None:
        site = info.get("site", "res")
        if info.get("embedding") or "layer" not in info:
            hook_point = ""
        elif site == "mlp":
            hook_point = f"blocks.{info['layer']}.hook_mlp_out"
        elif site == "att":
            hook_point = f"blocks.{info['layer']}.attn.hook_z"
        else:
            hook_point = f"blocks.{info['layer']}.hook_resid_post"
    stored = torch.from_numpy(np.ascontiguousarray(arrays["W_enc"][:1, :1])).dtype
    meta = {"source_format": "gemma_scope", "source_path": str(npz)}
    meta.update({k: v for k, v in info.items() if k in ("layer", "average_l0", "site", "embedding")})
    if "width" in info:
        meta["width"] = "".join(info["width"])
    cfg = SAEConfig(
        architecture="jumprelu",
        d_in=int(d_in),
        d_sae=int(d_sae),
        apply_b_dec_to_input=False,
        input_scale=1.0,
        hook_point=hook_point,
        model_name=info.get("model_name", ""),
        metadata=meta,
    )
    return _build_sae(
        cfg,
        W_enc=_f64(arrays["W_enc"]),
        b_enc=_f64(arrays["b_enc"]),
        W_dec=_f64(arrays["W_dec"]),
        b_dec=_f64(arrays["b_dec"]),
        threshold=_f64(arrays["threshold"]),
        dtype=_resolve_dtype(dtype, stored),
        device=device,
    )
