"""Steering hooks on the real SmolLM2-135M-Instruct with the default SAE (no mocks)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from saesteer.steering.generate import GenerationSpec, generate, render_prompt
from saesteer.steering.core import StepPositions
from saesteer.steering.hooks import Steerer
from saesteer.steering.plan import InterventionPlan, LatentEdit, VectorEdit

PROMPTS = ["Tell me something interesting.", "Describe a place you like.", "Write one sentence about your morning."]


def chat(tok, text):
    return render_prompt(tok, messages=[{"role": "user", "content": text}])


def forward(model, ids, steerer=None, plans=None, capture=None):
    """Logits [1, T, vocab] of one prompt, optionally steered; with ``capture`` ({"hook": name}),
    the hook point's output (after steering: the capture hook is registered last) lands in
    ``capture["out"]``."""
    x = torch.tensor([ids])
    pos = StepPositions(abs_pos=torch.arange(len(ids)).unsqueeze(0), prompt_len=torch.tensor([len(ids)]))
    with steerer.steer(plans, pos) if steerer is not None else nullcontext():
        handle = None
        if capture is not None:
            layer = model.model.layers[int(capture["hook"].split(".")[1])]
            handle = layer.register_forward_hook(lambda m, a, o: capture.__setitem__("out", o.detach().clone()))
        try:
            return model(input_ids=x, use_cache=False).logits
        finally:
            if handle is not None:
                handle.remove()


@pytest.fixture(scope="module")
def setup(lm, python_sae):
    model, tok = lm
    sid = "default"
    return model, tok, sid, python_sae


def fired_latent(sae, acts):
    """A latent that fires at a late position of ``acts`` [T, d_in]: (latent, position, activation)."""
    z = sae.encode(acts)
    z[0] = 0  # never the sink
    pos = int(z.max(-1).values.argmax())
    lat = int(z[pos].argmax())
    return lat, pos, float(z[pos, lat])


def test_idle_hook_is_transparent(setup):
    """The full-decode path with no effective edit gives the plain model's logits (error term kept)."""
    model, tok, sid, sae = setup
    ids = chat(tok, PROMPTS[0])
    plain = forward(model, ids)
    full = Steerer(model, {sid: sae}, full=True)
    # an edit that changes nothing: scale by exactly 1 on every position
    noop = InterventionPlan(latent_edits=[LatentEdit(sid, 7, "scale", 1.0, "all")])
    steered_full = forward(model, ids, full, [noop])
    rel = (steered_full - plain).norm() / plain.norm()
    assert rel < 1e-5, rel
    fast = Steerer(model, {sid: sae})
    assert torch.equal(forward(model, ids, fast, [noop]), plain)  # sparse delta of a no-op is exactly 0
    assert torch.equal(forward(model, ids, fast, [InterventionPlan()]), plain)


def test_clamp_sets_latent_and_residual_matches_float64_reference(setup):
    model, tok, sid, sae = setup
    ids = chat(tok, PROMPTS[1])
    clean = {"hook": sae.cfg.hook_point}
    forward(model, ids, capture=clean)
    x = clean["out"][0]  # [T, d_in]
    lat, value = 123, 17.5
    steer = Steerer(model, {sid: sae})
    cap = {"hook": sae.cfg.hook_point}
    forward(model, ids, steer, [InterventionPlan(latent_edits=[LatentEdit(sid, lat, "clamp", value, "all")])], capture=cap)
    # float64 reference: x + (v - z) * W_dec[lat] at positions >= 1; position 0 (sink) untouched
    x64 = x.double()
    pre = (x64 * sae.cfg.input_scale - sae.b_dec.double()) @ sae.W_enc.double()[:, lat] + sae.b_enc.double()[lat]
    z = torch.where(pre > sae.threshold.double()[lat], pre, torch.zeros_like(pre)).clamp(min=0)
    ref = x64 + (value - z).unsqueeze(-1) * (sae.W_dec.double()[lat] / sae.cfg.input_scale)
    ref[0] = x64[0]
    got = cap["out"][0].double()
    assert ((got - ref).norm() / ref.norm()) < 1e-5
    # the latent's code after the edit is the requested value: the edit moved x by exactly (v - z) decoder rows
    dz = ((got - x64) @ (sae.W_dec.double()[lat] / sae.cfg.input_scale)) / (sae.W_dec.double()[lat] / sae.cfg.input_scale).pow(2).sum()
    assert torch.allclose(z[1:] + dz[1:], torch.full_like(dz[1:], value), rtol=1e-4)
    assert not torch.equal(got[1:], x64[1:])


