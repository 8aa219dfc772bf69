"""modeling.cpu_kernels on the real SmolLM2: fused float32 blocks give the float32 model's logits and
tokens (steered, batched with left padding); the lighter weight formats compute what they say and
cost little against float32 on English text."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from saesteer.modeling.cpu_kernels import BF16Linear, FP16Linear, Int8Linear, bf16_supported, onednn_available, speed_up
from saesteer.steering.engine import ContinuousBatch
from saesteer.steering.generate import GenerationSpec, generate, render_prompt
from saesteer.steering.hooks import Steerer
from saesteer.steering.plan import InterventionPlan, LatentEdit, VectorEdit

pytestmark = pytest.mark.skipif(not onednn_available(), reason="oneDNN is not available in this torch build")


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def fused(lm):
    model, tok = lm
    m = copy.deepcopy(model)
    info = speed_up(m, "float32")
    return m, info


def chat(tok, text: str) -> list[int]:
    return render_prompt(tok, messages=[{"role": "user", "content": text}])


def test_fused_blocks_have_one_qkv_and_one_gate_up_and_keep_their_hook_modules(lm, fused):
    model, _ = lm
    m, info = fused
    assert info == {"fused_blocks": 30, "linears": 30 * 4 + 1, "weights": "float32", "scripted_blocks": 30}
    assert not any(type(x) is nn.Linear for x in m.modules())
    block = m.model.layers[10]
    assert block.self_attn.qkv.out_features == 576 + 2 * 192 and block.mlp.gate_up.out_features == 2 * 1536
    assert not hasattr(block.self_attn, "q_proj") and not hasattr(block.mlp, "up_proj")
    assert isinstance(block, type(model.model.layers[10]))  # a subclass: isinstance checks and hooks hold
    assert speed_up(m, "float32")["fused_blocks"] == 0  # fusing twice does nothing


@pytest.mark.slow
def test_fused_float32_logits_match_a_float64_reference(lm, fused):
    model, tok = lm
    m, _ = fused
    ids = torch.tensor([chat(tok, "Name three rivers and the seas they flow into.")])
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(input_ids=ids).logits
        plain = model(input_ids=ids).logits
        fast = m(input_ids=ids).logits
    assert rel(fast, ref) < 1e-5 and rel(fast, ref) < 10 * rel(plain, ref) + 1e-7, (rel(fast, ref), rel(plain, ref))


def test_an_identity_edit_leaves_the_fused_models_logits_unchanged(lm, fused, python_sae):
    _, tok = lm
    m, _ = fused
    sid = python_sae.cfg.hook_point
    steerer = Steerer(m, {sid: python_sae})
    ids = torch.tensor([chat(tok, "What is a list comprehension?")])
    plan = InterventionPlan(latent_edits=[LatentEdit(sid, 3656, "scale", 1.0, "all")])
    from saesteer.steering.core import StepPositions

    pos = StepPositions(abs_pos=torch.arange(ids.shape[1])[None], prompt_len=torch.tensor([ids.shape[1]]))
    with torch.no_grad():
        plain = m(input_ids=ids).logits
        with steerer.steer([plan], pos):
            hooked = m(input_ids=ids).logits
    assert torch.equal(plain, hooked)


@pytest.mark.slow
def test_fused_model_steers_and_batches_like_the_plain_model(lm, fused, python_sae):
    """Two rows of different prompt lengths (left padding: the attention-mask path), one steered
    toward code, through the continuous batch on the fused model: the plain model's tokens."""
    model, tok = lm
    m, _ = fused
    sid = python_sae.cfg.hook_point
    plan = InterventionPlan(latent_edits=[LatentEdit(sid, 3656, "clamp", 20.0, "all")])
    specs = [GenerationSpec(chat(tok, "Tell me about the sea."), max_new_tokens=10, plan=plan),
             GenerationSpec(chat(tok, "Describe a quiet morning in a small village by the river."), max_new_tokens=10)]
    want = [r.tokens for r in generate(model, tok, specs, Steerer(model, {sid: python_sae}))]
    eng = ContinuousBatch(m, tok, Steerer(m, {sid: python_sae}))
    got: dict[str, list[int]] = {}
    for ev in eng.add_many([("steered", specs[0]), ("plain", specs[1])]):
        got.setdefault(ev.key, [])
    while len(eng):
        for ev in eng.step():
            if ev.finish_reason is not None:
                got[ev.key] = ev.tokens
    assert [got["steered"], got["plain"]] == want
    assert want[0] != [r.tokens for r in generate(model, tok, specs[:1])][0]  # the edit did steer


