"""saprmarks/dictionary_learning SAEs: ``BatchTopKSAE``, ``AutoEncoderTopK`` and ``AutoEncoder``.

Reference: saprmarks/dictionary_learning@60ec6bf5, ``dictionary_learning/dictionary.py``
(``AutoEncoder``), ``dictionary_learning/trainers/top_k.py`` (``AutoEncoderTopK``),
``dictionary_learning/trainers/batch_top_k.py`` (``BatchTopKSAE``) and ``training.py`` (the
saved ``config.json``). Notes: ``shared/formats.md`` section 5.

On disk: ``<save_dir>/trainer_{i}/config.json`` = ``{"trainer": {...}, "buffer": {...}}`` and
``ae.pt``, a ``torch.save``'d state dict:

- ``BatchTopKSAE`` / ``AutoEncoderTopK``: ``encoder.weight`` [F, D], ``encoder.bias`` [F],
  ``decoder.weight`` [D, F] (no bias), ``b_dec`` [D], buffers ``k`` (int) and ``threshold``
  (float scalar, -1 until set);
- ``AutoEncoder``: ``encoder.weight`` [F, D], ``encoder.bias`` [F], ``decoder.weight`` [D, F],
  ``bias`` [D].

Numerics (inference defaults): ``a = relu(encoder(x - b_dec))``; ``BatchTopKSAE`` keeps
``a * (a > threshold)`` (``use_threshold=True``): our ``batchtopk`` (= jumprelu with the scalar
threshold broadcast); ``AutoEncoderTopK`` keeps each token's top ``k`` of ``a``
(``use_threshold=False``): our ``topk``; ``AutoEncoder`` is ``relu(encoder(x - bias))``.
Decode is ``decoder(z) + b_dec`` (``+ bias``). ``normalize_activations`` is already folded into
the final ``ae.pt`` by ``scale_biases``. SAELens's ``dictionary_learning_1`` loader reads a
``BatchTopKSAE`` as a plain ReLU SAE, dropping ``threshold`` and ``k``.
"""

from __future__ import annotations

import os

import torch

from ..io import SAEFormatError
from ..model import SAE, SAEConfig
from ._common import _as_dir, _build_sae, _check_tensors, _f64, _read_json, _require_keys, _resolve_dtype, _torch_load

CONFIG = "config.json"
WEIGHTS = "ae.pt"
SUPPORTED = ("BatchTopKSAE", "AutoEncoderTopK", "AutoEncoder")


def _k_of(tensors: dict, trainer: dict, where) -> int | None:
    k_buf = int(tensors["k"].item()) if "k" in tensors else None
    k_cfg = trainer.get("k")
    if k_buf is not None and k_cfg is not None and int(k_cfg) != k_buf:
        raise SAEFormatError(f"{where}: config k={k_cfg} disagrees with the ae.pt k buffer {k_buf}")
    return k_buf if k_buf is not None else (int(k_cfg) if k_cfg is not None else None)


