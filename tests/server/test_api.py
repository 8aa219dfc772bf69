"""The HTTP API in-process (LitServe's own way: real worker processes + FastAPI's TestClient)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from saesteer.defaults import DEFAULT_MODEL_NAME
from saesteer.server.config import PYTHON_SAE_NAME, ServerSettings, python_sae_spec

from serving import error_detail, serve

pytestmark = pytest.mark.slow  # LitServe workers with the real model, ~20 s per server

SAE = PYTHON_SAE_NAME
MSG = [{"role": "user", "content": "Tell me something interesting."}]


def write_gemma_scope(root, layer=6, d_in=576, d_sae=64):
    """A Gemma Scope checkpoint in its own layout (params.npz, no config), random weights."""
    rng = np.random.default_rng(0)
    folder = root / f"layer_{layer}" / f"width_{d_sae}" / "average_l0_10"
    folder.mkdir(parents=True)
    w = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    np.savez(folder / "params.npz", W_enc=w.T.copy(), W_dec=w, b_enc=np.zeros(d_sae, np.float32),
             b_dec=np.zeros(d_in, np.float32), threshold=np.full(d_sae, 0.5, np.float32))
    return folder


def settings_for(root, **kw) -> ServerSettings:
    gemma = write_gemma_scope(root)
    return ServerSettings(saes=[python_sae_spec(), f"gs6={gemma}"],
                          max_prompt_tokens=200, max_total_tokens=300, max_new_tokens=250, max_payload_bytes=200_000, **kw)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with serve(settings_for(tmp_path_factory.mktemp("gemma"))) as c:
        yield c


# float32 bytes: the default SAE 20.3 MiB, gs6 0.3 MiB; 20.4 MiB holds either, not both
BUDGET_MB = 20.4


@pytest.fixture(scope="module")
def budget_client(tmp_path_factory):
    with serve(settings_for(tmp_path_factory.mktemp("gemma"), sae_memory_mb=BUDGET_MB, features=False)) as c:
        yield c


def test_health_and_sae_listing(client):
    assert client.get("/health").status_code == 200
    saes = client.get("/v1/saes").json()["saes"]
    assert [s["id"] for s in saes] == [SAE, "gs6"]
    s = saes[0]
    assert (s["hook_point"], s["architecture"], s["d_in"], s["d_sae"], s["k"]) == (
        "blocks.10.hook_resid_post", "batchtopk", 576, 4608, 32)
    g = saes[1]
    assert (g["hook_point"], g["architecture"], g["d_sae"]) == ("blocks.6.hook_resid_post", "jumprelu", 64)
    assert s["latent_stats"] is True and g["latent_stats"] is False


def test_latent_lookup(client):
    r = client.get(f"/v1/saes/{SAE}/latents/3656")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["latent"] == 3656 and 0 < info["frequency"] < 1
    assert 0 < info["typical_activation"] <= info["max_activation"]
    assert len(info["contexts"]) == 5 and "«" in info["contexts"][0]["text"]
    assert info["contexts"][0]["activation"] == pytest.approx(info["max_activation"], rel=1e-3)
    from saesteer.sae.output_scores import load_latent_output  # shipped with the default SAE

    out, top = load_latent_output(python_sae_spec(), top_tokens=True)
    assert info["output_score"] == pytest.approx(float(out.output_score[3656])) and info["top_tokens"] == top[3656]
    assert len(info["top_tokens"]) == 10
    for path, status, needle in [
        ("/v1/saes/nope/latents/1", 404, "unknown SAE"),
        ("/v1/saes/gs6/latents/1", 404, "no latent statistics"),
        (f"/v1/saes/{SAE}/latents/4608", 422, "out of range"),
        (f"/v1/saes/{SAE}/latents/abc", 422, "latent"),
    ]:
        r = client.get(path)
        assert r.status_code == status and needle in r.text, (path, r.status_code, r.text)


def test_two_saes_at_two_hook_points_in_one_request(client):
    body = {"messages": MSG, "max_new_tokens": 8, "compare": True,
            "interventions": [{"op": "add", "sae": "gs6", "latent": 3, "value": 40.0},
                              {"op": "ablate", "sae": SAE, "latent": 10}]}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] != r.json()["unsteered"]["tokens"]
    bad = {"messages": MSG, "interventions": [{"op": "clamp", "sae": "gs6", "latent": 64, "value": 1.0}]}
    status, detail = error_detail(client.post("/v1/generate", json=bad))
    assert status == 422 and "d_sae 64" in detail


def test_generate_with_compare(client):
    body = {"messages": MSG, "max_new_tokens": 12, "compare": True,
            "interventions": [{"op": "add", "sae": SAE, "latent": 123, "value": 60.0}]}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == len(out["tokens"]) <= 12
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + len(out["tokens"])
    assert out["unsteered"]["tokens"] != out["tokens"]
    plain = client.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 12}).json()
    assert plain["tokens"] == out["unsteered"]["tokens"]
    assert plain["unsteered"] is None


def test_raw_prompt_and_stop_string(client):
    r = client.post("/v1/generate", json={"prompt": "The capital of France is", "max_new_tokens": 20, "stop": ["."]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert "." not in out["text"] and out["finish_reason"] == "stop"


@pytest.mark.parametrize("body,field,reason", [
    ({"messages": MSG, "interventions": [{"op": "clamp", "sae": "nope", "latent": 1, "value": 1}]}, '"sae"', "unknown SAE"),
    ({"messages": MSG, "interventions": [{"op": "clamp", "sae": SAE, "latent": 4608, "value": 1}]}, '"latent"', "out of range"),
    ({"messages": MSG, "interventions": [{"op": "clamp", "sae": SAE, "latent": -1, "value": 1}]}, '"latent"', "greater than or equal"),
    ({"messages": MSG, "interventions": [{"op": "add_vector", "sae": SAE, "vector": [1.0, 2.0]}]}, '"vector"', "d_in 576"),
    ({"messages": MSG, "interventions": [{"op": "explode", "sae": SAE, "latent": 1}]}, '"interventions"', "op"),
    ({"messages": MSG, "interventions": [{"op": "ablate", "sae": SAE, "latent": 1, "value": 2}]}, '"interventions"', "ablate takes no value"),
    ({"messages": MSG, "interventions": [{"op": "clamp", "sae": SAE, "latent": 1, "valu": 2}]}, '"valu"', "Extra inputs"),
    ({"prompt": "   "}, '"prompt"', "prompt is empty"),
    ({"prompt": "hi", "messages": MSG}, '"body"', "exactly one of prompt or messages"),
    ({"prompt": "word " * 400}, '"prompt"', "the limit is 200"),
    ({"prompt": "word " * 100, "max_new_tokens": 250}, '"max_new_tokens"', "exceeds 300"),
    ({"prompt": "hello", "max_new_tokens": 251}, '"max_new_tokens"', "less than or equal to 250"),  # the server's setting
    ({"prompt": "hello", "max_new_tokens": 0}, '"max_new_tokens"', "greater than or equal"),
    ({"prompt": "hello", "temperature": -1}, '"temperature"', "greater than or equal"),
    ({"messages": MSG, "interventions": [{"op": "clamp", "sae": "gs6", "latent": 1, "value": 2, "unit": "typical"}]},
     '"unit"', "no latent statistics"),
    ({"messages": MSG, "interventions": [{"op": "scale", "sae": SAE, "latent": 1, "value": 2, "unit": "typical"}]},
     '"interventions"', "unit 'typical' applies to clamp and add"),
    ({"messages": MSG, "interventions": [{"op": "add_vector", "sae": "gs6", "vector": [1.0] * 576, "unit": "resid_norm"}]},
     '"unit"', "no residual norm is known"),
    ({"messages": MSG, "interventions": [{"op": "add_vector", "sae": SAE, "vector": [0.0] * 576, "unit": "resid_norm"}]},
     '"interventions"', "zero vector"),
    ({"messages": MSG, "interventions": [{"op": "clamp", "sae": SAE, "latent": 1, "value": 2, "when": {"sae": "nope", "latent": 3}}]},
     '"when", "sae"', "unknown SAE"),
    ({"messages": MSG, "interventions": [{"op": "clamp", "sae": SAE, "latent": 1, "value": 2, "when": {"sae": SAE, "latent": 5000}}]},
     '"when", "latent"', "out of range"),
    ({"messages": MSG, "interventions": [{"op": "add_vector", "hook": "blocks.3.hook_resid_pre", "vector": [1.0] * 576,
                                          "when": {"sae": SAE, "latent": 3}}]},
     '"when", "sae"', "after the edit"),
    ({"messages": MSG, "interventions": [{"op": "clamp", "sae": SAE, "latent": 1, "value": 2, "when": {"sae": SAE, "latent": 3, "mode": "always"}}]},
     '"mode"', "token"),
])
def test_bad_input_is_a_4xx_naming_the_field(client, body, field, reason):
    status, detail = error_detail(client.post("/v1/generate", json=body))
    assert status == 422
    assert field in detail and reason in detail, detail


@pytest.mark.parametrize("path,body,field", [
    ("/v1/chat/completions", {"messages": MSG, "max_completion_tokens": 251}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 251, "max_completion_tokens": 8}, "max_tokens"),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 251}, "max_tokens"),
])
def test_openai_token_maximum_is_the_servers_setting(client, path, body, field):
    status, detail = error_detail(client.post(path, json={"model": DEFAULT_MODEL_NAME, **body}))
    assert status == 422 and f'"{field}"' in detail and "less than or equal to 250" in detail, detail


def test_strength_units_resolve_from_the_saes_statistics(client):
    """``unit: typical`` is value x the latent's typical activation, ``unit: resid_norm`` is the unit
    vector x strength x the mean residual norm, both from the default SAE's latent_stats."""
    from saesteer.sae.stats import load_latent_stats
    from saesteer.server.config import python_sae_spec

    stats = load_latent_stats(python_sae_spec())
    typical = float(stats.typical_activation[3656])

    def tokens(iv):
        r = client.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 10, "interventions": [iv]})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    in_units = tokens({"op": "clamp", "sae": SAE, "latent": 3656, "value": 5.0, "unit": "typical"})
    assert in_units == tokens({"op": "clamp", "sae": SAE, "latent": 3656, "value": 5.0 * typical})
    plain = client.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 10}).json()["tokens"]
    assert in_units != plain
    g = torch.Generator().manual_seed(0)
    v = torch.randn(576, generator=g, dtype=torch.float64)
    scaled = (v / v.norm() * 0.3 * stats.resid_norm_mean).tolist()
    in_norms = tokens({"op": "add_vector", "sae": SAE, "vector": (v * 7).tolist(), "strength": 0.3, "unit": "resid_norm"})
    assert in_norms == tokens({"op": "add_vector", "sae": SAE, "vector": scaled})


