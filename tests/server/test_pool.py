"""SAEPool: configs up front, weights on first use, LRU eviction within a byte budget, pinning;
and steering through a pool with a tiny budget gives the tokens of everything loaded (real model)."""

from __future__ import annotations

import argparse
import random

import pytest
import torch
from saesteer_client.schema import LatentIntervention

from saesteer.sae.io import save_sae
from saesteer.sae.model import SAE, SAEConfig
from saesteer.server.app import build_server
from saesteer.server.config import ServerSettings, add_serve_args, settings_from_args
from saesteer.sae.sources import SAESpec
from saesteer.steering.pool import SAEBudgetError, SAEPool, sae_nbytes
from saesteer.steering.generate import GenerationSpec, generate, render_prompt
from saesteer.steering.hooks import Steerer
from saesteer.steering.plan import InterventionPlan, LatentEdit, VectorEdit, build_plan

D_IN, D_SAE = 576, 256  # SmolLM2-135M's width
HOOKS = ["blocks.10.hook_resid_post", "blocks.5.hook_resid_post", "blocks.3.hook_mlp_out", "blocks.10.hook_resid_post"]
IDS = [f"s{i}" for i in range(len(HOOKS))]
N = 4 * (2 * D_IN * D_SAE + 2 * D_SAE + D_IN)  # float32 W_enc, W_dec, b_enc, threshold, b_dec