def test_ablate_removes_a_firing_latent(setup):
    model, tok, sid, sae = setup
    ids = chat(tok, PROMPTS[2])
    clean = {"hook": sae.cfg.hook_point}
    plain_logits = forward(model, ids, capture=clean)
    x = clean["out"][0]
    lat, pos, act = fired_latent(sae, x)
    assert act > 0
    cap = {"hook": sae.cfg.hook_point}
    steer = Steerer(model, {sid: sae})
    logits = forward(model, ids, steer, [InterventionPlan(latent_edits=[LatentEdit(sid, lat, "ablate", 0.0, "all")])], capture=cap)
    removed = x - cap["out"][0]  # what the hook took out, per position
    expected = sae.encode(x)[:, lat].unsqueeze(-1) * sae.decoder_directions(torch.tensor([lat]))[0]
    expected[0] = 0
    assert torch.allclose(removed, expected, atol=1e-3)
    assert float(removed[pos].norm()) > 0
    assert not torch.allclose(logits, plain_logits)


def test_sparse_delta_equals_full_decode(setup):
    model, tok, sid, sae = setup
    ids = chat(tok, PROMPTS[0])
    plan = InterventionPlan(latent_edits=[
        LatentEdit(sid, 5, "clamp", 12.0, "all"),
        LatentEdit(sid, 900, "scale", 3.0, "prompt"),
        LatentEdit(sid, 77, "add", -4.0, (3, 4, 9)),
    ])
    fast = forward(model, ids, Steerer(model, {sid: sae}), [plan])
    full = forward(model, ids, Steerer(model, {sid: sae}, full=True), [plan])
    assert ((fast - full).norm() / full.norm()) < 1e-5


def test_positions_generated_leaves_prompt_untouched(setup):
    model, tok, sid, sae = setup
    ids = chat(tok, PROMPTS[0])
    plain = forward(model, ids)
    steer = Steerer(model, {sid: sae})
    gen_only = InterventionPlan(latent_edits=[LatentEdit(sid, 5, "clamp", 50.0, "generated")])
    assert torch.equal(forward(model, ids, steer, [gen_only]), plain)
    explicit = InterventionPlan(latent_edits=[LatentEdit(sid, 5, "clamp", 50.0, (len(ids) - 1,))])
    out = forward(model, ids, steer, [explicit])
    assert torch.equal(out[0, :-1], plain[0, :-1]) and not torch.equal(out[0, -1], plain[0, -1])


def test_heterogeneous_batch_equals_one_by_one(setup):
    model, tok, sid, sae = setup
    steer = Steerer(model, {sid: sae})
    vec = sae.W_dec[300].detach() / sae.cfg.input_scale * 8.0
    plans = [
        InterventionPlan(latent_edits=[LatentEdit(sid, 123, "clamp", 30.0, "all")]),
        InterventionPlan(),
        InterventionPlan(vector_edits=[VectorEdit(sae.cfg.hook_point, vec, "all")]),
    ]
    specs = [GenerationSpec(chat(tok, p), max_new_tokens=10, plan=pl) for p, pl in zip(PROMPTS, plans)]
    batched = generate(model, tok, specs, steer)
    alone = [generate(model, tok, [s], steer)[0] for s in specs]
    assert [r.tokens for r in batched] == [r.tokens for r in alone]
    plain = generate(model, tok, [GenerationSpec(s.input_ids, max_new_tokens=10) for s in specs])
    assert batched[1].tokens == plain[1].tokens  # the unsteered row is untouched by its neighbours
    assert batched[0].tokens != plain[0].tokens  # the clamp changed its row


def test_kv_cache_generation_equals_recompute(setup):
    """Steered generation with the cache gives the tokens of steered full recomputation per step."""
    model, tok, sid, sae = setup
    steer = Steerer(model, {sid: sae})
    plan = InterventionPlan(latent_edits=[LatentEdit(sid, 123, "clamp", 30.0, "all")])
    ids = chat(tok, PROMPTS[1])
    cached = generate(model, tok, [GenerationSpec(ids, max_new_tokens=6, plan=plan)], steer)[0].tokens
    seq = list(ids)
    for _ in range(6):
        logits = forward(model, seq, steer, [plan])
        seq.append(int(logits[0, -1].argmax()))
    assert cached == seq[len(ids):]


