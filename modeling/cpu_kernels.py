"""Faster decoding on CPU: lighter weights for the linear layers and fewer, larger operations.

At batch 1 a decode step reads every weight once, so its speed is bounded by memory bandwidth; the
rest of a step is per-operation overhead, which fusing cuts. What each kernel gains, and why float16
weights decode fastest here: ``docs/continuous_batching.md`` (measured by
``benchmarks/continuous_batching.py``).

- ``BF16Linear``: the weight rounded to bfloat16 and packed for oneDNN; the input is rounded to
  bfloat16 on the way in, the product accumulates in float32 and comes back float32.
- ``FP16Linear``: the weight rounded to float16 and packed for FBGEMM
  (``torch.ops.quantized.linear_dynamic_fp16``); the input stays float32, each weight is widened
  back to float32 inside the kernel and the product accumulates and returns in float32, so only the
  weights are rounded (11 significant bits).
- ``Int8Linear``: the weight quantized per output row to int8 (symmetric; bfloat16 scales), the
  input rounded to bfloat16 (``torch.ops.aten._weight_int8pack_mm``, PyTorch's weight-only int8
  kernel).
- ``fuse_projections``: a Llama block's q/k/v projections become one ``qkv`` linear and its
  gate/up projections one ``gate_up`` linear (the same outputs up to float rounding: one matrix
  read instead of three or two, and one rotary embedding over queries and keys together); its
  RMSNorms run as one ``torch.nn.functional.rms_norm`` each.

- the decode step: the fused model's ``forward`` handles one new token per row itself
  (``_lean_decode_forward``: none of transformers' per-call mask building and output wrappers),
  and each fused block runs that step as TorchScript (``modeling.decode_script``, ``script_decode_blocks``)
  over a ``modeling.kv_cache.SpareLayer`` cache, with no Python between its ~25 small operations. A
  block whose attention, MLP or linear modules carry a hook runs eagerly, so those hooks still run.

``speed_up(model, weights)`` applies them (``modeling.lm.pack_linears`` for float32). Hook points are
unchanged: the block, its ``self_attn`` and its ``mlp`` modules stay where they were and return
what they returned.

The residual stream, the norms, attention, the KV cache and every SAE stay float32; only the
linear layers' products see rounded inputs, weights and outputs (bfloat16, 8 significant bits; with
float16 only the weights are rounded, to 11 significant bits). What that costs is measured
against float32 on real text (``benchmarks/continuous_batching.py`` prints it; tests bound it).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F

WEIGHT_FORMATS = ("float32", "float16", "bfloat16", "int8")
"""Weight formats of ``speed_up``: float32 (exact up to accumulation order), float16 (weights only),
bfloat16, int8."""


def onednn_available() -> bool:
    """Whether this torch build has the oneDNN ops the packed layers use (CPU builds on x86 do)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def bf16_supported() -> bool:
    """Whether oneDNN runs bfloat16 linear layers on this CPU (it needs AVX512 BW/VL/DQ or
    AVX-NE-CONVERT; ``BF16Linear`` and the int8 format's bfloat16 LM head need it)."""
    return onednn_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class BF16Linear(nn.Module):
    """A linear layer whose weight is held in bfloat16, packed for oneDNN.

    Args:
        linear: the float32 layer to replace (its weight is rounded to bfloat16: relative error
            <= 2**-9 per entry).
        batch_hint: the number of rows oneDNN packs for (any number works).
        keep_weight: keep the float32 ``weight`` reachable (an LM head tied to the embeddings,
            whose weight the embedding layer holds anyway).

    Input [..., in_features] float32 -> output [..., out_features] float32; the input is rounded
    to bfloat16 for the product, which accumulates in float32 and is rounded to bfloat16 (relative
    error <= 2**-9) before it comes back as float32. The bias is added in float32.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 16, keep_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().to(torch.bfloat16)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, batch_hint), persistent=False)
        self.bias = linear.bias
        if keep_weight:
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, None, "none", [], "").to(x.dtype)
        return y if self.bias is None else y + self.bias


class FP16Linear(nn.Module):
    """A linear layer whose weight is held in float16, packed for FBGEMM.

    Only the weight is rounded (relative error <= 2**-11 per entry; SmolLM2's weights are far inside
    float16's range, and a weight beyond it is refused): the kernel
    (``torch.ops.quantized.linear_dynamic_fp16``) widens each weight to float32 in registers and
    multiplies float32 inputs, accumulating in float32.

    Args:
        linear: the float32 layer to replace.
        keep_weight: keep the float32 ``weight`` reachable (an LM head tied to the embeddings).

    Raises:
        ValueError: this torch build has no FBGEMM float16 kernel (non-x86 builds), or a weight
            outside float16's range (tried once here, so that a server refuses at start).

    Input [..., in_features] float32 -> output [..., out_features] float32; the bias is added in
    float32.
    """

    def __init__(self, linear: nn.Linear, keep_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        if not bool(w.abs().max() < torch.finfo(torch.float16).max):
            raise ValueError(f"float16 weights: a {self.out_features}x{self.in_features} weight exceeds float16's range; "
                             "use bfloat16 or float32")
        try:
            self.packed = torch.ops.quantized.linear_prepack_fp16(w.contiguous(), None)
            torch.ops.quantized.linear_dynamic_fp16(torch.zeros(1, self.in_features), self.packed)
        except (RuntimeError, AttributeError, NotImplementedError) as e:
            raise ValueError(f"float16 weights: this torch build has no FBGEMM float16 kernel ({e}); "
                             "use bfloat16 or float32") from e
        self.bias = linear.bias
        if keep_weight:
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features), self.packed)
        y = y.view(list(x.shape[:-1]) + [self.out_features])  # (no *-unpacking: TorchScript compiles this)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """A linear layer whose weight is quantized per output row to int8.

    Row i's scale is ``max_j |W[i, j]| / 127`` rounded to bfloat16, and ``W[i, j] ~= q[i, j] *
    scale[i]`` with q = round(W / scale) in [-127, 127]: the error per entry is at most half a
    step, ``max_j |W[i, j]| / 254``.

    Args:
        linear: the float32 layer to replace.

    Raises:
        ValueError: this torch build's int8 kernel does not take the layer's shape (tried once here,
            so that a server refuses at start rather than on its first request).

    Input [..., in_features] float32 -> output [..., out_features] float32; the input is rounded
    to bfloat16 for ``torch.ops.aten._weight_int8pack_mm``, whose product comes back rounded to
    bfloat16. The bias is added in float32.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-30).to(torch.bfloat16)
        self.register_buffer("q", torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8), persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.bias = linear.bias
        try:
            torch.ops.aten._weight_int8pack_mm(torch.zeros(1, self.in_features, dtype=torch.bfloat16), self.q, self.scale)
        except (RuntimeError, AttributeError) as e:
            raise ValueError(f"int8 weights: this torch build cannot multiply a {self.out_features}x{self.in_features} "
                             f"int8 weight ({e}); use bfloat16 or float32") from e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale).to(x.dtype).view(list(x.shape[:-1]) + [self.out_features])
        return y if self.bias is None else y + self.bias


