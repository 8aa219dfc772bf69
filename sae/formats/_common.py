"""Helpers the SAE format loaders share: reading files, checking tensors against a config, dtype
rules, float64 weight transforms, building our ``SAE``. Format-agnostic; imports no loader."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..io import SAEFormatError
from ..model import SAE, SAEConfig

DTYPES = ("float32", "float16", "bfloat16")
"""dtype names a loader or ``saesteer convert --dtype`` accepts."""


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