def test_seeded_sampling_is_reproducible(setup):
    model, tok, sid, sae = setup
    ids = chat(tok, PROMPTS[0])
    spec = lambda seed: GenerationSpec(ids, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=seed)  # noqa: E731
    runs = generate(model, tok, [spec(1), spec(1), spec(2), spec(3), spec(4)])
    assert runs[0].tokens == runs[1].tokens
    assert any(r.tokens != runs[0].tokens for r in runs[2:])  # the seed matters


@pytest.mark.slow
def test_bfloat16_model_steers_like_float32(setup):
    """Reduced precision (the GPU serving dtype): the SAE math stays float32 and the delta is cast to
    the model's dtype; idle steering is exact, sparse equals full decode, and the steer matches fp32's."""
    import copy

    model, tok, sid, sae = setup
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    ids = render_prompt(tok, messages=[{"role": "user", "content": "Tell me something interesting."}])
    x = torch.tensor([ids])
    pos = StepPositions(abs_pos=torch.arange(len(ids)).unsqueeze(0), prompt_len=torch.tensor([len(ids)]))
    with torch.no_grad():
        plain = m16(input_ids=x).logits
        idle_plan = InterventionPlan(latent_edits=[LatentEdit(sid, 3656, "scale", 1.0, "all")])
        with Steerer(m16, {sid: sae}).steer([idle_plan], pos):
            idle = m16(input_ids=x).logits
    assert plain.dtype == torch.bfloat16 and torch.equal(idle, plain)
    plan = InterventionPlan(latent_edits=[LatentEdit(sid, 3656, "clamp", 12.0, "all")])
    spec = [GenerationSpec(ids, 12, plan=plan)]
    fast = generate(m16, tok, spec, Steerer(m16, {sid: sae}))[0].tokens
    fp32 = generate(model, tok, spec, Steerer(model, {sid: sae}))[0].tokens
    plain_tokens = generate(m16, tok, [GenerationSpec(ids, 12)])[0].tokens
    assert fast[:5] == fp32[:5] and fast != plain_tokens  # the same code-like opening as in float32
    # sparse equals full decode up to bfloat16 rounding (their deltas sum in different orders, and
    # bfloat16 rounds the whole forward: measured 1.1 % and 1.3 % relative error from the float32
    # model's steered logits, 1.4 % from each other): teacher-forced on the same tokens, both are
    # as close to float32 as bfloat16 allows, and their greedy choices agree wherever the top two
    # logits are apart by more than that noise (this steer ties them exactly at its 6th token)
    x = torch.tensor([ids + fast])
    pos = StepPositions(abs_pos=torch.arange(x.shape[1]).unsqueeze(0), prompt_len=torch.tensor([len(ids)]))
    with torch.no_grad():
        logits = []
        for m, full in ((m16, False), (m16, True), (model, False)):
            with Steerer(m, {sid: sae}, full=full).steer([plan], pos):
                logits.append(m(input_ids=x).logits[0, len(ids) - 1:-1].float())
    a, b, ref = logits

    def rel(u, v):
        return float((u - v).norm() / v.norm())

    assert rel(a, ref) < 0.02 and rel(b, ref) < 0.02 and rel(a, b) < 0.025
    top = a.topk(2).values
    apart = top[:, 0] - top[:, 1] > 0.5
    assert apart.sum() >= 6 and torch.equal(a.argmax(-1)[apart], b.argmax(-1)[apart])


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_an_exception_inside_steer_leaves_no_hook_attached(setup):
    """A failure mid-batch (here raised inside the block, after the hooks are registered) removes
    every hook, so the next request runs on the plain model."""
    model, tok, sid, sae = setup
    ids = chat(tok, PROMPTS[0])
    plain = forward(model, ids)
    steerer = Steerer(model, {sid: sae})
    plans = [InterventionPlan(
        latent_edits=[LatentEdit(sid, 3656, "clamp", 12.0, "all")],
        vector_edits=[VectorEdit("blocks.3.hook_resid_pre", sae.W_dec[7].detach() * 4, "all")],
    )]
    before = _hook_count(model)
    pos = StepPositions(abs_pos=torch.arange(len(ids)).unsqueeze(0), prompt_len=torch.tensor([len(ids)]))
    with pytest.raises(RuntimeError, match="mid-batch failure"):
        with steerer.steer(plans, pos):
            assert _hook_count(model) == before + 2  # one at block 10's output, one at block 3's input
            steered = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            assert not torch.equal(steered, plain)
            raise RuntimeError("mid-batch failure")
    assert _hook_count(model) == before
    assert torch.equal(forward(model, ids), plain)


