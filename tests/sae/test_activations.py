"""Activation collection on the real SmolLM2: sinks kept out, several hook points in one pass."""

from __future__ import annotations

import itertools

import torch

from saesteer.sae.activations import collect_activations, hook_activations, sink_mask, special_token_mask, token_windows

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
    # the same tokens at every hook point: those that are no sink at any of them and not special
    windows = torch.tensor(list(itertools.islice(token_windows(TEXTS, tok, 32), 8)))
    expected: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for b in windows.split(4):  # the batches collection runs (each batch's own median norm)
        direct = hook_activations(model, hooks, b)
        keep = special_token_mask(b, tok)
        for h in hooks:
            keep = keep & sink_mask(direct[h])
        for h in hooks:
            expected[h].append(direct[h][keep])
    for h in hooks:
        assert together[h].shape == (200, 576)
        torch.testing.assert_close(together[h].float(), torch.cat(expected[h])[:200].half().float())
        alone = collect_activations(model, tok, h, TEXTS, 200, context_size=32, batch_size=4, progress=False)
        assert alone.shape == (200, 576)
    assert not torch.equal(together[hooks[1]], together[hooks[2]])


def test_hook_points_read_and_replace_inputs_and_outputs(lm):
    """blocks.10.hook_resid_post (an output) and blocks.11.hook_resid_pre (an input) are the same
    residual stream; a replacement at either changes the logits the same way."""
    from saesteer.modeling.lm import resolve_hook_point

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


def test_a_sink_at_any_hook_point_is_left_out_at_all(lm):
    """A window that starts with a blank line: its second token, a newline, has an ordinary norm at
    block 10 but is a massive-activation sink by block 18 (measured ~24,000 against ~175). Collected
    together, neither hook point keeps it (judging by block 10 alone let it into block 18's data)."""
    model, tok = lm
    text = "\n\nThe sea was calm and the sky was grey over the harbour that morning."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    hooks = ["blocks.10.hook_resid_post", "blocks.18.hook_resid_post"]
    w = torch.tensor([ids])
    direct = hook_activations(model, hooks, w)
    n10, n18 = (direct[h][0].norm(dim=-1) for h in hooks)
    assert n18[1] > 50 * n18[2:].median() and n10[1] < 3 * n10[2:].median()  # the later sink, at block 18 only
    got = collect_activations(model, tok, hooks, [text], 10_000, context_size=len(ids), batch_size=1, progress=False)
    keep = sink_mask(direct[hooks[0]]) & sink_mask(direct[hooks[1]])
    assert not keep[0, 1] and int(keep.sum()) == len(ids) - 2  # positions 0 and 1 left out
    for h in hooks:
        assert got[h].shape[0] == len(ids) - 2
        torch.testing.assert_close(got[h].float(), direct[h][keep].half().float())
    n = got[hooks[1]].float().norm(dim=-1)
    assert float(n.max()) < 3 * float(n.median())