def test_non_finite_values_are_refused(client):
    body = '{"messages": [{"role": "user", "content": "hi"}], "interventions": [{"op": "clamp", "sae": "%s", "latent": 1, "value": NaN}]}' % SAE
    status, detail = error_detail(client.post("/v1/generate", content=body, headers={"content-type": "application/json"}))
    assert status == 422 and '"value"' in detail and "finite" in detail
    body = '{"messages": [{"role": "user", "content": "hi"}], "interventions": [{"op": "add_vector", "sae": "%s", "vector": [Infinity]}]}' % SAE
    status, detail = error_detail(client.post("/v1/generate", content=body, headers={"content-type": "application/json"}))
    assert status == 422 and '"vector"' in detail and "finite" in detail


def test_oversized_body_is_413(client):
    r = client.post("/v1/generate", json={"prompt": "x" * 300_000})
    assert r.status_code == 413

    def chunks():  # no Content-Length: the limit must count what arrives
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"x" * 10_000
        yield b'"}'

    r = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "200000 bytes" in r.text
    small = client.post("/v1/generate", content=iter([b'{"prompt": "Hello", ', b'"max_new_tokens": 2}']),
                        headers={"content-type": "application/json"})
    assert small.status_code == 200, small.text


def test_errors_never_echo_a_huge_input_whole(client):
    huge = "s" * 100_000
    body = {"messages": MSG, "interventions": [{"op": "clamp", "sae": huge, "latent": 1, "value": 1.0}]}
    status, detail = error_detail(client.post("/v1/generate", json=body))
    assert status == 422 and '"sae"' in detail and len(detail) < 2000
    r = client.get(f"/v1/saes/{'q' * 50_000}/latents/1")
    assert r.status_code == 404 and len(r.text) < 2000
    long_hook = {"messages": MSG, "interventions": [{"op": "add_vector", "hook": "h" * 200, "vector": [1.0] * 576}]}
    status, detail = error_detail(client.post("/v1/generate", json=long_hook))  # within the schema, refused in the worker
    assert status == 422 and '"hook"' in detail and "not available" in detail


