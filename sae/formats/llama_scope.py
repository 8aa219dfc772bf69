"""Llama Scope SAEs and transcoders (fnlp/Llama3_1-8B-Base-L{layer}{R,A,M,TC}-{8x,32x}).

Reference: OpenMOSS/Language-Model-SAEs, ``src/lm_saes/sae.py@1e710367`` (the ``lm_saes`` code of
the Llama Scope release): ``SparseAutoEncoder.from_config``, ``encode``, ``decode`` and
``activation_function_factory``; ``src/lm_saes/config.py`` for the hyperparameter defaults.
Notes: ``shared/formats.md`` section 2.

On disk: ``hyperparams.json`` and ``checkpoints/final.safetensors`` holding ``nn.Linear``
tensors ``encoder.weight`` [F, D], ``encoder.bias`` [F], ``decoder.weight`` [D, F],
``decoder.bias`` [D] (F = d_sae, D = d_model), in the "dataset-wise" normalised space.

How ``lm_saes`` loads them for inference (``from_config``), which we reproduce:

1. dataset-wise norm, with ``s_in = sqrt(D) / norm["in"]`` and ``s_out = sqrt(D) / norm["out"]``:
   ``encoder.bias /= s_in``, ``decoder.bias /= s_out``, ``decoder.weight *= s_in / s_out``;
   the SAE then reads raw activations ("inference" mode);
2. if ``sparsity_include_decoder_norm``: with ``n`` the column norms of the decoder **as scaled
   by step 1**, ``decoder.weight /= n``, ``encoder.weight *= n[:, None]``, ``encoder.bias *= n``;
3. ``pre = encoder(x)`` (the decoder bias is subtracted first only if
   ``apply_decoder_bias_to_pre_encoder``), and ``act_fn``: ``jumprelu`` ->
   ``pre.where(pre > jump_relu_threshold, 0)`` with one **scalar** threshold, ``topk`` with
   ``jump_relu_threshold > 0`` -> the same jumprelu, ``topk`` otherwise -> per-token top ``top_k``
   of ``relu(pre)``, ``relu`` -> ``relu(pre)``;
4. ``x_hat = decoder(z)`` (with its bias).

So the threshold lives in the space of step 3. When ``norm["in"] != norm["out"]`` (transcoders:
``hook_point_out`` differs) the two factors do not cancel: the reconstruction is divided by
``s_out``, not ``s_in`` (a single-factor fold, as SAELens's ``norm_scaling_factor`` does, scales
a transcoder's output by ``norm_in / norm_out``), and step 2's norms carry the factor
``s_in / s_out``, which moves every latent's pre-activation, and so the gate, by that factor.
We fold everything into the weights and keep ``input_scale = 1``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..io import SAEFormatError
from ..model import SAE, SAEConfig
from ._common import _as_dir, _build_sae, _check_tensors, _f64, _read_json, _require_keys, _resolve_dtype

HYPERPARAMS = "hyperparams.json"
# lm_saes ``from_config`` looks for these, in this order (the .pt variants are not supported).
CHECKPOINTS = ("sae_weights.safetensors", "checkpoints/pruned.safetensors", "checkpoints/final.safetensors")
# Defaults of the release-era ``BaseSAEConfig`` (``src/lm_saes/config.py``).
DEFAULTS = {
    "use_decoder_bias": True,
    "use_glu_encoder": False,
    "act_fn": "relu",
    "jump_relu_threshold": 0.0,
    "apply_decoder_bias_to_pre_encoder": True,
    "norm_activation": "token-wise",
    "sparsity_include_decoder_norm": True,
    "top_k": 50,
}
_NORM_PREFIX = "dataset_average_activation_norm."


def _dataset_norms(hp: dict, tensors: dict[str, torch.Tensor], where: Path) -> tuple[float, float]:
    """(norm_in, norm_out) from ``hyperparams.json`` or, as later lm_saes saves them, the weights."""
    norm = hp.get("dataset_average_activation_norm")
    if not norm:
        norm = {k[len(_NORM_PREFIX):]: float(v) for k, v in tensors.items() if k.startswith(_NORM_PREFIX)}
    if not norm:
        raise SAEFormatError(
            f"{where}: norm_activation='dataset-wise' but no dataset_average_activation_norm "
            "(neither in hyperparams.json nor as dataset_average_activation_norm.* tensors)"
        )
    hin, hout = hp.get("hook_point_in"), hp.get("hook_point_out") or hp.get("hook_point_in")
    n_in = norm.get("in", norm.get(hin))
    n_out = norm.get("out", norm.get(hout))
    if n_in is None or n_out is None:
        raise SAEFormatError(f"{where}: dataset_average_activation_norm lacks 'in' or 'out' (has {sorted(norm)})")
    n_in, n_out = float(n_in), float(n_out)
    if not (math.isfinite(n_in) and n_in > 0 and math.isfinite(n_out) and n_out > 0):
        raise SAEFormatError(f"{where}: dataset_average_activation_norm must be positive, got in={n_in}, out={n_out}")
    return n_in, n_out


def load_llama_scope(
    path: str | os.PathLike,
    hook_point: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Load a Llama Scope (``lm_saes``) SAE or transcoder with ``lm_saes``'s inference numerics.

    Reference: OpenMOSS/Language-Model-SAEs ``src/lm_saes/sae.py@1e710367``
    (``SparseAutoEncoder.from_config``); formats.md section 2. See the module docstring for the
    math.

    Args:
        path: the folder holding ``hyperparams.json`` and ``checkpoints/final.safetensors``.
        hook_point: hook point (default: ``hook_point_in``, e.g. ``blocks.15.hook_resid_post``).
        device: where to put the parameters.
        dtype: parameter dtype (default: the stored one, bfloat16 for the release); the folding
            is computed in float64 and rounded once.

    Returns:
        An SAE reading raw activations (``input_scale`` 1, ``apply_b_dec_to_input`` =
        ``apply_decoder_bias_to_pre_encoder``): architecture ``jumprelu`` (scalar threshold
        broadcast to [d_sae]), ``topk`` (k = ``top_k``) or ``relu``. W_enc [D, F] is
        ``encoder.weight.T`` and W_dec [F, D] is ``decoder.weight.T``, both folded. For a
        transcoder the reconstruction belongs at ``metadata["hook_point_out"]``.

    Raises:
        SAEFormatError: missing ``hyperparams.json`` keys or weights file, missing/extra tensors or
            shapes that disagree with ``d_model``/``d_sae``, ``act_fn`` not in relu/jumprelu/topk,
            a negative jumprelu threshold, token-wise or batch-wise input normalisation, a GLU
            encoder, or per-latent ``log_jumprelu_threshold`` tensors (later lm_saes versions).
    """
    root = _as_dir(path)
    hp_path = root / HYPERPARAMS
    hp = {**DEFAULTS, **{k: v for k, v in _read_json(hp_path).items() if v is not None}}
    _require_keys(hp, ["d_model", "hook_point_in"], hp_path)
    d_model = int(hp["d_model"])
    if "d_sae" in hp:
        d_sae = int(hp["d_sae"])
        if "expansion_factor" in hp and d_sae != d_model * int(hp["expansion_factor"]):
            raise SAEFormatError(
                f"{hp_path}: d_sae={d_sae} disagrees with d_model*expansion_factor={d_model * int(hp['expansion_factor'])}"
            )
    elif "expansion_factor" in hp:
        d_sae = d_model * int(hp["expansion_factor"])
    else:
        raise SAEFormatError(f"{hp_path}: config lacks ['d_sae'] (or 'expansion_factor')")

    ckpt = next((root / c for c in CHECKPOINTS if (root / c).is_file()), None)
    if ckpt is None:
        raise SAEFormatError(f"{root}: no weights file; expected checkpoints/final.safetensors")
    try:
        tensors = load_file(str(ckpt))
    except (SafetensorError, OSError) as e:
        raise SAEFormatError(f"{ckpt}: unreadable safetensors file ({e})") from e

    act_fn = str(hp["act_fn"]).lower()
    theta = float(hp["jump_relu_threshold"])
    top_k = int(hp["top_k"])
    if hp["use_glu_encoder"]:
        raise SAEFormatError(f"{hp_path}: use_glu_encoder=true is not supported")
    if "log_jumprelu_threshold" in tensors:
        raise SAEFormatError(
            f"{ckpt}: per-latent log_jumprelu_threshold found; this is a later lm_saes checkpoint, "
            "not the Llama Scope release format"
        )
    if act_fn not in ("relu", "jumprelu", "topk"):
        raise SAEFormatError(f"{hp_path}: unknown activation act_fn={hp['act_fn']!r}; expected relu, jumprelu or topk")
    if act_fn == "topk" and theta > 0:  # lm_saes converts it to jumprelu for inference
        act_fn = "jumprelu"
    if act_fn == "jumprelu" and not (math.isfinite(theta) and theta >= 0):
        raise SAEFormatError(f"{hp_path}: jump_relu_threshold={theta} must be >= 0 (lm_saes keeps negative values)")
    if act_fn == "topk" and not 0 < top_k <= d_sae:
        raise SAEFormatError(f"{hp_path}: top_k={top_k} must be in 1..d_sae={d_sae}")

    use_dec_bias = bool(hp["use_decoder_bias"])
    expected = {
        "encoder.weight": (d_sae, d_model),
        "encoder.bias": (d_sae,),
        "decoder.weight": (d_model, d_sae),
    }
    if use_dec_bias:
        expected["decoder.bias"] = (d_model,)
    ignored = tuple(k for k in tensors if k.startswith(_NORM_PREFIX))
    _check_tensors(tensors, expected, ckpt, ignored=ignored)

    mode = hp["norm_activation"]
    if mode == "dataset-wise":
        n_in, n_out = _dataset_norms(hp, tensors, hp_path)
        s_in, s_out = math.sqrt(d_model) / n_in, math.sqrt(d_model) / n_out
    elif mode in ("inference", "none"):
        n_in = n_out = None
        s_in = s_out = 1.0
    else:
        raise SAEFormatError(
            f"{hp_path}: norm_activation={mode!r} is not supported (per-token or per-batch scaling "
            "cannot be folded); expected 'dataset-wise' or 'inference'"
        )

    W_e = _f64(tensors["encoder.weight"])  # [F, D]
    b_e = _f64(tensors["encoder.bias"])  # [F]
    W_d = _f64(tensors["decoder.weight"])  # [D, F]
    b_d = _f64(tensors["decoder.bias"]) if use_dec_bias else torch.zeros(d_model, dtype=torch.float64)
    # 1. dataset-wise normalisation folded in (lm_saes standardize_parameters_of_dataset_activation_scaling)
    b_e = b_e / s_in
    b_d = b_d / s_out
    W_d = W_d * (s_in / s_out)
    # 2. unit decoder norm (lm_saes transform_to_unit_decoder_norm), norms taken after step 1
    if hp["sparsity_include_decoder_norm"]:
        n = W_d.norm(dim=0)
        if not bool((n > 0).all()):
            raise SAEFormatError(f"{ckpt}: decoder.weight has all-zero columns; cannot normalise")
        W_d = W_d / n
        W_e = W_e * n[:, None]
        b_e = b_e * n

    arch = {"jumprelu": "jumprelu", "topk": "topk", "relu": "relu"}[act_fn]
    hook_in = str(hp["hook_point_in"])
    hook_out = str(hp.get("hook_point_out") or hook_in)
    cfg = SAEConfig(
        architecture=arch,
        d_in=d_model,
        d_sae=d_sae,
        k=top_k if arch == "topk" else None,
        apply_b_dec_to_input=bool(use_dec_bias and hp["apply_decoder_bias_to_pre_encoder"]),
        input_scale=1.0,
        hook_point=hook_point or hook_in,
        model_name=str(hp.get("model_name") or ("meta-llama/Llama-3.1-8B" if d_model == 4096 else "")),
        metadata={
            "source_format": "llama_scope",
            "source_path": str(root),
            "hook_point_in": hook_in,
            "hook_point_out": hook_out,
            "transcoder": hook_out != hook_in,
            "act_fn": str(hp["act_fn"]),
            "jump_relu_threshold": theta,
            "top_k": top_k,
            "dataset_average_activation_norm": {"in": n_in, "out": n_out},
            "folded": "lm_saes from_config: dataset-wise norm, then unit decoder norm"
            if hp["sparsity_include_decoder_norm"] else "lm_saes from_config: dataset-wise norm",
        },
    )
    return _build_sae(
        cfg,
        W_enc=W_e.T,
        b_enc=b_e,
        W_dec=W_d.T,
        b_dec=b_d,
        threshold=theta if arch == "jumprelu" else None,
        dtype=_resolve_dtype(dtype, tensors["encoder.weight"].dtype),
        device=device,
    )
