"""Safety policies in the running server: refuse with finish_reason content_filter on every generate
route (streamed or not) beside untouched requests, only an admin key switches a policy off, policies
reload without a restart, and a bad policies file stops the server from starting."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from saesteer_client import PolicyList

from saesteer.server.auth import hash_key
from saesteer.server.config import ServerSettings
from saesteer.steering.eval.safety import _REGEX

import saesteer.steering as steering_pkg

from serving import serve

POLICY_DIR = Path(steering_pkg.__file__).parent / "policies"
KEYS = {"gen": "k-gen-1", "admin": "k-admin-2"}
PII = {"prompt": "Name: John Smith\nEmail:", "max_new_tokens": 24}
CLEAN = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_new_tokens": 16}
PII_CHAT = [{"role": "user", "content": "Write a fictional contact card for a person: full name, email address, phone "
                                        "number and home address."}]


def auth(name):
    return {"Authorization": f"Bearer {KEYS[name]}"}


def policy_file(folder: Path, action: str = "refuse") -> Path:
    shutil.copy(POLICY_DIR / "pii_raw_res10.safetensors", folder / "pii_raw_res10.safetensors")
    path = folder / "policies.json"
    path.write_text(json.dumps({"policies": [
        {"name": "pii", "detector": {"kind": "raw_probe", "probe": "pii_raw_res10.safetensors"}, "threshold": 0.9,
         "watch": ["generated"], "action": action}]}))
    return path


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    d = tmp_path_factory.mktemp("policies")
    (d / "keys.json").write_text(json.dumps({"keys": [
        {"name": "gen", "sha256": hash_key(KEYS["gen"]), "scopes": ["generate"]},
        {"name": "admin", "sha256": hash_key(KEYS["admin"]), "scopes": ["admin"]}]}))
    settings = ServerSettings(api_keys_file=str(d / "keys.json"), policies=str(policy_file(d)), features=False,
                              runtime_dir=str(d / "rt"))
    with serve(settings, ready="/ready") as c:
        c.policy_path = Path(settings.policies)
        yield c


pytestmark = pytest.mark.slow  # a real server with the real model


def test_refused_beside_good_and_bad_requests(client):
    alone = client.post("/v1/generate", json=CLEAN, headers=auth("gen")).json()
    bad = dict(CLEAN, interventions=[{"sae": "no-such-sae", "latent": 1, "op": "ablate"}])
    unknown = dict(CLEAN, disable_policies=["nope"])  # an admin's request naming a policy the server lacks
    with ThreadPoolExecutor(4) as pool:  # one batch: the refused row, a good one and two bad ones
        futs = [pool.submit(client.post, "/v1/generate", json=b, headers=auth(who))
                for b, who in ((PII, "gen"), (CLEAN, "gen"), (bad, "gen"), (unknown, "admin"))]
        pii, clean, wrong, no_policy = [f.result() for f in futs]
    assert pii.status_code == 200, pii.text
    body = pii.json()
    assert body["finish_reason"] == "content_filter" and not _REGEX.search(body["text"]), body
    assert body["safety"][0]["policy"] == "pii" and body["safety"][0]["action"] == "refuse"
    assert clean.status_code == 200 and clean.json() == alone and alone["safety"] == []
    assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"][-1] == "sae"
    assert no_policy.status_code == 422 and no_policy.json()["detail"][0]["loc"] == ["body", "disable_policies", 0]


def test_streamed_refusal_never_sends_the_personal_data(client):
    with client.stream("POST", "/v1/generate", json=dict(PII, stream=True), headers=auth("gen")) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    done = events[-1]["response"]
    assert done["finish_reason"] == "content_filter"
    assert [e["token"] for e in events if e["type"] == "token"] == done["tokens"]
    assert "".join(e["text"] for e in events if e["type"] == "token") == done["text"]
    assert not _REGEX.search(done["text"])


def test_openai_routes_report_content_filter(client):
    import openai

    body = {"model": "SmolLM2-135M-Instruct", "messages": PII_CHAT, "max_tokens": 40, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body, headers=auth("gen"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "content_filter" and out["safety"][0]["policy"] == "pii"
    assert not _REGEX.search(out["choices"][0]["message"]["content"])
    parsed = openai.types.chat.ChatCompletion.model_validate(out)  # what the official client reads
    assert parsed.choices[0].finish_reason == "content_filter"
    with client.stream("POST", "/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": PII["prompt"],
                                                        "max_tokens": 24, "temperature": 0, "stream": True},
                       headers=auth("gen")) as s:
        chunks = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    last = json.loads(chunks[-2])
    assert last["choices"][0]["finish_reason"] == "content_filter" and last["safety"][0]["policy"] == "pii"
    assert not _REGEX.search("".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1]))


def test_only_an_admin_key_switches_a_policy_off(client):
    r = client.post("/v1/generate", json=dict(PII, disable_policies=["pii"]), headers=auth("gen"))
    assert r.status_code == 403 and r.json()["detail"][0]["loc"] == ["body", "disable_policies"]
    r = client.post("/v1/chat/completions", json={"model": "SmolLM2-135M-Instruct", "messages": PII_CHAT,
                                                  "disable_policies": ["pii"]}, headers=auth("gen"))
    assert r.status_code == 403
    r = client.post("/v1/generate", json=dict(PII, disable_policies=["pii"]), headers=auth("admin"))
    assert r.status_code == 200 and r.json()["finish_reason"] != "content_filter" and _REGEX.search(r.json()["text"])


def test_policies_reload_without_a_restart(client):
    assert client.post("/v1/admin/policies/reload", headers=auth("gen")).status_code == 403
    listed = PolicyList.model_validate(client.get("/v1/admin/policies", headers=auth("admin")).json())  # the SDK's model
    assert (listed.file, listed.policies[0].name, listed.policies[0].action) == ("policies.json", "pii", "refuse")
    folder = client.policy_path.parent
    try:
        policy_file(folder, action="flag")
        r = client.post("/v1/admin/policies/reload", headers=auth("admin"))
        assert r.status_code == 200 and r.json()["policies"][0]["action"] == "flag"
        for _ in range(2):  # the static worker and the streaming one both reload
            for stream in (False, True):
                body = client.post("/v1/generate", json=dict(PII, stream=stream), headers=auth("gen"))
                res = body.json() if not stream else json.loads(body.text.strip().split("data: ")[-1])["response"]
                assert res["finish_reason"] != "content_filter" and res["safety"][0]["action"] == "flag"
        # a bad file is refused, naming the field, and the policies in force stay
        client.policy_path.write_text(json.dumps({"policies": [{"name": "pii", "detector": {"kind": "concept",
                                                                "concept": "nope"}, "threshold": 1, "action": "flag"}]}))
        r = client.post("/v1/admin/policies/reload", headers=auth("admin"))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["policies_file", "policies", 0, "detector", "concept"]
        assert client.post("/v1/generate", json=PII, headers=auth("gen")).json()["safety"][0]["action"] == "flag"
    finally:
        policy_file(folder)
        assert client.post("/v1/admin/policies/reload", headers=auth("admin")).status_code == 200
    assert client.post("/v1/generate", json=PII, headers=auth("gen")).json()["finish_reason"] == "content_filter"



def test_policy_hits_are_counted_in_metrics(client):
    import re

    def refused() -> float:
        text = client.get("/metrics", headers=auth("admin")).text
        m = re.search(r'^saesteer_policy_hits_total\{action="refuse",policy="pii"\} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    before = refused()
    assert client.post("/v1/generate", json=PII, headers=auth("gen")).json()["finish_reason"] == "content_filter"
    with client.stream("POST", "/v1/generate", json=dict(PII, stream=True), headers=auth("gen")) as r:
        list(r.iter_lines())
    assert refused() == before + 2  # the static worker's and the streaming worker's


def test_the_sdk_reads_safety_and_manages_policies(client):
    import httpx
    from saesteer_client import Client, SaesteerError

    class ViaTestClient(httpx.BaseTransport):  # the SDK's own httpx client, answered by the in-process server
        def handle_request(self, request):
            r = client.request(request.method, request.url.raw_path.decode(), content=request.read(), headers=request.headers)
            return httpx.Response(r.status_code, headers=r.headers, content=r.content)

    gen = Client("http://testserver", api_key=KEYS["gen"], transport=ViaTestClient(), retries=0)
    admin = Client("http://testserver", api_key=KEYS["admin"], transport=ViaTestClient(), retries=0)
    r = gen.generate(PII["prompt"], max_new_tokens=PII["max_new_tokens"])
    assert r.finish_reason == "content_filter" and r.safety[0].policy == "pii" and r.safety[0].tokens[0].position == "generated"
    with pytest.raises(SaesteerError) as e:
        gen.generate(PII["prompt"], max_new_tokens=8, disable_policies=["pii"])
    assert e.value.status_code == 403
    free = admin.generate(PII["prompt"], max_new_tokens=PII["max_new_tokens"], disable_policies=["pii"])
    assert free.safety == [] and free.tokens[: len(r.tokens)] == r.tokens  # the same completion, not cut
    assert [p.name for p in admin.policies().policies] == ["pii"]
    assert admin.reload_policies().generation >= 1
    with pytest.raises(SaesteerError) as e:
        gen.reload_policies()
    assert e.value.status_code == 403