def _conditional_setup(setup):
    model, tok, sid, sae = setup
    ids = chat(tok, "Write a Python function that adds two numbers, then tell me about cats.")
    clean = {"hook": sae.cfg.hook_point}
    forward(model, ids, capture=clean)
    z = sae.encode(clean["out"][0])  # [T, d_sae]
    z[0] = 0
    # a condition latent that fires on some tokens but not most (frequency between 10 % and 50 %)
    fires = (z > 0).float().mean(0)
    cond = int(((fires > 0.1) & (fires < 0.5)).nonzero()[0])
    holds = z[:, cond] > 0
    holds[0] = False
    return model, ids, sid, sae, clean, cond, holds


@pytest.mark.parametrize("once", [False, True])
def test_a_conditional_intervention_changes_only_the_tokens_where_its_condition_holds(setup, once):
    """``when``: the hook's output equals the unconditional steer where the condition holds (from its
    first firing on, with once_fired) and the plain model's everywhere else, exactly."""
    from saesteer.steering.plan import When

    model, ids, sid, sae, clean, cond, holds = _conditional_setup(setup)
    if once:
        holds = holds.int().cummax(0).values.bool()
    assert 0 < int(holds.sum()) < len(ids) - 1
    steerer = Steerer(model, {sid: sae})
    edit = LatentEdit(sid, 3656, "clamp", 12.0, "all")
    always = {"hook": sae.cfg.hook_point}
    forward(model, ids, steerer, [InterventionPlan(latent_edits=[edit])], capture=always)
    when = When(sid, cond, 0.0, once=once)
    got = {"hook": sae.cfg.hook_point}
    forward(model, ids, steerer, [InterventionPlan(latent_edits=[LatentEdit(sid, 3656, "clamp", 12.0, "all", when)])], capture=got)
    out, ref_on, ref_off = got["out"][0], always["out"][0], clean["out"][0]
    assert torch.equal(out[~holds], ref_off[~holds])
    assert torch.equal(out[holds], ref_on[holds])
    assert not torch.equal(ref_on[holds], ref_off[holds])  # the edit does something there


def test_a_condition_read_earlier_steers_a_later_hook_point(setup):
    """A vector edit at block 12 conditioned on a block-10 latent: every position before the
    condition first holds is the plain model's (causality), and the steer takes effect after."""
    from saesteer.steering.plan import When

    model, ids, sid, sae, clean, cond, holds = _conditional_setup(setup)
    first = int(holds.nonzero()[0])
    steerer = Steerer(model, {sid: sae})
    vec = VectorEdit("blocks.12.hook_resid_post", sae.W_dec[7].detach() * 8, "all", When(sid, cond, 0.0, once=True))
    plain = forward(model, ids)
    steered = forward(model, ids, steerer, [InterventionPlan(vector_edits=[vec])])
    assert torch.equal(steered[0, :first], plain[0, :first])
    assert not torch.allclose(steered[0, first:], plain[0, first:])


def test_a_condition_that_never_holds_generates_the_unsteered_tokens(setup):
    from saesteer.steering.plan import When

    model, tok, sid, sae = setup
    steerer = Steerer(model, {sid: sae})
    prompts = [chat(tok, p) for p in PROMPTS[:2]]
    never = When(sid, 3656, 1e6)
    plans = [InterventionPlan(latent_edits=[LatentEdit(sid, 3656, "clamp", 12.0, "all", never)]), InterventionPlan()]
    got = generate(model, tok, [GenerationSpec(p, 12, plan=pl) for p, pl in zip(prompts, plans)], steerer)
    plain = generate(model, tok, [GenerationSpec(p, 12) for p in prompts])
    assert [g.tokens for g in got] == [p.tokens for p in plain]


