"""Continuous batching on the real SmolLM2 and the default SAE: rows that join and leave the running
batch get what they would get alone."""

from __future__ import annotations

import pytest

from saesteer.sae.activations import hook_activations
from saesteer.steering.engine import CANCELLED, ContinuousBatch
from saesteer.steering.generate import GenerationSpec, generate, render_prompt
from saesteer.steering.hooks import Steerer
from saesteer.steering.plan import InterventionPlan, LatentEdit, When

PROMPTS = ["Tell me something interesting.", "Describe a place you like.", "Write one sentence about your morning.",
           "Name three colours."]


def chat(tok, text):
    return render_prompt(tok, messages=[{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def setup(lm, python_sae):
    model, tok = lm
    sid = python_sae.cfg.hook_point
    return model, tok, sid, Steerer(model, {sid: python_sae})


def run_staggered(engine: ContinuousBatch, specs: list[GenerationSpec], join_at: list[int]) -> dict[str, list]:
    """Drive ``engine``: spec i joins before decode step ``join_at[i]`` (those joining at one step
    are prefilled together); every row's events."""
    events: dict[str, list] = {}
    step = 0
    while True:
        joining = [(str(i), s) for i, s in enumerate(specs) if join_at[i] == step]
        if joining:
            for ev in engine.add_many(joining):
                events.setdefault(ev.key, []).append(ev)
        if not len(engine) and all(j <= step for j in join_at):
            return events
        for ev in engine.step():
            events.setdefault(ev.key, []).append(ev)
        step += 1


def test_rows_joining_and_leaving_get_what_they_get_alone(setup):
    model, tok, sid, steer = setup
    plans = [InterventionPlan(latent_edits=[LatentEdit(sid, 123, "clamp", 30.0, "all")]), InterventionPlan(),
             InterventionPlan(latent_edits=[LatentEdit(sid, 3656, "scale", 0.0, "generated")]), InterventionPlan()]
    lengths = [12, 4, 9, 6]
    specs = [GenerationSpec(chat(tok, p), max_new_tokens=n, plan=pl) for p, n, pl in zip(PROMPTS, lengths, plans)]
    specs[3].temperature, specs[3].seed = 0.9, 7
    engine = ContinuousBatch(model, tok, steer)
    events = run_staggered(engine, specs, join_at=[0, 0, 2, 5])  # 3 joins after 1 has left
    alone = [generate(model, tok, [s], steer)[0] for s in specs]
    for i, a in enumerate(alone):
        evs = events[str(i)]
        last = evs[-1]
        assert last.tokens == a.tokens, i
        assert [e.token for e in evs] == a.tokens  # one event per token, in order
        assert "".join(e.text for e in evs) == last.full_text == a.text  # the streamed text adds up
        assert last.finish_reason == a.finish_reason and all(e.finish_reason is None for e in evs[:-1])
    assert len(engine) == 0 and engine.cache is None  # every row left, its KV freed


def test_cancel_frees_the_row_and_the_others_go_on(setup):
    model, tok, sid, steer = setup
    specs = [GenerationSpec(chat(tok, p), max_new_tokens=8) for p in PROMPTS[:3]]
    engine = ContinuousBatch(model, tok, steer)
    firsts = [engine.add(str(i), s) for i, s in enumerate(specs)]
    engine.step()
    width = engine.cache.layers[0].keys.shape[0]
    ev = engine.cancel("1")
    assert ev.error == CANCELLED and ev.finish_reason == "error" and ev.tokens is not None
    assert engine.keys() == ["0", "2"] and engine.cache.layers[0].keys.shape[0] == width - 1
    assert engine.cancel("1") is None
    rest: dict[str, list] = {}
    while len(engine):
        for e in engine.step():
            rest.setdefault(e.key, []).append(e)
    alone = generate(model, tok, [specs[0], specs[2]], steer)
    assert rest["0"][-1].tokens == alone[0].tokens and rest["2"][-1].tokens == alone[1].tokens
    assert firsts[0].token == alone[0].tokens[0]


def test_stop_strings_are_never_streamed_past(setup):
    model, tok, sid, steer = setup
    spec = GenerationSpec(chat(tok, PROMPTS[0]), max_new_tokens=30)
    full = generate(model, tok, [spec], steer)[0].text
    stop = full.split()[3]  # a word the completion reaches
    spec_stop = GenerationSpec(chat(tok, PROMPTS[0]), max_new_tokens=30, stop=[stop])
    engine = ContinuousBatch(model, tok, steer)
    evs = [engine.add("a", spec_stop)]
    while len(engine):
        evs += engine.step()
    streamed = "".join(e.text for e in evs)
    assert stop not in streamed and streamed == evs[-1].full_text == generate(model, tok, [spec_stop], steer)[0].text
    assert evs[-1].finish_reason == "stop"


def test_once_fired_condition_survives_steps(setup, python_sae):
    """A once_fired condition that fired in the prompt keeps holding at every decode step (each
    step is a steer block of its own; the fired state is carried between them)."""
    import torch

    model, tok, sid, steer = setup
    ids = chat(tok, PROMPTS[1])
    # not output_hidden_states=True: transformers would leave capture hooks on the shared model's
    # attention modules, which turn its TorchScript decode steps off for every later test
    x = hook_activations(model, sid, torch.tensor([ids]))
    z = python_sae.encode(x.float())[0, 1:]  # [tokens, d_sae], the sink left out
    fires = (z > 0).sum(0)
    latent = int(torch.where(fires == 1, z.max(0).values, torch.zeros(())).argmax())  # fires on one prompt token only
    assert fires[latent] == 1
    when = When(sid, latent, 0.0, once=True)
    plan = InterventionPlan(latent_edits=[LatentEdit(sid, 123, "clamp", 30.0, "generated", when=when)])
    spec = GenerationSpec(ids, max_new_tokens=8, plan=plan)
    engine = ContinuousBatch(model, tok, steer)
    evs = [engine.add("a", spec)]
    while len(engine):
        evs += engine.step()
    static = generate(model, tok, [spec], steer)[0].tokens
    assert evs[-1].tokens == static
    unsteered = generate(model, tok, [GenerationSpec(ids, max_new_tokens=8)])[0].tokens
    assert static != unsteered  # the condition held on the generated tokens


def test_an_exception_in_one_rows_step_ends_only_that_row(setup):
    model, tok, sid, steer = setup
    specs = [GenerationSpec(chat(tok, p), max_new_tokens=6) for p in PROMPTS[:3]]
    engine = ContinuousBatch(model, tok, steer)
    engine.add_many([(str(i), s) for i, s in enumerate(specs)])
    # a plan that slipped past validation: the hook's index lookup raises at the next forward
    engine.rows[1].spec.plan = InterventionPlan(latent_edits=[LatentEdit(sid, 10**6, "clamp", 1.0, "all")])
    events: dict[str, list] = {}
    while len(engine):
        for e in engine.step():
            events.setdefault(e.key, []).append(e)
    assert events["1"][-1].finish_reason == "error" and events["1"][-1].error.startswith("exception:")
    alone = generate(model, tok, [specs[0], specs[2]], steer)
    assert events["0"][-1].tokens == alone[0].tokens and events["2"][-1].tokens == alone[1].tokens
