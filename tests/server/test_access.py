"""API keys with scopes, rate limits, and what the operator sees (in-process, real worker)."""

from __future__ import annotations

import json

import pytest

from saesteer.server.auth import hash_key
from saesteer.server.config import ServerSettings

from serving import serve

pytestmark = pytest.mark.slow  # a real server with the real model

KEYS = {"gen": "k-gen-1", "feat": "k-feat-2", "admin": "k-admin-3", "tok": "k-tok-4", "heavy": "k-heavy-5"}
MSG = [{"role": "user", "content": "Say hi."}]


def auth(name):
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    (d / "keys.json").write_text(json.dumps({"keys": [
        {"name": "gen", "sha256": hash_key(KEYS["gen"]), "scopes": ["generate"], "requests_per_minute": 3},
        {"name": "feat", "sha256": hash_key(KEYS["feat"]), "scopes": ["features"]},
        {"name": "admin", "sha256": hash_key(KEYS["admin"]), "scopes": ["admin"]},
        {"name": "tok", "sha256": hash_key(KEYS["tok"]), "scopes": ["generate"], "tokens_per_minute": 20},
        {"name": "heavy", "sha256": hash_key(KEYS["heavy"]), "scopes": ["features"], "tokens_per_minute": 30},
    ]}))
    settings = ServerSettings(api_keys_file=str(d / "keys.json"),
                              max_prompt_tokens=200, max_total_tokens=300)
    with serve(settings) as c:
        yield c


def test_keys_are_kept_as_digests_only(client, tmp_path):
    from saesteer.server.app import all_keys

    keys = all_keys(ServerSettings(api_key="plain-secret", api_keys=[{"name": "x", "sha256": "ab" * 32}]))
    dumped = json.dumps([k.model_dump() for k in keys])
    assert "plain-secret" not in dumped and hash_key("plain-secret") in dumped
    assert keys[-1].scopes == ["generate", "images", "features", "concepts:write", "admin"]
    bad = tmp_path / "k.yaml"
    bad.write_text("keys:\n  - name: a\n    sha256: nothex\n")
    with pytest.raises(ValueError, match="sha256"):
        all_keys(ServerSettings(api_keys_file=str(bad)))


def test_401_without_a_valid_key_403_without_the_scope(client):
    assert client.get("/health").status_code == 200  # open
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEYS['gen']}"}):
        r = client.get("/v1/saes", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["detail"][0]["type"] == "unauthorized"
    r = client.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 2}, headers=auth("feat"))
    assert r.status_code == 403 and "lacks the scope 'generate'" in r.json()["detail"][0]["msg"]
    assert client.get("/v1/saes", headers=auth("gen")).status_code == 403
    assert client.get("/v1/saes", headers=auth("feat")).status_code == 200
    assert client.get("/openapi.json", headers=auth("feat")).status_code == 200  # any valid key
    r = client.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 2}, headers=auth("admin"))
    assert r.status_code == 200, r.text  # admin may do everything


def test_requests_per_minute_429_with_retry_after(client):
    bad = {"prompt": "   "}  # refused with 422 by the schema: cheap, and still counted
    codes = [client.post("/v1/generate", json=bad, headers=auth("gen")).status_code for _ in range(3)]
    assert codes == [422, 422, 422]
    r = client.post("/v1/generate", json=bad, headers=auth("gen"))
    assert r.status_code == 429 and r.json()["detail"][0]["type"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 20  # one request refills in 60/3 s
    assert client.get("/v1/saes", headers=auth("feat")).status_code == 200  # other keys are not limited


def test_tokens_per_minute_429(client):
    r = client.post("/v1/generate", json={"prompt": "   ", "max_new_tokens": 15}, headers=auth("tok"))
    assert r.status_code == 422  # charged 15 of 20 tokens
    r = client.post("/v1/generate", json={"prompt": "   ", "max_new_tokens": 4, "compare": True}, headers=auth("tok"))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # 8 > the 5 left
    r = client.post("/v1/generate", json={"prompt": "   ", "max_new_tokens": 30}, headers=auth("tok"))
    assert r.status_code == 429 and "retry-after" not in r.headers  # never fits in 20 per minute
    assert "exceed the 20 tokens per minute" in r.json()["detail"][0]["msg"]


def test_heavy_work_is_charged_what_it_cost(client):
    """A read-out is admitted while the key's bucket is out of debt and charged, once answered, the
    tokens it read (the x-saesteer-cost header): 43 tokens on a 30-per-minute key leave it in debt."""
    from saesteer.server.middleware import COST_HEADER

    body = {"sae": "smollm2-135m-res10-k32", "prompt": "The quick brown fox jumps over the lazy dog. " * 4}
    r = client.post("/v1/features", json=body, headers=auth("heavy"))
    assert r.status_code == 200, r.text
    read = len(r.json()["tokens"])
    assert int(r.headers[COST_HEADER]) == read > 30
    r = client.post("/v1/features", json=body, headers=auth("heavy"))
    assert r.status_code == 429 and r.json()["detail"][0]["type"] == "rate_limited"
    assert int(r.headers["retry-after"]) >= 60 * (read - 30) / 30  # the debt, then one token, refilled at 30/min
    assert client.post("/v1/features", json=body, headers=auth("feat")).status_code == 200  # a key without a limit


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_ready_and_metrics(client, caplog):
    import logging

    r = client.get("/ready")  # open, like /health
    assert r.status_code == 200 and r.json()["ready"] is True and "idle" in r.json()["workers"].values()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth("feat")).status_code == 403
    with caplog.at_level(logging.INFO, logger="saesteer.access"):
        r = client.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 3, "compare": True},
                        headers={**auth("admin"), "X-Request-ID": "trace-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
        other = client.get("/v1/saes", headers=auth("feat"))
        assert len(other.headers["x-request-id"]) == 32  # made up when not given
        assert client.get("/v1/saes", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"] != "bad id with spaces"
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "saesteer.access"]
    gen = next(x for x in lines if x["request_id"] == "trace-42")
    assert (gen["route"], gen["status"], gen["key"], gen["tokens"]) == ("/v1/generate", 200, "admin", 6)
    assert gen["duration_ms"] > 0
    assert any(x["status"] == 401 and x["reject"] == "unauthorized" for x in lines)
    text = client.get("/metrics", headers=auth("admin")).text
    assert metric(text, "saesteer_http_requests_total", route="/v1/generate", method="POST", status="200") >= 2
    assert metric(text, "saesteer_http_requests_total", route="/v1/saes", method="GET", status="401") >= 1
    assert metric(text, "saesteer_rejections_total", reason="rate_limited") >= 1  # from the tests above
    assert metric(text, "saesteer_rejections_total", reason="unauthorized") >= 1
    assert metric(text, "saesteer_http_request_duration_seconds_count", route="/v1/generate") >= 2
    assert metric(text, "saesteer_generated_tokens_total") >= 6
    assert metric(text, "saesteer_queue_depth") == 0