# -- fusing a Llama block's projections ----------------------------------------------------------


def _concat_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One linear layer whose output is the outputs of ``parts`` side by side."""
    out = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                    device=parts[0].weight.device, dtype=parts[0].weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([p.weight for p in parts]))
        if out.bias is not None:
            out.bias.copy_(torch.cat([p.bias for p in parts]))
    return out.requires_grad_(False)


_rope_memo: tuple = (None, None, None, None)


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) [B, 1, T, hd] for ``x * cos + roll(x, hd / 2) * signed_sin``, the
    rotate-half RoPE (signed_sin is -sin on the first half, sin on the second). Every block of a
    forward gets the same (cos, sin) tensors from the model's rotary module: computed once."""
    global _rope_memo
    c0, s0, c, ss = _rope_memo
    if c0 is cos and s0 is sin:
        return c, ss
    half = sin.shape[-1] // 2
    c, ss = cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)
    _rope_memo = (cos, sin, c, ss)
    return c, ss


def _fused_attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
    """``LlamaAttention.forward`` (sdpa) with one ``qkv`` projection and one rotary embedding over
    the queries and keys together. Same arguments and result: (output [B, T, d_model], None)."""
    B, T, _ = hidden_states.shape
    hd, nq, nkv = self.head_dim, self._n_q, self._n_kv
    qkv = self.qkv(hidden_states).view(B, T, nq + 2 * nkv, hd).transpose(1, 2)  # [B, heads, T, hd]
    qk, v = qkv[:, : nq + nkv], qkv[:, nq + nkv:]
    cos, ssin = _rope_tables(*position_embeddings)
    qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), ssin)
    q, k = qk[:, :nq], qk[:, nq:]
    cache = kwargs.pop("cache", None)
    if cache is not None:
        # contiguous: a view of v would keep the whole qkv product alive in the cache
        k, v = cache.update(k, v.contiguous(), self.layer_idx, kwargs=kwargs)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scaling,
                                         is_causal=T > 1 and attention_mask is None, enable_gqa=nq != nkv)
    return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), None


