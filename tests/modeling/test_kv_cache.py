"""modeling.kv_cache: a SpareLayer holds what transformers' DynamicLayer holds after the same
updates, appends in place into spare columns, and shortens without copying when the continuous
batch undoes a step; the continuous batch decodes with it the tokens the model's own cache gives."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from saesteer.steering.engine import ContinuousBatch
from saesteer.steering.generate import GenerationSpec, generate, render_prompt
from saesteer.modeling.kv_cache import MIN_SPARE, SpareLayer, spare_cache


def test_spare_layer_holds_what_a_dynamic_layer_holds_and_appends_in_place():
    g = torch.Generator().manual_seed(0)
    spare, ref = SpareLayer(), DynamicLayer()
    assert spare.get_seq_length() == 0
    prefill = (torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g))
    for layer in (spare, ref):
        layer.update(*prefill)
    storage = spare.keys.untyped_storage().data_ptr()
    for t in range(MIN_SPARE + 10):  # past the first buffer's spare columns: it grows once
        k, v = torch.randn(2, 3, 1, 4, generator=g), torch.randn(2, 3, 1, 4, generator=g)
        ks, vs = spare.update(k, v)
        kr, vr = ref.update(k, v)
        assert torch.equal(ks, kr) and torch.equal(vs, vr)
        if t < MIN_SPARE:  # within the spare columns: no new buffer, no copy of the cache
            assert spare.keys.untyped_storage().data_ptr() == storage
    assert spare.get_seq_length() == ref.get_seq_length() == 5 + MIN_SPARE + 10
    assert spare.keys.untyped_storage().data_ptr() != storage  # it grew


def test_assigning_a_prefix_shortens_and_other_tensors_replace():
    layer = SpareLayer()
    layer.update(torch.ones(1, 2, 4, 3), torch.ones(1, 2, 4, 3))
    layer.update(torch.full((1, 2, 1, 3), 2.0), torch.full((1, 2, 1, 3), 2.0))
    storage = layer.keys.untyped_storage().data_ptr()
    layer.keys, layer.values = layer.keys[:, :, :4], layer.values[:, :, :4]  # the engine's undo
    assert layer.get_seq_length() == 4 and layer.keys.untyped_storage().data_ptr() == storage
    k, _ = layer.update(torch.full((1, 2, 1, 3), 3.0), torch.full((1, 2, 1, 3), 3.0))
    assert k[0, 0, :, 0].tolist() == [1, 1, 1, 1, 3] and layer.keys.untyped_storage().data_ptr() == storage
    other = torch.zeros(1, 2, 7, 3)
    layer.keys, layer.values = other, other.clone()  # not its own buffer: taken as it is
    assert layer.get_seq_length() == 7 and layer.keys.data_ptr() == other.data_ptr()
    k, _ = layer.update(torch.ones(1, 2, 1, 3), torch.ones(1, 2, 1, 3))
    assert k.shape == (1, 2, 8, 3) and float(k[0, 0, -1, 0]) == 1 and float(other.sum()) == 0  # copied, not written into
    for _ in range(MIN_SPARE):  # fill the spare columns: the next append of another batch size must grow
        layer.update(torch.ones(1, 2, 1, 3), torch.ones(1, 2, 1, 3))
    with pytest.raises(ValueError, match="cannot append"):  # never broadcast one row's cache into two
        layer.update(torch.ones(2, 2, 1, 3), torch.ones(2, 2, 1, 3))


def test_the_continuous_batch_decodes_with_spare_layers_the_tokens_of_the_models_own_cache(lm):
    model, tok = lm
    assert all(type(layer) is SpareLayer for layer in spare_cache(model.config).layers)
    specs = [GenerationSpec(render_prompt(tok, messages=[{"role": "user", "content": p}]), max_new_tokens=12, ignore_eos=True)
             for p in ("Name three rivers.", "What is the capital of France? Answer in one sentence.")]
    want = [r.tokens for r in generate(model, tok, specs)]  # transformers' DynamicCache
    eng = ContinuousBatch(model, tok)
    got = {}
    eng.add_many([("a", specs[0]), ("b", specs[1])])
    assert all(type(layer) is SpareLayer for layer in eng.cache.layers)
    while len(eng):
        for ev in eng.step():
            if ev.finish_reason is not None:
                got[ev.key] = ev.tokens
    assert [got["a"], got["b"]] == want
