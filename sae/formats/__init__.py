"""Load the SAE checkpoint formats people already have, with their exact numerics.

One module per foreign format, each exposing ``load_<format>(path, ...) -> SAE``:

================================  ============================================================
format                            files (reference: ``shared/formats.md``)
================================  ============================================================
``saelens`` (ours)                ``cfg.json`` + ``sae_weights.safetensors`` -> ``saesteer.sae.io.load_sae``
``llama_scope``                   ``hyperparams.json`` + ``checkpoints/final.safetensors``
                                  (OpenMOSS/Language-Model-SAEs ``src/lm_saes/sae.py@1e710367``)
``sparsify``                      ``<hookpoint>/cfg.json`` + ``<hookpoint>/sae.safetensors``
                                  (EleutherAI/sparsify ``sparsify/sparse_coder.py``)
``gemma_scope``                   ``layer_L/width_W/average_l0_N/params.npz``
                                  (google/gemma-scope; SAELens ``gemma_2`` loader)
``dictionary_learning``           ``config.json`` + ``ae.pt`` (saprmarks/dictionary_learning
                                  ``dictionary.py``, ``trainers/top_k.py``, ``trainers/batch_top_k.py``)
``steerers``                      ``config.json`` + ``state_dict.pth`` (kim-dahye/steerers
                                  ``training/k_sparse_autoencoder.py``)
================================  ============================================================

Every loader maps the format's tensors onto our ``SAE`` (transposes, bias conventions, scalar vs
per-latent thresholds, input-norm factors folded into the weights) so that ``sae.encode`` and
``sae.decode`` give the format's own code and reconstruction, and refuses a checkpoint it cannot
reproduce exactly (missing or extra tensors, shapes that disagree with the config, an activation
or option we do not implement) with ``SAEFormatError`` naming the problem.

Weight transforms are done in float64 and rounded once to the target dtype (by default the dtype
the tensors are stored in).

Shared helpers live in ``_common`` (the loaders import them from there: no import cycle); the
``saesteer convert`` command is ``convert``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..io import CFG_FILE, WEIGHTS_FILE, SAEFormatError, load_sae
from ..model import SAE
from ._common import _as_dir, _has, _resolve_dtype
from .dictionary_learning import load_dictionary_learning
from .gemma_scope import load_gemma_scope
from .llama_scope import load_llama_scope
from .sparsify import load_sparsify
from .steerers import load_steerers

__all__ = [
    "FORMATS",
    "SAEFormatError",
    "detect_format",
    "load_any",
    "load_llama_scope",
    "load_sparsify",
    "load_gemma_scope",
    "load_dictionary_learning",
    "load_steerers",
]

FORMATS = ("saelens", "llama_scope", "sparsify", "gemma_scope", "dictionary_learning", "steerers")
"""Format names accepted by ``load_any(format=...)`` and ``saesteer convert --format``."""

_LOADERS = {
    "llama_scope": load_llama_scope,
    "sparsify": load_sparsify,
    "gemma_scope": load_gemma_scope,
    "dictionary_learning": load_dictionary_learning,
    "steerers": load_steerers,
}


# -- detection and dispatch --------------------------------------------------------------------


def _sparsify_hookpoints(root: Path) -> list[str]:
    """Sub-folders of ``root`` holding a sparsify ``cfg.json`` + ``sae.safetensors``."""
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and _has(d, "cfg.json", "sae.safetensors"))


def detect_format(path: str | os.PathLike) -> str:
    """Name the checkpoint format of ``path`` from the files present (no tensors are read).

    Rules, in order: ``cfg.json`` + ``sae_weights.safetensors`` -> ``"saelens"``;
    ``hyperparams.json`` -> ``"llama_scope"``; ``cfg.json`` + ``sae.safetensors`` (in the folder
    or in its hook-point sub-folders) -> ``"sparsify"``; ``params.npz`` (or the ``.npz`` file
    itself) -> ``"gemma_scope"``; ``config.json`` + ``ae.pt`` -> ``"dictionary_learning"``;
    ``config.json`` + ``state_dict.pth`` -> ``"steerers"``.

    Args:
        path: a checkpoint folder, or a file inside one.

    Returns:
        One of ``FORMATS``.

    Raises:
        SAEFormatError: the path does not exist or matches no known layout.

    Reference: the file layouts in ``shared/formats.md`` sections 1-5 and 7.
    """
    p = Path(path)
    if not p.exists():
        raise SAEFormatError(f"{p}: no such file or folder")
    if p.is_file() and p.suffix == ".npz":
        return "gemma_scope"
    d = _as_dir(p)
    if _has(d, CFG_FILE, WEIGHTS_FILE):
        return "saelens"
    if _has(d, "hyperparams.json"):
        return "llama_scope"
    if _has(d, "cfg.json", "sae.safetensors") or _sparsify_hookpoints(d):
        return "sparsify"
    if _has(d, "params.npz"):
        return "gemma_scope"
    if _has(d, "config.json", "ae.pt"):
        return "dictionary_learning"
    if _has(d, "config.json", "state_dict.pth"):
        return "steerers"
    seen = sorted(x.name for x in d.iterdir())[:20] if d.is_dir() else []
    raise SAEFormatError(
        f"{d}: unknown SAE checkpoint layout (files: {seen}); expected one of {list(FORMATS)}"
    )


def load_any(
    path: str | os.PathLike,
    format: str | None = None,
    hook_point: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Load an SAE checkpoint of any supported format into our ``SAE``.

    Args:
        path: the checkpoint folder (or a file in it; the ``params.npz`` file for Gemma Scope).
        format: one of ``FORMATS``; None or ``"auto"`` detects it (``detect_format``).
        hook_point: hook point the SAE attaches to, overriding the one the format implies. For a
            sparsify run folder holding several hook points, the name of a sub-folder
            (``layers.3``) selects that SAE instead.
        device: where to put the parameters.
        dtype: parameter dtype (``torch.float32`` / ``"bfloat16"`` ...); default: as stored.

    Returns:
        The SAE (eval mode, gradients off); W_enc [d_in, d_sae], b_enc [d_sae], W_dec
        [d_sae, d_in], b_dec [d_in], threshold [d_sae].

    Raises:
        SAEFormatError: unknown format, unknown layout, or a checkpoint the format's loader
            refuses (see each ``load_<format>``).

    Reference: each format's module docstring (``saesteer.sae.formats.<format>``) and
    ``shared/formats.md``; ``"saelens"`` goes to ``saesteer.sae.io.load_sae``.
    """
    fmt = detect_format(path) if format in (None, "auto") else format
    if fmt not in FORMATS:
        raise SAEFormatError(f"unknown SAE format {fmt!r}; expected one of {list(FORMATS)} or 'auto'")
    if fmt == "saelens":
        sae = load_sae(_as_dir(path), device=device, dtype=_resolve_dtype(dtype, torch.float32) if dtype else None)
        if hook_point:
            sae.cfg.hook_point = hook_point
        return sae
    loader = _LOADERS[fmt]
    if fmt == "sparsify" and hook_point and hook_point in _sparsify_hookpoints(_as_dir(path)):
        return loader(path, hookpoint=hook_point, device=device, dtype=dtype)
    return loader(path, hook_point=hook_point, device=device, dtype=dtype)