def _hooked_inside(layer: nn.Module) -> bool:
    """Whether a forward (pre-)hook sits on the block's attention, MLP or linear modules, or on
    every module (then the scripted decode step, which would skip them, is not used)."""
    from torch.nn.modules import module as m

    if m._global_forward_hooks or m._global_forward_pre_hooks:
        return True
    return any(x._forward_hooks or x._forward_pre_hooks for x in layer.__dict__["_decode_inner"])


def _fused_layer_forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                         use_cache=False, position_embeddings=None, **kwargs):
    """``LlamaDecoderLayer.forward`` with its RMSNorms inline (its attention and MLP are still
    called as modules, so their hooks run). A decode step (one token per row, a ``SpareLayer``
    cache) runs the block's TorchScript twin instead (``modeling.decode_script``), unless something
    hooks the attention, MLP or linear modules."""
    script = self.__dict__.get("_decode_script")
    if (script is not None and hidden_states.shape[1] == 1 and cache is not None and not kwargs
            and position_embeddings is not None and not _hooked_inside(self)):
        from .kv_cache import SpareLayer

        attn = self.self_attn
        layer_cache = cache.layers[attn.layer_idx] if attn.layer_idx < len(cache.layers) else None
        if type(layer_cache) is SpareLayer and layer_cache.get_seq_length() > 0:
            proxy = hidden_states.new_empty((hidden_states.shape[0], attn._n_kv, 1, attn.head_dim))
            kb, vb, n = layer_cache.reserve(proxy, proxy)
            cos, ssin = _rope_tables(*position_embeddings)
            out = script(hidden_states, cos, ssin, kb, vb, n, attention_mask)
            layer_cache.commit(1)
            return out
    norm = self.input_layernorm
    h = F.rms_norm(hidden_states, norm.weight.shape, norm.weight, norm.variance_epsilon)
    h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    hidden_states = hidden_states + h
    norm = self.post_attention_layernorm
    h = F.rms_norm(hidden_states, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return hidden_states + self.mlp(h)


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``LlamaMLP.forward`` with one ``gate_up`` projection."""
    gate, up = self.gate_up(x).split(self._n_inner, dim=-1)
    return self.down_proj(F.silu(gate) * up)


def _rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` as one ``F.rms_norm`` (float32 in, float32 out)."""
    return F.rms_norm(x, self.weight.shape, self.weight, self.variance_epsilon)


_LEAN_KWARGS = frozenset({"input_ids", "attention_mask", "position_ids", "past_key_values", "cache", "use_cache",
                          "return_dict", "logits_to_keep"})


def _lean_decode_forward(self, input_ids=None, *args, **kwargs):
    """``LlamaForCausalLM.forward`` for a decode step: one new token per row over a non-empty
    ``DynamicCache``, the model's blocks, norm and LM head called as modules (their hooks run), and
    none of the per-call machinery of transformers' model forward (mask builder, output capturing,
    argument wrappers), which matter where the blocks are fast (``script_decode_blocks``) and with
    padded batches, whose 4-D mask transformers builds at every step.

    The attention mask is what transformers builds for SDPA at one query position: None where no
    key is padding (no row has a 0 in ``attention_mask``), else ``attention_mask`` [B, S] as a bool
    mask [B, 1, 1, S] (True: attend). Positions default to the cache's length, as transformers'.

    Any other call (a prefill, ``inputs_embeds``, labels, outputs asked for, no cache) goes to the
    model's own forward unchanged. Returns ``CausalLMOutputWithPast`` (``logits`` [B, 1, vocab]
    float32, the cache appended in place)."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    from transformers.cache_utils import DynamicCache

    if (args or input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1 or not kwargs.keys() <= _LEAN_KWARGS
            or type(cache) is not DynamicCache or kwargs.get("use_cache") is False or kwargs.get("return_dict") is False
            or not isinstance(keep := kwargs.get("logits_to_keep", 0), int) or keep not in (0, 1)
            or cache.get_seq_length() == 0):  # (a tensor logits_to_keep goes to transformers, which takes it)
        return type(self).__mro__[1].forward(self, input_ids, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    inner = self.model
    x = inner.embed_tokens(input_ids)
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.full_like(input_ids, cache.get_seq_length())
    mask = kwargs.get("attention_mask")
    if mask is not None:
        mask = None if bool(mask.all()) else mask.bool()[:, None, None, :]
    pe = inner.rotary_emb(x, position_ids=pos)
    for layer in inner.layers[: self.config.num_hidden_layers]:
        x = layer(x, attention_mask=mask, position_embeddings=pe, position_ids=pos, cache=cache, use_cache=True)
    return CausalLMOutputWithPast(logits=self.lm_head(inner.norm(x)), past_key_values=cache)


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _swap_forward(module: nn.Module, forward, tag: str) -> None:
    """Give ``module`` a subclass of its class whose ``forward`` is ``forward`` (hooks, attributes
    and ``isinstance`` checks keep working)."""
    cls = type(module)
    key = (cls, tag)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{tag}{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    module.__class__ = _SUBCLASSES[key]


def _llama_fusable(model: nn.Module) -> bool:
    """Fusion is written for transformers' Llama modules of the 5.x API (the attention and the
    block get ``cache``), SDPA attention, SiLU MLPs and torch >= 2.5 (``enable_gqa``)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llama" or model.training or getattr(cfg, "hidden_act", None) != "silu":
        return False
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or "enable_gqa" not in (F.scaled_dot_product_attention.__doc__ or ""):
        return False
    try:
        from transformers.models.llama import modeling_llama as ml
    except ImportError:
        return False
    return all("cache" in inspect.signature(f).parameters for f in (ml.LlamaAttention.forward, ml.LlamaDecoderLayer.forward))


