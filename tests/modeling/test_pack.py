"""oneDNN-packed linear layers on the real SmolLM2: the same logits (float64 reference) and tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from saesteer.modeling.lm import PackedLinear, pack_linears
from saesteer.steering.generate import GenerationSpec, generate, render_prompt


@pytest.fixture(scope="module")
def models(lm):
    model, tok = lm
    packed = copy.deepcopy(model)
    n = pack_linears(packed)
    if n == 0:
        pytest.skip("oneDNN is not available in this torch build")
    return model, packed, tok, n


def test_every_linear_is_packed_and_the_head_keeps_its_weight(models):
    model, packed, _, n = models
    assert n == 30 * 7 + 1  # q, k, v, o, gate, up, down per block, and the LM head
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    head = packed.get_output_embeddings()
    assert isinstance(head, PackedLinear) and head.weight is not None


@pytest.mark.slow
def test_packed_logits_match_a_float64_reference(models):
    model, packed, tok, _ = models
    ids = torch.tensor([render_prompt(tok, messages=[{"role": "user", "content": "Name three rivers."}])])
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(input_ids=ids).logits
        plain = model(input_ids=ids).logits.double()
        fast = packed(input_ids=ids).logits.double()
    err = lambda a: float((a - ref).norm() / ref.norm())  # noqa: E731
    assert err(fast) < 1e-5 and err(fast) < 10 * err(plain) + 1e-7, (err(fast), err(plain))


@pytest.mark.slow
def test_packed_generation_gives_the_same_tokens(models):
    model, packed, tok, _ = models
    specs = [GenerationSpec(render_prompt(tok, messages=[{"role": "user", "content": p}]), max_new_tokens=12)
             for p in ("Tell me something interesting.", "Describe a place you like.")]
    assert [r.tokens for r in generate(packed, tok, specs)] == [r.tokens for r in generate(model, tok, specs)]