def test_lean_decode_step_gives_the_models_own_forward_and_runs_the_hooks(lm, fused, python_sae):
    """The fused model's decode step (``_lean_decode_forward``) against transformers' forward on the
    same weights and cache: two left-padded rows (the bool-mask path) and one row alone (no mask),
    with a steering hook at block 10 that must run in both."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    from saesteer.steering.generate import left_padded
    from saesteer.steering.core import StepPositions

    _, tok = lm
    m, _ = fused
    assert type(m).__name__ == "LeanLlamaForCausalLM"
    hf = copy.copy(m)
    hf.__class__ = LlamaForCausalLM  # the same modules, transformers' own forward
    sid = python_sae.cfg.hook_point
    plan = InterventionPlan(latent_edits=[LatentEdit(sid, 3656, "clamp", 20.0, "all")])
    calls = []
    handle = m.model.layers[10].register_forward_hook(lambda *_: calls.append(1))
    try:
        for prompts in (["Tell me about the sea.", "Describe a quiet morning in a small village by the river."],
                        ["Name a river."]):
            ids, attn, pos, lens = left_padded([chat(tok, p) for p in prompts], tok.pad_token_id or 0)
            logits = {}
            for name, model in (("lean", m), ("hf", hf)):
                steerer = Steerer(model, {sid: python_sae})
                cache = DynamicCache(config=model.config)
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=attn, position_ids=pos.clamp(min=0), past_key_values=cache)
                    step_pos = lens[:, None].clone()
                    nxt = torch.full((len(prompts), 1), 13, dtype=torch.long)
                    sp = StepPositions(abs_pos=step_pos, prompt_len=lens)
                    before = len(calls)
                    with steerer.steer([plan] * len(prompts), sp):
                        out = model(input_ids=nxt, attention_mask=torch.cat([attn, attn.new_ones(len(prompts), 1)], 1),
                                    position_ids=step_pos, past_key_values=cache, use_cache=True)
                    assert len(calls) == before + 1  # the block's hooks ran
                logits[name] = out.logits
                assert out.logits.shape == (len(prompts), 1, m.config.vocab_size)
                assert cache.get_seq_length() == ids.shape[1] + 1
            assert rel(logits["lean"], logits["hf"].double()) < 1e-6, prompts
    finally:
        handle.remove()


@pytest.mark.parametrize("weights", ["float32", "float16"])
def test_scripted_decode_step_equals_the_eager_block_and_yields_to_inner_hooks(lm, weights):
    """A decode step through the blocks' TorchScript twins (``modeling.decode_script``) against the same
    blocks run eagerly (a hook on every attention module sends them down the eager path): equal
    logits and KV caches, for two left-padded rows and for one row; steering at block 10 (a hook on
    the block itself) runs in both."""
    from saesteer.modeling.kv_cache import spare_cache
    from saesteer.steering.generate import left_padded
    from saesteer.steering.core import StepPositions

    model, tok = lm
    m = copy.deepcopy(model)
    assert speed_up(m, weights)["scripted_blocks"] == 30
    layers = m.model.layers
    calls = []
    for layer in layers:  # count the scripted calls
        script = layer.__dict__["_decode_script"]
        layer.__dict__["_decode_script"] = lambda *a, script=script: (calls.append(1), script(*a))[1]
    sid = "blocks.10.hook_resid_post"
    plan = InterventionPlan(vector_edits=[VectorEdit(sid, torch.linspace(-2, 2, 576), "all")])
    for prompts in (["Tell me about the sea.", "Describe a quiet morning in a small village by the river."], ["Name a river."]):
        ids, attn, pos, lens = left_padded([chat(tok, p) for p in prompts], tok.pad_token_id or 0)
        B = len(prompts)
        got = {}
        for path in ("scripted", "eager"):
            handles = [layer.self_attn.register_forward_hook(lambda *_: None) for layer in layers] if path == "eager" else []
            cache = spare_cache(m.config)
            before = len(calls)
            with torch.no_grad():
                m(input_ids=ids, attention_mask=attn, position_ids=pos.clamp(min=0), past_key_values=cache)
                sp = StepPositions(abs_pos=lens[:, None].clone(), prompt_len=lens)
                with Steerer(m, {}).steer([plan] * B, sp):
                    logits = m(input_ids=torch.full((B, 1), 13), attention_mask=torch.cat([attn, attn.new_ones(B, 1)], 1),
                               position_ids=lens[:, None], past_key_values=cache).logits
            for h in handles:
                h.remove()
            assert len(calls) - before == (30 if path == "scripted" else 0)
            got[path] = (logits, [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
        assert rel(got["scripted"][0], got["eager"][0].double()) < 1e-6
        for (ks, vs), (ke, ve) in zip(got["scripted"][1], got["eager"][1]):
            assert torch.equal(ks, ke) and torch.equal(vs, ve)


NO_BF16 = pytest.mark.skipif(not bf16_supported(), reason="oneDNN runs no bfloat16 on this CPU (no AVX512 BW/VL/DQ "
                             "or AVX-NE-CONVERT)")


@NO_BF16
def test_bf16_linear_is_the_product_of_bf16_rounded_inputs_and_weights():
    torch.manual_seed(0)
    lin = nn.Linear(576, 960, bias=False).requires_grad_(False)
    x = torch.randn(3, 2, 576)
    out = BF16Linear(lin)(x)
    ref = x.bfloat16().double() @ lin.weight.bfloat16().double().T
    assert out.dtype == torch.float32 and out.shape == (3, 2, 960)
    assert torch.equal(out, out.bfloat16().float())  # the product comes back rounded to bfloat16
    assert rel(out, ref) < 2**-8
    lin.bias = nn.Parameter(torch.randn(960), requires_grad=False)
    assert torch.equal(BF16Linear(lin)(x), out + lin.bias)  # the bias is added in float32


def test_fp16_linear_rounds_only_the_weights():
    """The product of float32 inputs and float16-rounded weights, accumulated in float32: far closer
    to that product than to the one with bfloat16-rounded inputs."""
    torch.manual_seed(0)
    lin = nn.Linear(576, 960, bias=False).requires_grad_(False)
    x = torch.randn(3, 2, 576)
    out = FP16Linear(lin)(x)
    want = x.double() @ lin.weight.half().double().T
    assert out.dtype == torch.float32 and out.shape == (3, 2, 960)
    assert rel(out, want) < 1e-6, rel(out, want)  # float32 accumulation only
    assert 1e-5 < rel(out, x.double() @ lin.weight.double().T) < 2**-10  # the weights' rounding
    assert rel(out, x.bfloat16().double() @ lin.weight.half().double().T) > 100 * rel(out, want)  # inputs not rounded
    lin.bias = nn.Parameter(torch.randn(960), requires_grad=False)
    assert torch.equal(FP16Linear(lin)(x), out + lin.bias)


def test_fp16_linear_refuses_a_weight_beyond_float16s_range():
    lin = nn.Linear(8, 4, bias=False).requires_grad_(False)
    lin.weight[1, 2] = 1e5
    with pytest.raises(ValueError, match="float16's range"):
        FP16Linear(lin)


def test_int8_linear_is_within_half_a_step_per_weight_and_computes_its_product():
    torch.manual_seed(0)
    lin = nn.Linear(576, 1536, bias=False).requires_grad_(False)
    q8 = Int8Linear(lin)
    deq = q8.q.double() * q8.scale.double()[:, None]
    assert (deq - lin.weight.double()).abs().le(q8.scale.double()[:, None] / 2 + 1e-12).all()
    x = torch.randn(4, 576)
    assert torch.equal(q8(x), q8(x).bfloat16().float())  # the product comes back rounded to bfloat16
    assert rel(q8(x), x.bfloat16().double() @ deq.T) < 2**-8
    assert rel(q8(x), x.double() @ lin.weight.double().T) < 2e-2  # int8 and bf16 rounding together


def test_unknown_weight_format_is_refused_and_other_dtypes_are_left_alone(lm):
    model, _ = lm
    with pytest.raises(ValueError, match="weights must be one of"):
        speed_up(model, "int4")
    tiny = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    assert speed_up(tiny, "int8") == {"fused_blocks": 0, "linears": 0, "weights": "float32", "scripted_blocks": 0}
    assert type(tiny[0]) is nn.Linear


@pytest.mark.slow
def test_bfloat16_formats_are_refused_where_the_cpu_cannot_run_them(lm):
    """Where ``bf16_supported`` is false, speed_up refuses bfloat16 and int8 (whose LM head is
    bfloat16) with a ValueError that says why, instead of failing inside oneDNN."""
    if bf16_supported():
        pytest.skip("this CPU runs bfloat16: nothing to refuse")
    for weights in ("bfloat16", "int8"):
        with pytest.raises(ValueError, match="needs a CPU on which oneDNN runs bfloat16"):
            speed_up(copy.deepcopy(lm[0]), weights)


@pytest.mark.parametrize("weights", ["float16", pytest.param("bfloat16", marks=NO_BF16), pytest.param("int8", marks=NO_BF16)])
def test_lighter_weights_cost_little_against_float32_on_english_text(lm, weights):
    """KL per token and top-1 agreement against the float32 model on 512 tokens of the README.
    Measured (2048 tokens of README and docs): float16 KL < 1e-5, bfloat16 0.001, int8 0.004 nats;
    top-1 0.999, 0.97, 0.95."""
    model, tok = lm
    m = copy.deepcopy(model)
    assert speed_up(m, weights)["fused_blocks"] == 30
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :512].view(2, 256)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.log_softmax(-1)
        got = m(input_ids=ids).logits.log_softmax(-1)
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    assert 0 < kl < 0.02 and top1 > 0.9, (kl, top1)
    if weights == "float16":  # only the weights rounded, to 11 bits: ten times closer than bfloat16's bound
        assert kl < 0.002 and top1 > 0.98, (kl, top1)