def random_sae(seed: int, hook: str, d_in: int = D_IN) -> SAE:
    """A JumpReLU SAE with random weights and unit decoder rows."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig("jumprelu", d_in, D_SAE, hook_point=hook, model_name="test"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, D_SAE, generator=g) * 0.05)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        w = torch.randn(D_SAE, d_in, generator=g)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.threshold.fill_(0.1)
    return sae


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> list[SAESpec]:
    root = tmp_path_factory.mktemp("pool")
    out = []
    for i, (sid, hook) in enumerate(zip(IDS, HOOKS)):
        save_sae(random_sae(i, hook), root / sid)
        out.append(SAESpec(sid, str(root / sid)))
    return out


def pool_of(specs, budget_saes: float | None) -> SAEPool:
    """A pool whose budget holds ``budget_saes`` of the test SAEs (None: no budget)."""
    return SAEPool(specs, budget_bytes=None if budget_saes is None else int(budget_saes * N))


def test_configs_up_front_and_nothing_loaded_before_use(specs):
    pool = pool_of(specs, 2.5)
    assert pool.loaded_ids() == [] and pool.resident_bytes == 0
    assert list(pool) == IDS and len(pool) == 4 and "s2" in pool and "nope" not in pool
    assert [pool.configs[s].hook_point for s in IDS] == HOOKS
    assert pool.configs["s0"].d_sae == D_SAE and pool.nbytes("s0") == N == sae_nbytes(pool.configs["s0"])
    # a request is validated from the configs alone
    plan = build_plan([LatentIntervention(op="clamp", sae="s3", latent=5, value=2.0)], pool.configs)
    assert plan.sae_ids() == {"s3"}
    assert (pool.loads, pool.hits, pool.evictions) == (0, 0, 0) and pool.loaded_ids() == []
    with pytest.raises(KeyError):
        pool["nope"]
    sae = pool["s1"]
    assert pool.loaded_ids() == ["s1"] and pool.loads == 1
    assert sae.dtype == torch.float32 and sae.cfg.hook_point == HOOKS[1]
    assert pool.resident_bytes == sum(t.nbytes for t in (*sae.parameters(), *sae.buffers())) == N


def test_named_concepts_expanding_past_max_edits_are_refused(specs):
    """A request of 256 concept ops, each a concept of 256 edits, would be 65536 latent columns at
    every token: refused by the plan, the field named, and the limit itself still accepted."""
    from saesteer_client.schema import MAX_INTERVENTIONS, Concept, ConceptIntervention

    from saesteer.steering.plan import MAX_EDITS, PlanError

    configs = pool_of(specs, None).configs
    big = Concept(name="big", interventions=[LatentIntervention(op="add", sae="s0", latent=i % D_SAE, value=0.1)
                                             for i in range(MAX_INTERVENTIONS)])
    use = lambda n: [ConceptIntervention(op="concept", concept="big")] * n  # noqa: E731
    plan = build_plan(use(MAX_EDITS // MAX_INTERVENTIONS), configs, concepts={"big": big}.get)
    assert len(plan.latent_edits) == MAX_EDITS
    with pytest.raises(PlanError) as e:
        build_plan(use(MAX_EDITS // MAX_INTERVENTIONS + 1), configs, concepts={"big": big}.get)
    assert e.value.item.loc == ["body", "interventions"] and str(MAX_EDITS) in str(e.value)


def test_lru_eviction_order_and_budget(specs):
    pool = pool_of(specs, 2.5)  # two SAEs fit, not three
    with pool.use(["s0"]):
        pass
    with pool.use(["s1"]):
        pass
    assert pool.loaded_ids() == ["s0", "s1"] and pool.evictions == 0
    with pool.use(["s0"]):  # a hit makes s0 the most recently used
        pass
    assert pool.loaded_ids() == ["s1", "s0"] and pool.hits == 1
    with pool.use(["s2"]):  # evicts s1, the least recently used
        pass
    assert pool.loaded_ids() == ["s0", "s2"] and pool.evictions == 1
    pool["s3"]  # plain access loads and evicts the same way
    assert pool.loaded_ids() == ["s2", "s3"] and pool.evictions == 2
    assert (pool.loads, pool.hits) == (4, 1)

    rng = random.Random(0)
    for _ in range(40):
        ids = rng.sample(IDS, rng.choice([1, 2]))
        with pool.use(ids) as saes:
            assert set(saes) == set(ids) and set(ids) <= set(pool.loaded_ids())
            assert pool.resident_bytes <= pool.budget_bytes
        assert pool.resident_bytes == N * len(pool.loaded_ids()) <= pool.budget_bytes
        assert pool.pinned_ids() == []
    assert pool.loads == pool.evictions + len(pool.loaded_ids())


def test_pinned_saes_are_never_evicted(specs):
    pool = pool_of(specs, 2.5)
    with pool.use(["s0"]):
        for sid in ("s1", "s2", "s3", "s1"):
            pool[sid]  # each load must evict, but never the pinned s0
            assert "s0" in pool.loaded_ids() and pool.resident_bytes <= pool.budget_bytes
        with pool.use(["s0", "s2"]) as saes:  # nested pins of one SAE are counted
            assert set(pool.pinned_ids()) == {"s0", "s2"}
            with pytest.raises(SAEBudgetError, match="budget"):  # a third SAE cannot fit beside two pinned
                pool.acquire(["s3"])
            assert set(pool.pinned_ids()) == {"s0", "s2"} and "s3" not in pool.loaded_ids()
            assert saes["s0"] is pool["s0"]
        assert pool.pinned_ids() == ["s0"]
    assert pool.pinned_ids() == []
    pool["s1"], pool["s3"]  # s0, unpinned now, can go
    assert "s0" not in pool.loaded_ids()
    with pytest.raises(KeyError):  # an unknown id pins nothing
        pool.acquire(["s1", "nope"])
    assert pool.pinned_ids() == []


def test_an_sae_bigger_than_the_budget_is_refused_up_front(specs):
    with pytest.raises(SAEBudgetError, match=r"SAE 's0' needs .* more than the whole SAE memory budget"):
        pool_of(specs, 0.99)
    pool = pool_of(specs, 3.5)
    with pytest.raises(SAEBudgetError, match="over the budget"):
        pool.load_all()
    with pytest.raises(ValueError, match="share the id"):
        SAEPool(specs + specs[:1])


def test_pack_splits_a_batch_into_runs_that_fit(specs):
    pool = pool_of(specs, 2.5)
    groups = [{"s0"}, {"s1"}, {"s2"}, set(), {"s0", "s1"}, {"s1"}]
    assert pool.pack(groups) == [[0, 1, 3, 4, 5], [2]]  # first fit: s0/s1 requests share a run
    assert not pool.fits(IDS[:3]) and pool.fits(IDS[:2])
    with pytest.raises(SAEBudgetError):
        pool.pack([{"s0", "s1", "s2"}])
    assert pool_of(specs, None).pack(groups) == [[0, 1, 2, 3, 4, 5]]
    assert pool.loads == 0  # packing reads sizes only


def test_every_setting_has_a_flag_with_help():
    """The flags are generated from ServerSettings: none can be missing or undocumented."""
    p = argparse.ArgumentParser()
    add_serve_args(p)
    flags = {a.dest: a for a in p._actions if a.dest != "help"}
    assert set(flags) == set(ServerSettings.model_fields)
    for name, action in flags.items():
        assert f"--{name.replace('_', '-')}" in action.option_strings
        assert ServerSettings.model_fields[name].description and action.help, name
    assert "--sae" in flags["saes"].option_strings
    s = settings_from_args(p.parse_args(["--sae", "a=/x@blocks.1.hook_resid_post", "--sae", "b", "--request-timeout", "7"]))
    assert s.saes == ["a=/x@blocks.1.hook_resid_post", "b"] and s.request_timeout == 7.0


def test_settings_flag_and_environment(monkeypatch, specs):
    p = argparse.ArgumentParser()
    add_serve_args(p)
    s = settings_from_args(p.parse_args(["--sae-memory-mb", "1.5"]))
    assert s.sae_memory_mb == 1.5 and s.sae_memory_bytes == 1536 * 1024
    monkeypatch.setenv("SAESTEER_SAE_MEMORY_MB", "64")
    assert ServerSettings().sae_memory_bytes == 64 << 20
    monkeypatch.setenv("SAESTEER_SAE_MEMORY_MB", "")
    assert ServerSettings().sae_memory_mb is None
    monkeypatch.delenv("SAESTEER_SAE_MEMORY_MB")
    assert ServerSettings().sae_memory_bytes is None  # the default: no budget, all loaded at start
    with pytest.raises(ValueError):
        ServerSettings(sae_memory_mb=0)
    # a budget smaller than one SAE stops the server before any worker starts
    with pytest.raises(SAEBudgetError, match="raise --sae-memory-mb"):
        build_server(ServerSettings(saes=[f"{s.id}={s.source}" for s in specs], sae_memory_mb=N / 2 / (1 << 20)))


# -- steering through a pool, on the real model ---------------------------------------------------


def test_steerer_checks_configs_without_loading(lm, specs, tmp_path):
    model, _ = lm
    pool = pool_of(specs, 1.5)
    steer = Steerer(model, pool)
    assert pool.loads == 0 and steer.configs == pool.configs
    save_sae(random_sae(9, HOOKS[0], d_in=64), tmp_path / "narrow")
    narrow = SAEPool([SAESpec("narrow", str(tmp_path / "narrow"))], budget_bytes=10 * N)
    with pytest.raises(ValueError, match="d_in 64 differs"):
        Steerer(model, narrow)
    assert narrow.loads == 0


@pytest.mark.slow
def test_tiny_budget_steers_exactly_like_everything_loaded(lm, specs):
    model, tok = lm
    pool = pool_of(specs, 2.5)  # at most two of the four SAEs resident
    pooled, full = Steerer(model, pool), Steerer(model, SAEPool(specs).load_all())
    prompts = [render_prompt(tok, messages=[{"role": "user", "content": t}])
               for t in ("Tell me something interesting.", "Describe a place you like.")]

    def clamp(sid, lat=3, value=40.0):
        return LatentEdit(sid, lat, "clamp", value, "all")

    vec = torch.randn(D_IN, generator=torch.Generator().manual_seed(5)) * 4
    batches = [
        [InterventionPlan([clamp("s0")])],
        [InterventionPlan([clamp("s1")]), InterventionPlan([clamp("s2", 7)])],  # two SAEs in one batch
        [InterventionPlan([clamp("s3", 11), clamp("s0", 2, -20.0)]), InterventionPlan()],  # two at one hook
        [InterventionPlan([clamp("s2")], [VectorEdit(HOOKS[1], vec, "generated")])],
        [InterventionPlan([clamp("s1", 9)]), InterventionPlan([clamp("s1", 10, 25.0)])],
        [InterventionPlan([clamp("s0")])],
    ]
    plain = [r.tokens for r in generate(model, tok, [GenerationSpec(p, max_new_tokens=8) for p in prompts])]
    changed = 0
    for plans in batches:
        specs_ = [GenerationSpec(prompts[i % 2], max_new_tokens=8, plan=pl) for i, pl in enumerate(plans)]
        got = [r.tokens for r in generate(model, tok, specs_, pooled)]
        want = [r.tokens for r in generate(model, tok, specs_, full)]
        assert got == want
        changed += sum(g != plain[i % 2] for i, g in enumerate(got))
        assert pool.resident_bytes <= pool.budget_bytes and pool.pinned_ids() == []
        assert set().union(*(p.sae_ids() for p in plans)) <= set(pool.loaded_ids())
    assert changed >= 4  # the edits do steer
    assert pool.evictions >= 3 and pool.loads == pool.evictions + len(pool.loaded_ids())
