"""Read and write SAEs in our on-disk format, which is SAELens's layout.

A checkpoint is a folder holding ``cfg.json`` and ``sae_weights.safetensors`` (tensors ``W_enc``
[d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in], and ``threshold``
[d_sae] for jumprelu). Reference: SAELens v6 ``SAEConfig`` (``sae_lens/saes/sae.py``) and
``handle_pre_6_0_config`` (``sae_lens/loading/pretrained_sae_loaders.py``).

BatchTopK SAEs are written as SAELens writes them, ``architecture: "jumprelu"`` with the inference
threshold broadcast to [d_sae], so SAELens loads ours as they are; ``metadata.saesteer`` keeps the
training architecture and k for our own listing. An input scale other than 1 is folded into the
weights before writing (SAELens's ``cfg.json`` has no field for the factor itself).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import ARCHITECTURES, SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
_REQUIRED = ("W_enc", "b_enc", "W_dec", "b_dec")


class SAEFormatError(ValueError):
    """A checkpoint that is missing, inconsistent, or of a kind we cannot load exactly."""


SAELENS_LAYOUT_VERSION = "6.0.0"
"""The SAELens version whose ``cfg.json`` layout ``save_sae`` writes (recorded in ``metadata``)."""


def save_sae(sae: SAE, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``sae`` to folder ``path`` in the SAELens layout; returns the folder.

    Args:
        sae: the SAE; it is not modified (a copy is folded and cast).
        path: the folder, created if missing.
        dtype: tensor dtype on disk (default: the SAE's own).
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sae = copy.deepcopy(sae).cpu()
    if sae.cfg.input_scale != 1.0:
        sae.fold_input_scale()
    if dtype is not None:
        sae = sae.to(dtype)
        sae.cfg.dtype = str(dtype).removeprefix("torch.")
    cfg = sae.cfg
    arch = "jumprelu" if cfg.architecture == "batchtopk" else cfg.architecture
    if arch == "relu":
        arch = "standard"
    tensors = {name: getattr(sae, name).detach().contiguous() for name in _REQUIRED}
    if arch == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().contiguous()
    metadata = dict(cfg.metadata)
    metadata.update(hook_name=cfg.hook_point, model_name=cfg.model_name)  # SAELens reads hook_name
    metadata["saesteer"] = {"architecture": cfg.architecture, "k": cfg.k}
    # the layout is SAELens >= 6's; without this key SAELens reads the file as a pre-6 config and
    # drops metadata.hook_name (so HookedSAETransformer.add_sae would attach the SAE nowhere)
    metadata.setdefault("sae_lens_version", SAELENS_LAYOUT_VERSION)
    doc = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if arch == "topk":
        doc["k"] = int(cfg.k)
        doc["rescale_acts_by_decoder_norm"] = False
    (out / CFG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    save_file(tensors, str(out / WEIGHTS_FILE))
    return out


def config_from_saelens(doc: dict, where: Path | str = "cfg.json") -> SAEConfig:
    """Map a SAELens ``cfg.json`` document (v6, or older with ``hook_point``/``activation_fn_str``).

    Raises:
        SAEFormatError: an architecture or normalisation we cannot reproduce exactly.
    """
    meta = dict(doc.get("metadata") or {})
    arch = doc.get("architecture", "standard")
    k = doc.get("k")
    # pre-6.0 configs
    if doc.get("activation_fn_str", doc.get("activation_fn")) == "topk":
        arch = "topk"
        k = (doc.get("activation_fn_kwargs") or {}).get("k", k)
    hook_point = meta.get("hook_name") or doc.get("hook_name") or doc.get("hook_point") or ""
    model_name = meta.get("model_name") or doc.get("model_name") or ""
    ours = meta.pop("saesteer", None) or {}
    if arch == "standard":
        arch = "relu"
    if ours.get("architecture") == "batchtopk" and arch == "jumprelu":
        arch, k = "batchtopk", ours.get("k")
    if arch not in ARCHITECTURES:
        raise SAEFormatError(f"{where}: SAELens architecture {arch!r} is not supported yet")
    if doc.get("rescale_acts_by_decoder_norm"):
        raise SAEFormatError(f"{where}: rescale_acts_by_decoder_norm=true is not supported; fold it first")
    norm = doc.get("normalize_activations", "none")
    if norm is True:
        norm = "expected_average_only_in"
    scale = 1.0
    if norm in ("expected_average_only_in",):
        if "norm_scaling_factor" not in doc:
            raise SAEFormatError(
                f"{where}: normalize_activations={norm!r} needs the dataset norm_scaling_factor, "
                "which this cfg.json does not give; add it as 'norm_scaling_factor'"
            )
        scale = float(doc["norm_scaling_factor"])
    elif norm not in ("none", None, False):
        raise SAEFormatError(f"{where}: normalize_activations={norm!r} is not supported")
    if doc.get("reshape_activations", "none") != "none":
        raise SAEFormatError(f"{where}: reshape_activations={doc['reshape_activations']!r} is not supported")
    for key in ("d_in", "d_sae"):
        if key not in doc:
            raise SAEFormatError(f"{where}: cfg.json lacks {key!r}")
    return SAEConfig(
        architecture=arch,
        d_in=int(doc["d_in"]),
        d_sae=int(doc["d_sae"]),
        k=k,
        apply_b_dec_to_input=bool(doc.get("apply_b_dec_to_input", True)),
        input_scale=scale,
        hook_point=hook_point,
        model_name=model_name,
        dtype=str(doc.get("dtype", "float32")).removeprefix("torch."),
        metadata=meta,
    )


def read_sae_config(path: str | os.PathLike) -> SAEConfig:
    """The ``SAEConfig`` of a checkpoint folder, from its ``cfg.json`` alone (no weights read).

    Raises:
        SAEFormatError: no ``cfg.json``, invalid JSON, or a configuration we cannot load.
    """
    cfg_path = Path(path) / CFG_FILE
    if not cfg_path.is_file():
        raise SAEFormatError(f"{path}: no {CFG_FILE}")
    try:
        return config_from_saelens(json.loads(cfg_path.read_text()), path)
    except json.JSONDecodeError as e:
        raise SAEFormatError(f"{cfg_path}: not valid JSON ({e})") from e


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> SAE:
    """Load an SAE from a folder in the SAELens layout.

    Args:
        path: folder holding ``cfg.json`` and ``sae_weights.safetensors``.
        device: where to put the parameters.
        dtype: cast to this dtype (default: the dtype in ``cfg.json``).

    Returns:
        The SAE, gradients off (for inference; trainers build their own).

    Raises:
        SAEFormatError: missing files or tensors, shapes that disagree with ``cfg.json``, or a
            configuration we cannot reproduce exactly.
    """
    where = Path(path)
    cfg_path, w_path = where / CFG_FILE, where / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise SAEFormatError(f"{where}: expected {CFG_FILE} and {WEIGHTS_FILE} (SAELens layout)")
    cfg = read_sae_config(where)
    tensors = load_file(str(w_path))
    missing = [n for n in _REQUIRED if n not in tensors]
    if cfg.architecture in ("jumprelu", "batchtopk") and "threshold" not in tensors:
        missing.append("threshold")
    if missing:
        raise SAEFormatError(f"{w_path}: missing tensors {missing}")
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
        "threshold": (cfg.d_sae,),
    }
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise SAEFormatError(
                f"{w_path}: tensor {name} has shape {tuple(tensors[name].shape)}, cfg.json implies {shape}"
            )
    sae = SAE(cfg)
    with torch.no_grad():
        for name in expected:
            if name in tensors:
                getattr(sae, name).copy_(tensors[name])
    if dtype is not None:
        sae = sae.to(dtype=dtype)
        sae.cfg.dtype = str(dtype).removeprefix("torch.")
    return sae.requires_grad_(False).to(device)