def load_dictionary_learning(
    path: str | os.PathLike,
    hook_point: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Load a dictionary_learning ``ae.pt`` + ``config.json`` with its inference numerics.

    Reference: saprmarks/dictionary_learning ``dictionary_learning/dictionary.py`` and
    ``dictionary_learning/trainers/{top_k,batch_top_k}.py``; formats.md section 5. ``ae.pt`` is
    read with ``torch.load(..., weights_only=True)``.

    Args:
        path: the ``trainer_i`` folder (or a file in it).
        hook_point: hook point (default ``blocks.{trainer.layer}.hook_resid_post``, as SAELens does).
        device: where to put the parameters.
        dtype: parameter dtype (default: the stored dtype of ``encoder.weight``).

    Returns:
        ``BatchTopKSAE`` -> ``batchtopk`` (k, threshold [F] = the scalar buffer);
        ``AutoEncoderTopK`` -> ``topk`` (k); ``AutoEncoder`` -> ``relu``. In every case
        W_enc [D, F] = ``encoder.weight.T``, b_enc [F] = ``encoder.bias``, W_dec [F, D] =
        ``decoder.weight.T``, b_dec [D] = ``b_dec`` (``bias``), ``apply_b_dec_to_input=True``.

    Raises:
        SAEFormatError: a missing ``config.json`` / ``ae.pt`` / trainer key, a ``dict_class``
            other than BatchTopKSAE, AutoEncoderTopK or AutoEncoder, missing or extra tensors,
            shapes that disagree with ``activation_dim`` / ``dict_size``, a config ``k`` that
            disagrees with the ``k`` buffer, or a BatchTopK ``threshold`` that was never set
            (< 0) or is missing.
    """
    root = _as_dir(path)
    cfg_path, w_path = root / CONFIG, root / WEIGHTS
    doc = _read_json(cfg_path)
    trainer = doc.get("trainer")
    if not isinstance(trainer, dict):
        raise SAEFormatError(f"{cfg_path}: config lacks ['trainer']")
    _require_keys(trainer, ["dict_class", "activation_dim", "dict_size"], cfg_path)
    dict_class = str(trainer["dict_class"])
    if dict_class not in SUPPORTED:
        raise SAEFormatError(
            f"{cfg_path}: dict_class={dict_class!r} is not supported; expected one of {list(SUPPORTED)}"
        )
    D, F = int(trainer["activation_dim"]), int(trainer["dict_size"])
    state = _torch_load(w_path, root)
    if not isinstance(state, dict):
        raise SAEFormatError(f"{w_path}: expected a state dict, got {type(state).__name__}")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    if dict_class == "AutoEncoder":
        _check_tensors(
            tensors,
            {"encoder.weight": (F, D), "encoder.bias": (F,), "decoder.weight": (D, F), "bias": (D,)},
            w_path,
        )
        arch, k, threshold, b_dec = "relu", None, None, tensors["bias"]
    else:
        expected = {
            "encoder.weight": (F, D),
            "encoder.bias": (F,),
            "decoder.weight": (D, F),
            "b_dec": (D,),
            "k": (),
            "threshold": (),
        }
        optional = ("k",) if dict_class == "BatchTopKSAE" else ("k", "threshold")
        _check_tensors(tensors, expected, w_path, optional=optional)
        k = _k_of(tensors, trainer, cfg_path)
        if k is None or not 0 < k <= F:
            raise SAEFormatError(f"{cfg_path}: k={k} must be in 1..dict_size={F}")
        b_dec = tensors["b_dec"]
        if dict_class == "AutoEncoderTopK":
            arch, threshold = "topk", None
        else:
            arch = "batchtopk"
            threshold = float(tensors["threshold"].item())
            if not threshold >= 0:
                raise SAEFormatError(
                    f"{w_path}: BatchTopKSAE threshold={threshold} was never set (it stays -1 until "
                    "threshold_start_step); its inference rule needs it"
                )

    layer = trainer.get("layer")
    cfg = SAEConfig(
        architecture=arch,
        d_in=D,
        d_sae=F,
        k=k,
        apply_b_dec_to_input=True,
        input_scale=1.0,
        hook_point=hook_point or (f"blocks.{int(layer)}.hook_resid_post" if layer is not None else ""),
        model_name=str(trainer.get("lm_name") or ""),
        metadata={
            "source_format": "dictionary_learning",
            "source_path": str(root),
            "dict_class": dict_class,
            "trainer_class": trainer.get("trainer_class"),
            "submodule_name": trainer.get("submodule_name"),
            "layer": layer,
        },
    )
    return _build_sae(
        cfg,
        W_enc=_f64(tensors["encoder.weight"]).T,
        b_enc=_f64(tensors["encoder.bias"]),
        W_dec=_f64(tensors["decoder.weight"]).T,
        b_dec=_f64(b_dec),
        threshold=threshold,
        dtype=_resolve_dtype(dtype, tensors["encoder.weight"].dtype),
        device=device,
    )