def test_once_fired_holds_across_decode_steps(setup):
    """A once_fired condition that fires in the prompt keeps steering every generated token (the
    state carries over the KV-cached decode steps): the same tokens as the edit given explicitly on
    every position from the first firing on."""
    from saesteer.steering.plan import When

    model, ids, sid, sae, clean, cond, holds = _conditional_setup(setup)
    tok = setup[1]
    first, n = int(holds.nonzero()[0]), 12
    steerer = Steerer(model, {sid: sae})
    once = LatentEdit(sid, 3656, "clamp", 12.0, "all", When(sid, cond, 0.0, once=True))
    explicit = LatentEdit(sid, 3656, "clamp", 12.0, tuple(range(first, len(ids) + n)))
    a, b = (generate(model, tok, [GenerationSpec(ids, n, plan=InterventionPlan(latent_edits=[e]))], steerer)[0] for e in (once, explicit))
    plain = generate(model, tok, [GenerationSpec(ids, n)])[0]
    assert a.tokens == b.tokens != plain.tokens


@pytest.mark.parametrize("full", [False, True])
def test_a_non_finite_edit_stays_in_its_row(setup, full):
    """A latent value or vector that is inf in float32 (as 1e39 or 1e308 become) makes its own row
    end with an error and leaves the other rows' tokens exactly what they are alone; before the
    hooks used ``torch.where``, inf x 0 in the batched product turned every row to NaN."""
    from saesteer.steering.generate import NON_FINITE

    model, tok, sid, sae = setup
    steer = Steerer(model, {sid: sae}, full=full)
    inf_vec = torch.zeros(sae.cfg.d_in)
    inf_vec[3] = float("inf")
    plans = [
        InterventionPlan(latent_edits=[LatentEdit(sid, 123, "clamp", 30.0, "all")]),
        InterventionPlan(latent_edits=[LatentEdit(sid, 5, "clamp", float("inf"), "all")]),
        InterventionPlan(),
        InterventionPlan(vector_edits=[VectorEdit(sae.cfg.hook_point, inf_vec, (2, 3))]),
        InterventionPlan(latent_edits=[LatentEdit(sid, 9, "scale", 1e39, "all")]),  # inf once float32
    ]
    prompts = PROMPTS + PROMPTS[:2]
    specs = [GenerationSpec(chat(tok, p), max_new_tokens=6, plan=pl) for p, pl in zip(prompts, plans)]
    batched = generate(model, tok, specs, steer)
    for b in (1, 3, 4):
        assert batched[b].finish_reason == "error" and batched[b].error == NON_FINITE, b
    for b in (0, 2):
        alone = generate(model, tok, [specs[b]], steer)[0]
        assert batched[b].error is None and batched[b].tokens == alone.tokens and len(alone.tokens) == 6


def test_tiny_top_p_samples_the_top_token(setup):
    """top_p smaller than float32 resolves (1e-300 rounds to 0) keeps the most likely token instead
    of sampling from all-zero probabilities."""
    model, tok, sid, sae = setup
    ids = chat(tok, PROMPTS[0])
    greedy = generate(model, tok, [GenerationSpec(ids, max_new_tokens=5)])[0].tokens
    tiny = generate(model, tok, [GenerationSpec(ids, max_new_tokens=5, temperature=0.7, top_p=1e-300, seed=1)])[0]
    assert tiny.error is None and tiny.tokens == greedy


