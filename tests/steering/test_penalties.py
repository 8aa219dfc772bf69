"""Repetition, frequency and presence penalties: the logits they give against a direct float64
computation, and on the real SmolLM2 a penalised row that breaks its greedy loop while batched and
continuously batched rows get what they get alone."""

from __future__ import annotations

import pytest
import torch

from saesteer.steering.engine import ContinuousBatch
from saesteer.steering.eval.scoring import distinct_bigrams
from saesteer.steering.generate import GenerationSpec, generate, penalized, render_prompt


def test_penalties_match_a_direct_float64_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 4
    spec = GenerationSpec([1, 2, 3, 3], repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25)
    generated = [3, 7, 3, 40]
    got = penalized(logits, spec, generated)
    want = logits.double().clone()
    for t in {1, 2, 3, 7, 40}:  # every token of the prompt or the completion, once
        want[t] = want[t] / 1.3 if want[t] > 0 else want[t] * 1.3
    for t in generated:  # once per occurrence in the completion
        want[t] -= 0.5
    for t in {3, 7, 40}:  # once if present in the completion
        want[t] -= 0.25
    assert got.dtype == torch.float32 and got.shape == logits.shape
    assert float((got.double() - want).norm() / want.norm()) < 1e-6
    untouched = [t for t in range(50) if t not in {1, 2, 3, 7, 40}]
    assert torch.equal(got[untouched], logits[untouched])
    # the prompt alone counts for the repetition penalty, not for OpenAI's two
    only_prompt = penalized(logits, spec, [])
    assert torch.equal(only_prompt[[1, 2, 3]], torch.where(logits[[1, 2, 3]] > 0, logits[[1, 2, 3]] / 1.3, logits[[1, 2, 3]] * 1.3))
    assert penalized(logits, GenerationSpec([1, 2]), generated) is logits  # all off: untouched, no copy


def test_a_penalised_row_breaks_its_loop_and_batches_as_alone(lm):
    model, tok = lm
    poem = render_prompt(tok, messages=[{"role": "user", "content": "Write a short poem."}])
    other = render_prompt(tok, messages=[{"role": "user", "content": "Tell me something interesting."}])
    plain = GenerationSpec(poem, max_new_tokens=40)
    rep = GenerationSpec(poem, max_new_tokens=40, repetition_penalty=1.3)
    freq = GenerationSpec(poem, max_new_tokens=40, frequency_penalty=1.0, presence_penalty=0.5)
    side = GenerationSpec(other, max_new_tokens=12, repetition_penalty=1.2, temperature=0.8, seed=3)
    alone = [generate(model, tok, [s])[0].tokens for s in (plain, rep, freq, side)]
    # the unpenalised greedy poem loops; both kinds of penalty break the loop
    assert distinct_bigrams(alone[0]) < 0.6
    assert distinct_bigrams(alone[1]) > distinct_bigrams(alone[0]) + 0.2
    assert distinct_bigrams(alone[2]) > distinct_bigrams(alone[0]) + 0.2
    batched = generate(model, tok, [plain, rep, freq, side])
    assert [r.tokens for r in batched] == alone
    engine = ContinuousBatch(model, tok, None)
    got: dict[str, list[int]] = {}
    for ev in engine.add_many([(str(i), s) for i, s in enumerate((plain, rep, freq, side))]):
        if ev.finish_reason is not None:
            got[ev.key] = ev.tokens
    while len(engine):
        for ev in engine.step():
            if ev.finish_reason is not None:
                got[ev.key] = ev.tokens
    assert [got[str(i)] for i in range(4)] == alone


@pytest.mark.parametrize("field,value", [("repetition_penalty", 0.0), ("repetition_penalty", 1e-300), ("repetition_penalty", 11.0),
                                         ("frequency_penalty", 2.5), ("presence_penalty", -3.0)])
def test_out_of_range_penalties_are_refused_by_the_schema(field, value):
    from pydantic import ValidationError
    from saesteer_client.schema import GenerateRequest

    with pytest.raises(ValidationError, match=field):
        GenerateRequest(prompt="hi", **{field: value})
