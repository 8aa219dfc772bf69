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

This module also holds the helpers the format modules share, and the ``saesteer convert``
command (``add_convert_args`` / ``convert_cli``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..io import CFG_FILE, WEIGHTS_FILE, SAEFormatError, load_sae, save_sae
from ..model import SAE, SAEConfig

__all__ = [
    "FORMATS",
    "SAEFormatError",
    "detect_format",
    "load_any",
    "add_convert_args",
    "convert_cli",
    "load_llama_scope",
    "load_sparsify",
    "load_gemma_scope",
    "load_dictionary_learning",
    "load_steerers",
]

FORMATS = ("saelens", "llama_scope", "sparsify", "gemma_scope", "dictionary_learning", "steerers")
"""Format names accepted by ``load_any(format=...)`` and ``saesteer convert --format``."""

DTYPES = ("float32", "float16", "bfloat16")

_LOADERS = {
    "llama_scope": ("llama_scope", "load_llama_scope"),
    "sparsify": ("sparsify", "load_sparsify"),
    "gemma_scope": ("gemma_scope", "load_gemma_scope"),
    "dictionary_learning": ("dictionary_learning", "load_dictionary_learning"),
    "steerers": ("steerers", "load_steerers"),
}


def __getattr__(name: str):
    """Lazy re-export of ``load_<format>`` (the format modules import helpers from here)."""
    for module, fn in _LOADERS.values():
        if name == fn:
            import importlib

            return getattr(importlib.import_module(f"{__name__}.{module}"), fn)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- helpers shared by the format modules ------------------------------------------------------


def _as_dir(path: str | os.PathLike) -> Path:
    """The checkpoint folder of ``path`` (a file inside it names its folder)."""
    p = Path(path)
    return p.parent if p.is_file() else p


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``.

    Raises:
        SAEFormatError: the file is missing, is not valid JSON, or is not an object.
    """
    if not path.is_file():
        raise SAEFormatError(f"{path}: file not found")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise SAEFormatError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _require_keys(doc: dict, keys: tuple[str, ...] | list[str], where: Any) -> None:
    """Raise ``SAEFormatError`` naming the config keys of ``keys`` absent from ``doc``."""
    missing = [k for k in keys if k not in doc or doc[k] is None]
    if missing:
        raise SAEFormatError(f"{where}: config lacks {missing}")


def _check_tensors(
    tensors: dict[str, Any],
    expected: dict[str, tuple[int, ...]],
    where: Any,
    optional: tuple[str, ...] = (),
    ignored: tuple[str, ...] = (),
) -> None:
    """Check a foreign state dict: every key of ``expected`` present with that shape, no others.

    Args:
        tensors: name -> tensor (torch or numpy) as read from disk.
        expected: name -> shape; names listed in ``optional`` may be absent.
        where: the file, for the message.
        ignored: names allowed in ``tensors`` and not checked (training statistics, buffers).

    Raises:
        SAEFormatError: a missing tensor, a tensor of another shape, or a tensor we do not know
            (which would mean the checkpoint computes something we would silently drop).
    """
    missing = [n for n in expected if n not in tensors and n not in optional]
    if missing:
        raise SAEFormatError(f"{where}: missing tensors {missing}")
    extra = sorted(n for n in tensors if n not in expected and n not in ignored)
    if extra:
        raise SAEFormatError(f"{where}: unexpected tensors {extra}; this variant is not supported")
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != tuple(shape):
            raise SAEFormatError(
                f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, the config implies {tuple(shape)}"
            )


def _resolve_dtype(dtype: torch.dtype | str | None, stored: torch.dtype) -> torch.dtype:
    """The parameter dtype of a loaded SAE: ``dtype`` if given, else the on-disk dtype (float32 for float64).

    Raises:
        SAEFormatError: a dtype other than float32, float16 or bfloat16.
    """
    if dtype is None:
        # float64 (or other) storage has no SAE counterpart here: default to float32
        dtype = stored if stored in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise SAEFormatError(f"unsupported SAE dtype {dtype}; expected one of {DTYPES}")
    return dtype


def _f64(t: Any) -> torch.Tensor:
    """A float64 CPU copy of a torch tensor, numpy array or Python number."""
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).clone()
    return torch.as_tensor(t, dtype=torch.float64).clone()


def _build_sae(
    cfg: SAEConfig,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | float | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SAE:
    """Our SAE from weights already in our convention (float64 in, one rounding to ``dtype``).

    Args:
        cfg: the configuration (its ``dtype`` is overwritten with ``dtype``).
        W_enc: [d_in, d_sae]; b_enc: [d_sae]; W_dec: [d_sae, d_in]; b_dec: [d_in].
        threshold: [d_sae] or a scalar broadcast to [d_sae] (jumprelu / batchtopk), else None.
        dtype: parameter dtype; device: where to put it.

    Returns:
        The SAE in eval mode, gradients off.
    """
    cfg.dtype = str(dtype).removeprefix("torch.")
    sae = SAE(cfg)
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(value)
        if threshold is not None:
            sae.threshold.copy_(torch.as_tensor(threshold, dtype=torch.float64).expand(cfg.d_sae))
    return sae.requires_grad_(False).eval().to(device)


# -- detection and dispatch --------------------------------------------------------------------


def _torch_load(w_path: Path, root: Path) -> Any:
    """``torch.load(w_path, weights_only=True)`` on the CPU.

    Raises:
        SAEFormatError: the file is missing or cannot be read as a (tensor-only) pickle.
    """
    if not w_path.is_file():
        raise SAEFormatError(f"{root}: missing {w_path.name}")
    try:
        return torch.load(str(w_path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise SAEFormatError(f"{w_path}: cannot read it ({e})") from e


def _has(folder: Path, *names: str) -> bool:
    return all((folder / n).is_file() for n in names)


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
    hook: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Load an SAE checkpoint of any supported format into our ``SAE``.

    Args:
        path: the checkpoint folder (or a file in it; the ``params.npz`` file for Gemma Scope).
        format: one of ``FORMATS``; None or ``"auto"`` detects it (``detect_format``).
        hook: hook point the SAE attaches to, overriding the one the format implies. For a
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
        if hook:
            sae.cfg.hook_name = hook
        return sae
    import importlib

    module, fn = _LOADERS[fmt]
    loader = getattr(importlib.import_module(f"{__name__}.{module}"), fn)
    if fmt == "sparsify" and hook and hook in _sparsify_hookpoints(_as_dir(path)):
        return loader(path, hookpoint=hook, device=device, dtype=dtype)
    return loader(path, hook=hook, device=device, dtype=dtype)


# -- saesteer convert --------------------------------------------------------------------------


def add_convert_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``saesteer convert``'s arguments to ``p``: SRC, --format, --out, --hook, --dtype.

    Returns ``p``; wire it as ``add_convert_args(sub.add_parser("convert"))`` and
    ``set_defaults(fn=convert_cli)``. ``--dtype`` is one of float32, float16, bfloat16.
    """
    p.add_argument("src", help="foreign SAE checkpoint folder (or its params.npz / weights file)")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="source format (default: detect)")
    p.add_argument("--out", required=True, help="output folder (our format: SAELens layout)")
    p.add_argument("--hook", default=None, help="hook point to record (default: the one the format implies); "
                   "for a sparsify run folder, the hook-point sub-folder to convert")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="dtype on disk (default: the source's)")
    return p


def convert_cli(args: argparse.Namespace) -> int:
    """``saesteer convert SRC --format auto|... --out DIR [--hook H] [--dtype D]``.

    Loads SRC with ``load_any`` (weight transforms in float64, one rounding to ``--dtype`` or the
    source dtype) and writes it with ``saesteer.sae.io.save_sae``.

    Returns:
        0 on success (prints the output folder and the SAE's shape); 2 with the reason on stderr
        if the source is refused (``SAEFormatError``; nothing is written then).

    Reference: sources as in ``load_any``; the output is our format (SAELens v6 layout,
    ``cfg.json`` + ``sae_weights.safetensors``), see ``saesteer.sae.io``.
    """
    import sys

    try:
        sae = load_any(args.src, format=args.format, hook=args.hook, dtype=args.dtype)
    except SAEFormatError as e:
        print(f"saesteer convert: {e}", file=sys.stderr)
        return 2
    out = save_sae(sae, args.out)
    c = sae.cfg
    print(
        f"wrote {out}: {c.architecture} d_in={c.d_in} d_sae={c.d_sae}"
        + (f" k={c.k}" if c.k is not None else "")
        + f" hook={c.hook_name or '?'} dtype={c.dtype}"
    )
    return 0
