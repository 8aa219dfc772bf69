"""EleutherAI sparsify SAEs (TopK SAEs and transcoders, one folder per hook point).

Reference: EleutherAI/sparsify@9d3b136c, ``sparsify/sparse_coder.py`` (``SparseCoder``,
``load_from_disk``, ``encode``, ``decode``), ``sparsify/fused_encoder.py`` and
``sparsify/config.py`` (``SparseCoderConfig``). Notes: ``shared/formats.md`` section 3.

On disk: ``<run>/<hookpoint>/cfg.json`` (``SparseCoderConfig`` fields + ``d_in``) and
``<run>/<hookpoint>/sae.safetensors`` with ``encoder.weight`` [F, D], ``encoder.bias`` [F],
``W_dec`` [F, D] (already our orientation) and ``b_dec`` [D]; the run's ``config.json`` (model,
dataset) sits in ``<run>``. F = ``num_latents`` or ``d_in * expansion_factor`` when that is 0.

Numerics: ``x' = x - b_dec`` (not for transcoders), ``z = topk_k(relu(x' @ encoder.weight.T +
encoder.bias))`` per token, ``x_hat = z @ W_dec + b_dec``. Top-k of ``relu(pre)`` equals ReLU of
the top-k of ``pre`` as a dense code, which is our ``topk``.

SAELens's ``sparsify`` loader maps ``W_dec -> W_dec.T`` ([D, F], which does not fit a [F, D]
parameter) and ``apply_b_dec_to_input = not normalize_decoder`` (False for the default
``normalize_decoder: true``), while sparsify always subtracts ``b_dec`` for SAEs; we follow
sparsify's own code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..io import SAEFormatError
from ..model import SAE, SAEConfig
from ._common import _as_dir, _build_sae, _check_tensors, _f64, _read_json, _require_keys, _resolve_dtype

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
RUN_CONFIG = "config.json"
# SparseCoderConfig defaults (sparsify/config.py)
DEFAULTS = {
    "activation": "topk",
    "expansion_factor": 32,
    "num_latents": 0,
    "k": 32,
    "normalize_decoder": True,
    "multi_topk": False,
    "skip_connection": False,
    "transcode": False,
}

_HOOKS = [
    (re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)$"), "blocks.{}.hook_resid_post"),
    (re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)\.mlp$"), "blocks.{}.hook_mlp_out"),
    (re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)\.(?:self_attn|attn)$"), "blocks.{}.hook_attn_out"),
]


def hook_from_hookpoint(name: str) -> str:
    """TransformerLens hook_point name for a sparsify hook-point folder name.

    ``layers.N`` / ``h.N`` (a decoder block's output) -> ``blocks.N.hook_resid_post``;
    ``layers.N.mlp`` -> ``blocks.N.hook_mlp_out``; ``layers.N.self_attn`` / ``h.N.attn`` ->
    ``blocks.N.hook_attn_out``; ``embed_tokens`` / ``wte`` -> ``hook_embed``; anything else is
    kept as is (a module path). The first and the embedding rules are SAELens's ``sparsify``
    loader's (``loading/pretrained_sae_loaders.py``); the folder names are sparsify's
    ``trainer.py`` hookpoints (formats.md section 3).
    """
    for pattern, template in _HOOKS:
        m = pattern.match(name)
        if m:
            return template.format(m.group(1))
    if name.split(".")[-1] in ("embed_tokens", "wte", "embed_in"):
        return "hook_embed"
    return name


def _hookpoint_folder(root: Path, hookpoint: str | None) -> Path:
    if (root / CFG).is_file() and hookpoint is None:
        return root
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and (d / CFG).is_file()) if root.is_dir() else []
    if hookpoint is not None:
        folder = root / hookpoint
        if not folder.is_dir():
            raise SAEFormatError(f"{root}: no hook-point folder {hookpoint!r} (found {found})")
        return folder
    if len(found) == 1:
        return root / found[0]
    if not found:
        raise SAEFormatError(f"{root}: no {CFG} + {WEIGHTS} here or in a hook-point sub-folder")
    raise SAEFormatError(f"{root}: several hook points {found}; choose one with hookpoint=")


def load_sparsify(
    path: str | os.PathLike,
    hookpoint: str | None = None,
    hook_point: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Load one sparsify SAE (or transcoder) with sparsify's numerics.

    Reference: EleutherAI/sparsify ``sparsify/sparse_coder.py`` (``SparseCoder.load_from_disk``,
    ``encode``, ``decode``); formats.md section 3.

    Args:
        path: a hook-point folder (``cfg.json`` + ``sae.safetensors``), or the run folder holding
            several (then ``hookpoint`` picks one unless there is only one).
        hookpoint: sub-folder name, e.g. ``layers.10`` or ``embed_tokens``.
        hook_point: hook point to record (default: from the folder name, ``layers.N`` ->
            ``blocks.N.hook_resid_post``, ``embed_tokens`` -> ``hook_embed``).
        device: where to put the parameters.
        dtype: parameter dtype (default: the stored dtype of ``encoder.weight``).

    Returns:
        A ``topk`` SAE (k from ``cfg.json``): W_enc [D, F] = ``encoder.weight.T``, b_enc [F] =
        ``encoder.bias``, W_dec [F, D] = ``W_dec``, b_dec [D] = ``b_dec``,
        ``apply_b_dec_to_input = not transcode``. The run's ``config.json`` ``model`` becomes
        ``model_name``.

    Raises:
        SAEFormatError: missing files or tensors, shapes that disagree with ``d_in`` and the
            latent count, ``skip_connection`` (a ``W_skip`` term we do not compute), the
            ``groupmax`` or any non-``topk`` activation, ``signed`` latents, or k > d_sae.
    """
    root = _as_dir(path)
    folder = _hookpoint_folder(root, hookpoint)
    cfg_path, w_path = folder / CFG, folder / WEIGHTS
    if not w_path.is_file():
        raise SAEFormatError(f"{folder}: missing {WEIGHTS}")
    doc = {**DEFAULTS, **_read_json(cfg_path)}
    _require_keys(doc, ["d_in"], cfg_path)
    d_in = int(doc["d_in"])
    d_sae = int(doc["num_latents"] or 0) or d_in * int(doc["expansion_factor"])
    k = int(doc["k"])
    if doc["skip_connection"]:
        raise SAEFormatError(f"{cfg_path}: skip_connection=true (a W_skip [D, D] term) is not supported")
    if doc["activation"] == "groupmax":
        raise SAEFormatError(f"{cfg_path}: activation='groupmax' is not supported; only 'topk'")
    if doc["activation"] != "topk":
        raise SAEFormatError(f"{cfg_path}: unknown activation {doc['activation']!r}; only 'topk' is supported")
    if doc.get("signed"):
        raise SAEFormatError(f"{cfg_path}: signed=true latents (no ReLU) are not supported")
    if not 0 < k <= d_sae:
        raise SAEFormatError(f"{cfg_path}: k={k} must be in 1..d_sae={d_sae}")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise SAEFormatError(f"{w_path}: unreadable safetensors file ({e})") from e
    if "W_skip" in tensors:
        raise SAEFormatError(f"{w_path}: W_skip present (skip connection) is not supported")
    _check_tensors(
        tensors,
        {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)},
        w_path,
    )
    run_cfg = folder.parent / RUN_CONFIG
    model_name = ""
    if run_cfg.is_file():
        try:
            model_name = str(_read_json(run_cfg).get("model") or "")
        except SAEFormatError:
            model_name = ""
    transcode = bool(doc["transcode"])
    cfg = SAEConfig(
        architecture="topk",
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        apply_b_dec_to_input=not transcode,
        input_scale=1.0,
        hook_point=hook_point or hook_from_hookpoint(folder.name),
        model_name=model_name,
        metadata={
            "source_format": "sparsify",
            "source_path": str(folder),
            "hookpoint": folder.name,
            "transcode": transcode,
            "normalize_decoder": bool(doc["normalize_decoder"]),
            "multi_topk": bool(doc["multi_topk"]),
        },
    )
    return _build_sae(
        cfg,
        W_enc=_f64(tensors["encoder.weight"]).T,
        b_enc=_f64(tensors["encoder.bias"]),
        W_dec=_f64(tensors["W_dec"]),
        b_dec=_f64(tensors["b_dec"]),
        dtype=_resolve_dtype(dtype, tensors["encoder.weight"].dtype),
        device=device,
    )