def test_worker_survives_bad_requests(client):
    for _ in range(3):
        error_detail(client.post("/v1/generate", json={"messages": MSG, "interventions": [{"op": "clamp", "sae": SAE, "latent": 10**6, "value": 1}]}))
    r = client.post("/v1/generate", json={"prompt": "Hello", "max_new_tokens": 3})
    assert r.status_code == 200


def test_sae_memory_budget_loads_on_demand_with_the_same_tokens(client, budget_client):
    """With ``sae_memory_mb`` the SAEs load on first use, one evicting the other, and steer exactly
    as with every SAE loaded; requests are validated from the configs alone."""
    assert budget_client.get("/v1/saes").json() == client.get("/v1/saes").json()
    for sae, latent in [(SAE, 123), ("gs6", 3), (SAE, 123), ("gs6", 5)]:
        body = {"messages": MSG, "max_new_tokens": 8,
                "interventions": [{"op": "add", "sae": sae, "latent": latent, "value": 60.0}]}
        r = budget_client.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == client.post("/v1/generate", json=body).json()["tokens"]
    status, detail = error_detail(budget_client.post("/v1/generate", json={
        "messages": MSG, "interventions": [{"op": "clamp", "sae": "nope", "latent": 1, "value": 1}]}))
    assert status == 422 and '"sae"' in detail and "unknown SAE" in detail
    status, detail = error_detail(budget_client.post("/v1/generate", json={
        "messages": MSG, "interventions": [{"op": "clamp", "sae": "gs6", "latent": 64, "value": 1}]}))
    assert status == 422 and "d_sae 64" in detail
    both = {"messages": MSG, "interventions": [{"op": "add", "sae": "gs6", "latent": 3, "value": 40.0},
                                               {"op": "ablate", "sae": SAE, "latent": 10}]}
    status, detail = error_detail(budget_client.post("/v1/generate", json=both))
    assert status == 422 and "sae_memory" in detail and "20.4 MiB" in detail
    assert budget_client.post("/v1/generate", json={"prompt": "Hello", "max_new_tokens": 3}).status_code == 200
    # concurrent requests whose SAEs do not fit together may share a batch: it runs in parts
    bodies = [{"messages": MSG, "max_new_tokens": 6, "compare": i == 0,
               "interventions": [{"op": "add", "sae": sae, "latent": 7 + i, "value": 50.0}]}
              for i, sae in enumerate([SAE, "gs6", SAE, "gs6"])]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda b: budget_client.post("/v1/generate", json=b), bodies))
    for r, b in zip(got, bodies):
        assert r.status_code == 200, r.text
        assert r.json() == client.post("/v1/generate", json=b).json()