def fuse_projections(model: nn.Module) -> int:
    """Fuse each Llama block's q/k/v and gate/up projections and run its RMSNorms as one op each
    (in place; see the module docstring). Float32 in, float32 out; equal to the unfused model up
    to float rounding (tested against a float64 reference).

    Returns:
        The number of blocks fused; 0 (the model unchanged) for other architectures, transformers
        versions whose Llama modules differ, models in training mode, or a model fused before.
    """
    from transformers.models.llama import modeling_llama as ml

    from .lm import decoder_layers

    if not _llama_fusable(model):
        return 0
    n = 0
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not ml.LlamaAttention or type(mlp) is not ml.LlamaMLP:
            continue
        if not all(type(getattr(attn, p)) is nn.Linear for p in ("q_proj", "k_proj", "v_proj")):
            continue
        attn._n_q = attn.q_proj.out_features // attn.head_dim
        attn._n_kv = attn.k_proj.out_features // attn.head_dim
        attn.qkv = _concat_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        del attn.q_proj, attn.k_proj, attn.v_proj
        _swap_forward(attn, _fused_attention_forward, "Fused")
        mlp._n_inner = mlp.gate_proj.out_features
        mlp.gate_up = _concat_linear([mlp.gate_proj, mlp.up_proj])
        del mlp.gate_proj, mlp.up_proj
        _swap_forward(mlp, _fused_mlp_forward, "Fused")
        if type(layer) is ml.LlamaDecoderLayer:
            _swap_forward(layer, _fused_layer_forward, "Fused")
        n += 1
    for m in list(model.modules()):
        if type(m) is ml.LlamaRMSNorm:
            _swap_forward(m, _rms_norm_forward, "Fused")
    if n and type(model) is ml.LlamaForCausalLM:
        _swap_forward(model, _lean_decode_forward, "Lean")
    return n


