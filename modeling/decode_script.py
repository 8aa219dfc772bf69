"""One fused Llama block's decode step compiled with TorchScript: the ~25 small operations of a
block between its four linear layers run without Python in between.

TorchScript rather than ``torch.compile``, which breaks the graph at every packed linear layer
(the measurements: ``docs/continuous_batching.md``), though PyTorch marks ``torch.jit.script``
deprecated; where it is missing or refuses the block, ``script_decode_blocks`` leaves the eager
path in place.

``DecodeBlock.forward`` computes what ``modeling.cpu_kernels._fused_layer_forward`` computes for one
new token per row, with the same operations in the same order (equal logits, tested), and writes
the step's keys and values into the KV cache's spare columns (``modeling.kv_cache.SpareLayer``).
The block's own forward uses it only where nothing hooks its attention, MLP or linear modules
(their hooks would not run inside TorchScript); the block module itself is still called as a
module, so the residual-stream hook points (``hook_resid_pre``/``hook_resid_post``) and every
steering hook at them run as before.

This file has no ``from __future__ import annotations``: TorchScript reads the annotations.
"""

import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


class DecodeBlock(nn.Module):
    """A fused Llama block (``modeling.cpu_kernels.fuse_projections``) for TorchScript, sharing its
    weights and linear modules.

    ``forward(x, cos, ssin, kb, vb, n, mask)``: x [B, 1, d_model] float32 (the block's input);
    cos, ssin [B, 1, 1, head_dim] (``_rope_tables``); kb, vb the KV cache's key and value buffers
    [B, kv_heads, capacity, head_dim], of which columns < n hold the past and column n receives
    this step's keys and values (written in place); mask None or the attention mask [B, 1, 1,
    n + 1] (bool, True: attend). Returns the block's output [B, 1, d_model] float32.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        a, m = layer.self_attn, layer.mlp
        self.qkv, self.o_proj, self.gate_up, self.down_proj = a.qkv, a.o_proj, m.gate_up, m.down_proj
        self.w1 = layer.input_layernorm.weight
        self.w2 = layer.post_attention_layernorm.weight
        self.eps1 = float(layer.input_layernorm.variance_epsilon)
        self.eps2 = float(layer.post_attention_layernorm.variance_epsilon)
        self.nq, self.nkv, self.hd, self.ni = int(a._n_q), int(a._n_kv), int(a.head_dim), int(m._n_inner)
        self.scale = float(a.scaling)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, ssin: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor,
                n: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, T, D = x.size(0), x.size(1), x.size(2)
        nq, nkv, hd = self.nq, self.nkv, self.hd
        h = torch.rms_norm(x, [D], self.w1, self.eps1)
        qkv = self.qkv(h).view(B, T, nq + 2 * nkv, hd).transpose(1, 2)  # [B, heads, T, hd]
        qk, v = qkv[:, : nq + nkv], qkv[:, nq + nkv:]
        qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), ssin)
        q, k = qk[:, :nq], qk[:, nq:]
        kb[:, :, n: n + T] = k
        vb[:, :, n: n + T] = v
        out = F.scaled_dot_product_attention(q, kb[:, :, : n + T], vb[:, :, : n + T], attn_mask=mask, scale=self.scale,
                                             enable_gqa=nq != nkv)
        x = x + self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        h = torch.rms_norm(x, [D], self.w2, self.eps2)
        gu = self.gate_up(h)
        return x + self.down_proj(F.silu(gu[..., : self.ni]) * gu[..., self.ni:])


def script_decode_block(layer: nn.Module):
    """``torch.jit.script(DecodeBlock(layer))``, or None where TorchScript is missing or refuses
    it (a linear layer whose forward it cannot compile, say)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in 2.1x
            return torch.jit.script(DecodeBlock(layer))
    except Exception:  # noqa: BLE001 - any refusal leaves the eager path, which is always correct
        return None