def test_explicit_positions_mask_equals_the_broadcast_comparison():
    """The searchsorted membership gives the mask of the old [batch, seq, columns, width]
    comparison, for lists of any length and order, mixed with named position kinds."""
    from saesteer.steering.core import _Columns

    g = torch.Generator().manual_seed(0)
    specs = ["all", (5,), tuple(torch.randint(0, 40, (30,), generator=g).tolist()), "prompt", (39, 0, 7, 7),
             "generated", tuple(range(0, 40, 3))]
    rows = [0, 1, 1, 2, 0, 2, 1]
    cols = _Columns(rows, specs, torch.device("cpu"))
    lens = torch.tensor([12, 20, 7])
    hits = None
    for abs_pos in [torch.arange(24).unsqueeze(0) - (24 - lens).unsqueeze(1),  # prefill, left padded
                    (lens + 13).view(3, 1)]:  # a decode step
        pos = StepPositions(abs_pos=abs_pos, prompt_len=lens)
        got = cols.mask(pos, 3)
        p = abs_pos.unsqueeze(-1)
        width = max(len(s) for s in specs if not isinstance(s, str))
        # the old 4-D comparison (its pad value -1 also matched left padding, whose positions are
        # negative; padding is masked out of attention, so the new code leaves it alone)
        pad = -(10**6)
        padded = torch.tensor([list(s) + [pad] * (width - len(s)) if not isinstance(s, str) else [pad] * width for s in specs])
        member = (p.unsqueeze(-1) == padded.view(1, 1, *padded.shape)).any(-1)
        named = {"all": p >= 1, "prompt": (p >= 1) & (p < lens.view(-1, 1, 1)), "generated": p >= lens.view(-1, 1, 1)}
        want = torch.stack([named[s].squeeze(-1) if isinstance(s, str) else member[..., j] for j, s in enumerate(specs)], -1)
        want &= (torch.arange(3).view(-1, 1) == torch.tensor(rows).view(1, -1)).unsqueeze(1)
        assert torch.equal(got, want)
        hits = got.flatten(0, 1).any(0) if hits is None else hits | got.flatten(0, 1).any(0)
    assert hits.all()  # every column applies somewhere: the comparison is not vacuous


@pytest.mark.parametrize("full", [False, True])
def test_the_flat_layout_edits_every_token_as_the_padded_one(setup, full):
    """``SteeringBatch.apply`` on three requests' tokens laid out flat ([1, tokens, d_in], each
    token's plan in ``rows``, as vLLM runs a batch) gives each token what the padded batch gives it
    ([3, longest, d_in]): clamps on prompt positions, a once_fired condition, an explicit position
    list and a raw vector on generated positions, three different plans side by side."""
    from saesteer.steering.core import SteeringBatch
    from saesteer.steering.plan import When

    model, ids, sid, sae, clean, cond, holds = _conditional_setup(setup)
    tok = setup[1]
    acts = [clean["out"][0]]
    for p in PROMPTS[:2]:
        got = {"hook": sae.cfg.hook_point}
        forward(model, chat(tok, p), capture=got)
        acts.append(got["out"][0])
    lens = [a.shape[0] for a in acts]
    prompt_len = torch.tensor([n - 4 for n in lens])  # the last 4 tokens of each count as generated
    plans = [
        InterventionPlan(latent_edits=[LatentEdit(sid, 3656, "clamp", 12.0, "all", When(sid, cond, 0.0, once=True))]),
        InterventionPlan(latent_edits=[LatentEdit(sid, 100, "add", 5.0, "prompt"), LatentEdit(sid, 3656, "scale", 0.0, (2, 5, lens[1] - 1))]),
        InterventionPlan(vector_edits=[VectorEdit(sae.cfg.hook_point, sae.W_dec[7].detach() * 4, "generated")],
                         latent_edits=[LatentEdit(sid, 100, "clamp", 3.0, "generated")]),
    ]
    T = max(lens)
    padded = torch.zeros(3, T, acts[0].shape[1])
    abs_pos = torch.full((3, T), -1, dtype=torch.long)
    for b, a in enumerate(acts):  # left padding, as the engine pads
        padded[b, T - lens[b]:] = a
        abs_pos[b, T - lens[b]:] = torch.arange(lens[b])
    with torch.no_grad():
        out_pad = SteeringBatch(plans, {sid: sae}, full=full).apply(
            sae.cfg.hook_point, padded, StepPositions(abs_pos=abs_pos, prompt_len=prompt_len))
        flat = torch.cat(acts).unsqueeze(0)
        pos = StepPositions(abs_pos=torch.cat([torch.arange(n) for n in lens]).unsqueeze(0), prompt_len=prompt_len,
                            rows=torch.cat([torch.full((n,), b) for b, n in enumerate(lens)]).unsqueeze(0))
        out_flat = SteeringBatch(plans, {sid: sae}, full=full).apply(sae.cfg.hook_point, flat, pos)
    want = torch.cat([out_pad[b, T - lens[b]:] for b in range(3)])
    assert torch.allclose(out_flat[0], want, rtol=0, atol=1e-5)
    for b, a in enumerate(acts):  # and every plan edited something in its own tokens
        assert not torch.allclose(out_flat[0, sum(lens[:b]):sum(lens[:b + 1])], a)