def test_features_equal_encoding_the_hook_activation_directly(client, lm, python_sae):
    """POST /v1/features reads what SAE.encode gives on the hook point's activation, token by token
    (sinks flagged and read as zero), with the completion's tokens after the prompt's."""
    from saesteer.sae.activations import hook_activations, sink_mask
    from saesteer.steering.generate import render_prompt

    model, tok = lm
    completion = "Cats purr when they are happy."
    prompt = render_prompt(tok, messages=MSG)
    ids = prompt + tok(completion, add_special_tokens=False)["input_ids"]
    acts = hook_activations(model, python_sae.cfg.hook_point, torch.tensor([ids]))
    keep = sink_mask(acts)[0]
    z = python_sae.encode(acts[0]).double()
    z[~keep] = 0
    traced = z.max(0).values.topk(2).indices.tolist() + [3656]  # two that fire here, one that may not
    body = {"messages": MSG, "completion": completion, "sae": SAE, "top_k": 5, "latents": traced}
    r = client.post("/v1/features", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["prompt_tokens"] == len(prompt) and [t["token_id"] for t in got["tokens"]] == ids
    assert [t["sink"] for t in got["tokens"]] == (~keep).tolist() and got["tokens"][0]["sink"]
    traces = torch.tensor([lt["activations"] for lt in got["latents"]], dtype=torch.float64)
    ref = z[:, traced].T
    assert float(ref.norm()) > 0 and float((traces - ref).norm() / ref.norm()) < 1e-5
    for t, row in zip(got["tokens"], z):
        vals, idx = row.topk(5)
        want = [(int(i), float(v)) for i, v in zip(idx, vals) if v > 0]
        assert [x["latent"] for x in t["top"]] == [i for i, _ in want]
        assert all(abs(x["activation"] - v) <= 1e-4 * max(1.0, v) for x, (_, v) in zip(t["top"], want))


@pytest.mark.parametrize("body,field,reason", [
    ({"prompt": "hi", "sae": "nope"}, '"sae"', "unknown SAE"),
    ({"prompt": "hi", "sae": SAE, "latents": [1, 4608]}, '"latents", 1', "out of range"),
    ({"prompt": "hi", "messages": MSG, "sae": SAE}, '"body"', "exactly one of prompt or messages"),
    ({"prompt": "hi", "sae": SAE, "top_k": 65}, '"top_k"', "less than or equal"),
    ({"prompt": "hi", "sae": SAE, "completion": "word " * 400}, '"completion"', "exceeds 300"),
])
def test_features_bad_input_is_a_4xx_naming_the_field(client, body, field, reason):
    status, detail = error_detail(client.post("/v1/features", json=body))
    assert status == 422
    assert field in detail and reason in detail, detail


GOOD = [
    {"messages": [{"role": "user", "content": c}], "max_new_tokens": 4, **extra}
    for c, extra in [
        ("Tell me something interesting.", {}),
        ("Describe a place you like.", {"interventions": [{"op": "clamp", "sae": SAE, "latent": 3656, "value": 12.0}]}),
        ("Write one sentence about your morning.", {"compare": True,
                                                    "interventions": [{"op": "add", "sae": SAE, "latent": 123, "value": 60.0}]}),
        ("Name a colour.", {"temperature": 0.8, "top_p": 0.9, "seed": 3}),
        ("What is two plus two?", {"interventions": [{"op": "ablate", "sae": SAE, "latent": 10, "positions": [1, 2, 3]}]}),
        ("Say hello.", {"interventions": [{"op": "add_vector", "sae": SAE, "vector": [0.01] * 576, "strength": 50.0}]}),
        ("Give me a fruit.", {"compare": True, "repetition_penalty": 1.3, "frequency_penalty": 0.5,
                              "interventions": [{"op": "scale", "sae": SAE, "latent": 77, "value": 3.0}]}),
    ]
]


def _iv(**kw):
    return {"messages": MSG, "max_new_tokens": 4, "interventions": [kw]}


POISON = {
    "clamp 1e308": (_iv(op="clamp", sae=SAE, latent=5, value=1e308), '"value"'),
    "clamp 1e39": (_iv(op="clamp", sae=SAE, latent=5, value=1e39), '"value"'),
    "scale 1e39": (_iv(op="scale", sae=SAE, latent=5, value=1e39), '"value"'),
    "add 1e39": (_iv(op="add", sae=SAE, latent=5, value=-1e39), '"value"'),
    "vector element 1e308": (_iv(op="add_vector", sae=SAE, vector=[1e308] + [0.0] * 575), '"vector"'),
    "strength 1e308": (_iv(op="add_vector", sae=SAE, vector=[1.0] * 576, strength=1e308), '"strength"'),
    "typical 1e39": (_iv(op="clamp", sae=SAE, latent=3656, value=1e39, unit="typical"), '"value"'),
    # within the wire bounds, refused in the worker, in the same batch as the good ones
    "typical 1e5 x typical": (_iv(op="clamp", sae=SAE, latent=3656, value=1e5, unit="typical"), '"value"'),
    "vector norm": (_iv(op="add_vector", sae=SAE, vector=[1e5] * 576, strength=1e5), '"strength"'),
    "resid_norm strength": (_iv(op="add_vector", sae=SAE, vector=[1.0] * 576, strength=1e5, unit="resid_norm"), '"strength"'),
    "position 1e20": (_iv(op="clamp", sae=SAE, latent=5, value=1.0, positions=[10**20]), '"positions"'),
    "position past the limit": (_iv(op="clamp", sae=SAE, latent=5, value=1.0, positions=[1, 5000]), '"positions"'),
    "temperature 1e-300": ({"messages": MSG, "max_new_tokens": 4, "temperature": 1e-300}, '"temperature"'),
    "top_p 1e-300": ({"messages": MSG, "max_new_tokens": 4, "temperature": 0.5, "top_p": 1e-300}, '"top_p"'),
    "repetition_penalty 1e-300": ({"messages": MSG, "max_new_tokens": 4, "repetition_penalty": 1e-300}, '"repetition_penalty"'),
    "frequency_penalty 3": ({"messages": MSG, "max_new_tokens": 4, "frequency_penalty": 3.0}, '"frequency_penalty"'),
    "presence_penalty -1e308": ({"messages": MSG, "max_new_tokens": 4, "presence_penalty": -1e308}, '"presence_penalty"'),
}


@pytest.fixture(scope="module")
def sequential_answers(client):
    out = []
    for b in GOOD:
        r = client.post("/v1/generate", json=b)
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


@pytest.mark.parametrize("name", list(POISON))
def test_a_poisoned_request_spoils_no_other(client, sequential_answers, name):
    """Issue 12: each poisoned request, sent together with 7 good ones, gets a 4xx naming its field,
    and the good ones get exactly their sequential answers (not NaN tokens, not a batch-wide 500)."""
    bad, field = POISON[name]
    bodies = GOOD[:3] + [bad] + GOOD[3:]
    with ThreadPoolExecutor(len(bodies)) as ex:
        got = list(ex.map(lambda b: client.post("/v1/generate", json=b), bodies))
    status, detail = error_detail(got[3])
    assert status == 422 and field in detail, detail
    rest = got[:3] + got[4:]
    for r, want in zip(rest, sequential_answers):
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == want["tokens"]
        assert (r.json()["unsteered"] or {}).get("tokens") == (want["unsteered"] or {}).get("tokens")
