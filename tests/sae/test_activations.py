"""Activation collection on the real SmolLM2: sinks kept out, several hook points in one pass."""

from __future__ import annotations

import torch

from saesteer.sae.activations import collect_activations, hook_activations, sink_mask

TEXTS = ["The interpreter reads the module and runs it.\n\nA fortune: you will travel far."] * 12


def test_the_attention_sink_is_left_out(lm):
    model, tok = lm
    ids = torch.tensor([tok(TEXTS[0], add_special_tokens=False)["input_ids"]])
    acts = hook_activations(model, ["blocks.10.hook_resid_post", "blocks.15.hook_resid_post"], ids)
    n10, n15 = (acts[h][0].norm(dim=-1) for h in ("blocks.10.hook_resid_post", "blocks.15.hook_resid_post"))
    # measured: the massive first-position activation has formed by block 15 (~24,000 vs ~180),
    # not yet at block 10, where position 0 looks ordinary; collection drops position 0 at every block
    assert n15[0] > 50 * n15[1:].median()
    assert n10[0] < 3 * n10[1:].median()
    for h in acts:
        keep = sink_mask(acts[h])[0]
        assert not keep[0] and keep[1:].float().mean() > 0.9


def test_several_hook_points_in_one_pass_equal_separate_passes(lm):
    model, tok = lm
    hooks = ["blocks.6.hook_resid_post", "blocks.10.hook_resid_post", "blocks.10.hook_mlp_out"]
    together = collect_activations(model, tok, hooks, TEXTS, 200, context_size=32, batch_size=4, progress=False)
    for h in hooks:
        alone = collect_activations(model, tok, h, TEXTS, 200, context_size=32, batch_size=4, progress=False)
        # the same tokens are kept at every hook point (sinks judged at the first one), so compare the first hook exactly
        if h == hooks[0]:
            assert torch.equal(together[h], alone)
        assert together[h].shape == (200, 576)
    assert not torch.equal(together[hooks[1]], together[hooks[2]])


def test_hook_points_read_and_replace_inputs_and_outputs(lm):
    """blocks.10.hook_resid_post (an output) and blocks.11.hook_resid_pre (an input) are the same
    residual stream; a replacement at either changes the logits the same way."""
    from saesteer.sae.lm import resolve_hook_point

    model, tok = lm
    ids = torch.tensor([tok(TEXTS[0], add_special_tokens=False)["input_ids"]])
    both = hook_activations(model, ["blocks.10.hook_resid_post", "blocks.11.hook_resid_pre"], ids)
    assert torch.equal(both["blocks.10.hook_resid_post"], both["blocks.11.hook_resid_pre"])
    logits = {}
    for name in ("blocks.10.hook_resid_post", "blocks.11.hook_resid_pre"):
        handle = resolve_hook_point(model, name).attach(lambda x: x * 0.5)
        try:
            logits[name] = model(input_ids=ids, use_cache=False).logits
        finally:
            handle.remove()
    assert torch.equal(logits["blocks.10.hook_resid_post"], logits["blocks.11.hook_resid_pre"])
    assert not torch.allclose(logits["blocks.10.hook_resid_post"], model(input_ids=ids, use_cache=False).logits)
