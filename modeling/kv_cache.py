"""A KV cache that appends a decode step's keys and values in place instead of copying the cache.

transformers' ``DynamicLayer.update`` grows each layer's keys and values with ``torch.cat``: every
decode step copies the whole cache, O(T) per layer per step. ``SpareLayer`` keeps them in buffers
with spare columns and appends one step's columns into the spare ones; ``keys`` and ``values`` are
views of the first ``T`` columns. A buffer grows by a quarter of its length (at least 32 columns)
when it is full, so the amortised cost of an append is a few columns' copy, and at most a quarter
of the cache's memory is spare.

Everything else ``DynamicLayer`` offers works on the views (cropping, index selection, assigning
``keys``/``values``); assigning a prefix of the layer's own view (``layer.keys = layer.keys[:, :,
:n]``, what the continuous batch does to undo a failed step) only shortens it, keeping the buffer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

MIN_SPARE = 32
"""The fewest spare columns a buffer is given when it grows."""


class SpareLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values [B, heads, T, head_dim] are views of buffers
    [B, heads, capacity, head_dim] with ``capacity >= T`` (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        self._bufs: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._len = 0
        super().__init__(*args, **kwargs)

    def _view(self, name: str) -> torch.Tensor | None:
        buf = self._bufs[name]
        return buf if buf is None or buf.dim() != 4 else buf[:, :, : self._len]

    def _assign(self, name: str, value: torch.Tensor | None) -> None:
        buf = self._bufs[name]
        if (value is not None and buf is not None and value.dim() == 4 and buf.dim() == 4
                and value.data_ptr() == buf.data_ptr() and value.stride() == buf.stride()
                and value.shape[:2] == buf.shape[:2] and value.shape[3] == buf.shape[3]):
            # a prefix of our own buffer (an undo, a crop): shorten, keep the spare columns
            self._len = value.shape[2]
            return
        self._bufs[name] = value
        if value is not None and value.dim() == 4:
            self._len = value.shape[2]

    keys = property(lambda self: self._view("keys"), lambda self, v: self._assign("keys", v))
    values = property(lambda self: self._view("values"), lambda self, v: self._assign("values", v))

    def reserve(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Make room for ``key_states``/``value_states`` [B, heads, t, head_dim] (their shape and
        dtype; their values are not read) after the layer's T columns, growing the buffers if
        they are full. Returns the buffers (keys, values) [B, heads, capacity, head_dim] and T: the
        caller writes columns T..T+t-1 of both and then calls ``commit(t)``.

        Raises:
            ValueError: the layer holds columns of another batch size, head count or head width
                (transformers' ``torch.cat`` would refuse them too)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kb, vb = self._bufs["keys"], self._bufs["values"]
        held = kb is not None and vb is not None and kb.dim() == 4 and vb.dim() == 4
        n, t = (self._len if held else 0), key_states.shape[-2]
        same_shape = held and all(b.shape[:2] == x.shape[:2] and b.shape[3] == x.shape[3]
                                  for b, x in ((kb, key_states), (vb, value_states)))
        if n and not same_shape:
            raise ValueError(f"KV cache layer holds [B, heads, T, head_dim] = {tuple(kb.shape[:2])} x {n} x "
                             f"{kb.shape[3]}; cannot append {tuple(key_states.shape)}")
        if (not same_shape or n + t > min(kb.shape[2], vb.shape[2])
                or kb.dtype != key_states.dtype or vb.dtype != value_states.dtype):
            cap = n + t + max(MIN_SPARE, (n + t) // 4)
            self._bufs["keys"], self._bufs["values"] = (self._grown(kb, key_states, n, cap),
                                                        self._grown(vb, value_states, n, cap))
            self._len = n
        return self._bufs["keys"], self._bufs["values"], n

    def commit(self, t: int) -> None:
        """The caller of ``reserve`` wrote ``t`` more columns: the layer holds T + t."""
        self._len += t

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``key_states``/``value_states`` [B, heads, t, head_dim] after the layer's T
        columns; returns the keys and values [B, heads, T + t, head_dim] (views)."""
        kb, vb, n = self.reserve(key_states, value_states)
        t = key_states.shape[-2]
        kb[:, :, n: n + t].copy_(key_states)
        vb[:, :, n: n + t].copy_(value_states)
        self.commit(t)
        return self.keys, self.values

    @staticmethod
    def _grown(old: torch.Tensor | None, new: torch.Tensor, n: int, cap: int) -> torch.Tensor:
        buf = new.new_empty((*new.shape[:2], cap, new.shape[3]))
        if n:
            buf[:, :, :n].copy_(old[:, :, :n])
        return buf


def spare_cache(config) -> DynamicCache:
    """An empty ``DynamicCache`` for ``config`` whose layers are ``SpareLayer``s (a config with
    sliding-window layers keeps transformers' own layers)."""
    cache = DynamicCache(config=config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [SpareLayer() for _ in cache.layers]
    return cache
