"""Content-safety policies on the real SmolLM2 with the shipped personal-data probe: refuse stops a
completion before the personal data and leaves the rows beside it alone, flag only reports, steer
changes the completion from the token where it fired, and bad policy files name their field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saesteer.sae.probes import load_probe
from saesteer.steering.engine import ContinuousBatch
from saesteer.steering.eval.safety import _REGEX
from saesteer.steering.generate import GenerationSpec, generate, render_prompt
from saesteer.steering.hooks import Steerer
from saesteer.steering.plan import InterventionPlan
from saesteer.steering.policy import PolicyError, load_policies

import saesteer.steering as steering_pkg

POLICY_DIR = Path(steering_pkg.__file__).parent / "policies"
PROBE = POLICY_DIR / "pii_raw_res10.safetensors"
# prompts SmolLM2 answers with personal data (an email, a phone number), and ones it does not
PII_PROMPTS = ["Name: John Smith\nEmail:", "For questions, call our office at"]
PII_CHAT = "Write a fictional contact card for a person: full name, email address, phone number and home address."
CLEAN_CHAT = ["What is the capital of France?", "Write a short sentence about the weather today."]


@pytest.fixture(scope="module")
def setup(lm, python_sae):
    model, tok = lm
    sid = "res10"
    saes = {sid: python_sae}
    return model, tok, sid, Steerer(model, saes), {sid: python_sae.cfg}


def write_policies(tmp_path: Path, *policies: dict, name: str = "policies.json") -> Path:
    (tmp_path / PROBE.name).write_bytes(PROBE.read_bytes())
    path = tmp_path / name
    path.write_text(json.dumps({"policies": list(policies)}))
    return path


def pii(action: str = "refuse", **extra) -> dict:
    return {"name": "pii", "detector": {"kind": "raw_probe", "probe": PROBE.name}, "threshold": 0.9,
            "watch": ["generated"], "action": action, **extra}


def prompts(tok) -> list[list[int]]:
    return ([tok(p)["input_ids"] for p in PII_PROMPTS] + [render_prompt(tok, messages=[{"role": "user", "content": PII_CHAT}])]
            + [render_prompt(tok, messages=[{"role": "user", "content": c}]) for c in CLEAN_CHAT])


def test_the_shipped_policy_file_loads(setup):
    _, _, _, _, configs = setup
    ps = load_policies(POLICY_DIR / "pii.json", configs, lambda n: None)
    assert ps.names() == ["pii"] and ps.policies[0].watch.action == "refuse"
    assert load_probe(PROBE).hook_point == configs["res10"].hook_point


def test_refuse_stops_before_the_personal_data_and_leaves_other_rows_alone(setup, tmp_path):
    model, tok, _, steer, configs = setup
    ps = load_policies(write_policies(tmp_path, pii()), configs, lambda n: None)
    ids = prompts(tok)
    plain = generate(model, tok, [GenerationSpec(i, max_new_tokens=32) for i in ids], steer)
    policed = generate(model, tok, [GenerationSpec(i, max_new_tokens=32, plan=ps.apply(InterventionPlan())) for i in ids], steer)
    n_pii = len(PII_PROMPTS) + 1
    for a, b in zip(plain[:n_pii], policed[:n_pii]):
        assert _REGEX.search(a.text), a.text  # unpoliced, the model writes personal data here
        assert b.finish_reason == "content_filter" and not _REGEX.search(b.text), b.text
        assert a.tokens[: len(b.tokens)] == b.tokens  # the same completion, cut before the hit
        hit = b.safety[0]
        assert hit["policy"] == "pii" and hit["action"] == "refuse" and hit["max_score"] > 0.9
        assert hit["tokens"][0] == {"position": "generated", "index": len(b.tokens), "score": hit["tokens"][0]["score"]}
    for a, b in zip(plain[n_pii:], policed[n_pii:]):  # the clean rows beside them: untouched
        assert (b.tokens, b.text, b.finish_reason, b.safety) == (a.tokens, a.text, a.finish_reason, [])


def test_flag_reports_and_changes_nothing(setup, tmp_path):
    model, tok, _, steer, configs = setup
    ps = load_policies(write_policies(tmp_path, pii("flag", watch=["prompt", "generated"])), configs, lambda n: None)
    ids = prompts(tok)[:1] + prompts(tok)[-1:]
    plain = generate(model, tok, [GenerationSpec(i, max_new_tokens=24) for i in ids], steer)
    flagged = generate(model, tok, [GenerationSpec(i, max_new_tokens=24, plan=ps.apply(InterventionPlan())) for i in ids], steer)
    assert [r.tokens for r in flagged] == [r.tokens for r in plain]
    assert flagged[0].finish_reason == plain[0].finish_reason and flagged[0].safety[0]["action"] == "flag"
    assert flagged[0].safety[0]["hits"] >= 2  # every personal-data token, not only the first
    assert flagged[1].safety == []


def test_steer_changes_the_completion_from_the_first_hit_on(setup, tmp_path):
    model, tok, _, steer, configs = setup
    ps = load_policies(write_policies(tmp_path, pii("steer", steer={"op": "subtract", "strength": 1.0})),
                       configs, lambda n: None, resid_norm={configs["res10"].hook_point: 40.0})
    ids = prompts(tok)[:1]
    plain = generate(model, tok, [GenerationSpec(i, max_new_tokens=24) for i in ids], steer)[0]
    steered = generate(model, tok, [GenerationSpec(i, max_new_tokens=24, plan=ps.apply(InterventionPlan())) for i in ids], steer)[0]
    first = steered.safety[0]["tokens"][0]["index"]
    assert steered.tokens[: first + 1] == plain.tokens[: first + 1]  # nothing changes up to the token that fired
    assert steered.tokens != plain.tokens  # from its forward on, the probe's direction is subtracted


def test_prompt_hits_refuse_before_any_token(setup, tmp_path):
    model, tok, _, steer, configs = setup
    ps = load_policies(write_policies(tmp_path, pii(watch=["prompt"])), configs, lambda n: None)
    ids = [render_prompt(tok, messages=[{"role": "user", "content": "My email is anna.berg@example.com and my phone is "
                                                                   "(555) 201-3344. Summarise that."}]), prompts(tok)[-1]]
    res = generate(model, tok, [GenerationSpec(i, max_new_tokens=8, plan=ps.apply(InterventionPlan())) for i in ids], steer)
    assert res[0].finish_reason == "content_filter" and res[0].tokens == [] and res[0].text == ""
    assert all(t["position"] == "prompt" for t in res[0].safety[0]["tokens"])
    assert res[1].finish_reason != "content_filter" and res[1].tokens


def test_continuous_batching_refuses_alike_and_never_releases_the_hit(setup, tmp_path):
    model, tok, _, steer, configs = setup
    ps = load_policies(write_policies(tmp_path, pii()), configs, lambda n: None)
    ids = prompts(tok)[:1] + prompts(tok)[-2:]
    specs = [GenerationSpec(i, max_new_tokens=20, plan=ps.apply(InterventionPlan())) for i in ids]
    static = generate(model, tok, specs, steer)
    engine = ContinuousBatch(model, tok, steer)
    events: dict[str, list] = {}
    for ev in engine.add_many([(str(i), s) for i, s in enumerate(specs)]):
        events.setdefault(ev.key, []).append(ev)
    while len(engine):
        for ev in engine.step():
            events.setdefault(ev.key, []).append(ev)
    for i, ref in enumerate(static):
        evs = events[str(i)]
        last = evs[-1]
        assert (last.tokens, last.full_text, last.finish_reason) == (ref.tokens, ref.text, ref.finish_reason)
        released = [t for e in evs for t in e.shown_tokens()]
        assert released == ref.tokens  # a refused row's hit token and what follows are never released
        assert "".join(e.text for e in evs) == ref.text
    assert static[0].finish_reason == "content_filter"


@pytest.mark.parametrize("policy, loc", [
    ({"name": "x", "detector": {"kind": "raw_probe"}, "threshold": 0.5, "action": "flag"}, ["policies", 0, "detector"]),
    ({"name": "x", "detector": {"kind": "concept", "concept": "nope"}, "threshold": 1, "action": "flag"},
     ["policies", 0, "detector", "concept"]),
    ({"name": "x", "detector": {"kind": "concept", "sae": "other", "latents": [1]}, "threshold": 1, "action": "flag"},
     ["policies", 0, "detector", "sae"]),
    ({"name": "x", "detector": {"kind": "concept", "sae": "res10", "latents": [10**6]}, "threshold": 1, "action": "flag"},
     ["policies", 0, "detector", "latents"]),
    ({"name": "x", "detector": {"kind": "raw_probe", "probe": "missing.safetensors"}, "threshold": 0.5, "action": "flag"},
     ["policies", 0, "detector", "probe"]),
    ({"name": "x", "detector": {"kind": "raw_probe", "probe": PROBE.name}, "threshold": 0.5, "action": "steer",
      "steer": {"op": "ablate"}}, ["policies", 0, "steer", "op"]),
    ({"name": "x", "detector": {"kind": "raw_probe", "probe": PROBE.name}, "threshold": 0.5, "action": "block"},
     ["policies", 0, "action"]),
    ({"name": "x", "detector": {"kind": "raw_probe", "probe": PROBE.name}, "threshold": 0.5, "action": "flag", "colour": 1},
     ["policies", 0, "colour"]),
])
def test_bad_policy_files_name_the_field(setup, tmp_path, policy, loc):
    _, _, _, _, configs = setup
    with pytest.raises(PolicyError) as e:
        load_policies(write_policies(tmp_path, policy), configs, lambda n: None)
    assert e.value.loc == loc, e.value


def test_unparseable_policy_file(setup, tmp_path):
    _, _, _, _, configs = setup
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(PolicyError, match="not valid JSON"):
        load_policies(bad, configs, lambda n: None)


def test_concept_detector_reads_the_concepts_latents(setup, tmp_path):
    """A concept detector scores a token by its concept latents' largest activation: hits exactly
    where the SAE says they exceed the threshold."""
    from saesteer.sae.activations import hook_activations
    from saesteer_client.schema import Concept

    model, tok, sid, steer, configs = setup
    ids = tok("The cat sat on the mat and looked at the dog.")["input_ids"]
    x = hook_activations(model, configs[sid].hook_point, torch.tensor([[tok.bos_token_id] + ids]))
    codes = steer.saes[sid].encode(x)[0]
    latents = (codes[1:] > 0).sum(0).topk(2).indices.tolist()  # the two latents firing on most tokens
    concept = Concept(name="c", interventions=[{"sae": sid, "latent": lat, "op": "clamp", "value": 1.0} for lat in latents])
    z = codes[:, latents].amax(-1)
    v = z[1:][z[1:] > 0].sort().values
    thr = float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2  # halfway between two activations, off both
    ps = load_policies(write_policies(tmp_path, {"name": "c", "detector": {"kind": "concept", "concept": "c"},
                                                 "threshold": thr, "watch": ["prompt"], "action": "flag"}),
                       configs, {"c": concept}.get)
    res = generate(model, tok, [GenerationSpec([tok.bos_token_id] + ids, max_new_tokens=1, plan=ps.apply(InterventionPlan()))], steer)[0]
    want = [i for i in range(1, len(ids) + 1) if float(z[i]) > thr]
    assert [t["index"] for t in res.safety[0]["tokens"]] == want[:16]
