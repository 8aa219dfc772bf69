"""Chat-template special tokens stay out of activation collection (corpus README), on the real model."""

from __future__ import annotations

import torch

from saesteer.sae.activations import collect_activations, hook_activations, sink_mask, special_token_mask


def test_collection_skips_chat_template_tokens(lm):
    model, tok = lm
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Tell me about cats."}, {"role": "assistant", "content": "Cats are small mammals that purr."}],
        tokenize=False,
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    specials = set(tok.all_special_ids)
    n_special = sum(i in specials for i in ids)
    assert n_special >= 6  # <|im_start|> and <|im_end|> around three turns
    window = torch.tensor([ids])
    mask = special_token_mask(window, tok)
    assert int((~mask).sum()) == n_special
    acts = collect_activations(model, tok, "blocks.10.hook_resid_post", [text], n_tokens=10_000, context_size=len(ids) - 1,
                               progress=False)
    # the one window holds the first len(ids) - 1 tokens; kept: not position 0, not special, not a secondary sink
    w = torch.tensor([ids[: len(ids) - 1]])
    direct = hook_activations(model, "blocks.10.hook_resid_post", w)
    keep = sink_mask(direct) & special_token_mask(w, tok)
    assert acts.shape[0] == int(keep.sum()) < w.shape[1] - n_special + 1
    torch.testing.assert_close(acts.float(), direct[keep].half().float())