def speed_up(model: nn.Module, weights: str = "float32", fuse: bool = True, batch_hint: int = 16) -> dict:
    """Make a float32 CPU model decode faster, in place: fuse its projections (``fuse_projections``),
    then replace its linear layers: packed float32 (``modeling.lm.PackedLinear``), ``FP16Linear``,
    ``BF16Linear``, or ``Int8Linear`` (the LM head then ``BF16Linear``: its product is
    compute-bound in int8 here, and the logits keep more precision).

    Args:
        model: a transformers causal LM, float32, on CPU.
        weights: one of ``WEIGHT_FORMATS``.
        fuse: fuse projections first.
        batch_hint: rows oneDNN packs for.

    Returns:
        ``{"fused_blocks": n, "linears": n, "weights": format, "scripted_blocks": n}`` (blocks
        whose decode step runs as TorchScript: ``script_decode_blocks``); nothing changes (zeros) where the
        model is not float32 on CPU or oneDNN is missing.

    Raises:
        ValueError: an unknown ``weights``, or a format this torch build or CPU cannot run
            (float16 without FBGEMM, int8 without its kernel, bfloat16 and int8 without
            ``bf16_supported``).
    """
    from .lm import PackedLinear

    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, not {weights!r}")
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32 or not onednn_available():
        return {"fused_blocks": 0, "linears": 0, "weights": "float32", "scripted_blocks": 0}
    if weights in ("bfloat16", "int8") and not bf16_supported():
        raise ValueError(f"weights {weights} needs a CPU on which oneDNN runs bfloat16 (AVX512 BW/VL/DQ or "
                         "AVX-NE-CONVERT); this one does not: use float32 or float16")
    fused = fuse_projections(model) if fuse else 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.dtype != torch.float32:
                continue
            keep = child is head
            if weights == "float32":
                new = PackedLinear(child, batch_hint, keep_weight=keep)
            elif weights == "float16":
                new = FP16Linear(child, keep_weight=keep)
            elif weights == "bfloat16" or keep:
                new = BF16Linear(child, batch_hint, keep_weight=keep)
            else:
                new = Int8Linear(child)
            setattr(parent, name, new)
            n += 1
    return {"fused_blocks": fused, "linears": n, "weights": weights, "scripted_blocks": script_decode_blocks(model)}


def script_decode_blocks(model: nn.Module) -> int:
    """Give every fused block of ``model`` its TorchScript decode step (``modeling.decode_script``),
    built over its current linear layers (so after they are replaced). Held outside the module
    tree: ``modules()``, ``parameters()`` and ``state_dict()`` are unchanged.

    Returns:
        The number of blocks scripted (0 where TorchScript refuses them: they keep the eager path).
    """
    from .decode_script import script_decode_block
    from .lm import decoder_layers

    n = 0
    for layer in decoder_layers(model):
        if _SUBCLASSES.get((type(layer).__mro__[1], "Fused")) is not type(layer):  # not a fused block
            continue
        script = script_decode_block(layer)
        if script is None:
            return n
        a, m = layer.self_attn, layer.mlp
        layer.__dict__["_decode_inner"] = (a, m, a.qkv, a.o_proj, m.gate_up, m.down_proj)
        layer.__dict__["_decode_script"] = script
        n += 1
    return n
