"""Fuzz a real server over its own OpenAPI schema (schemathesis + hypothesis, bounded): no input
may get a 5xx. Token limits are tiny so that the valid requests among the fuzzed ones generate
in a second or two."""

from __future__ import annotations

import os
import time
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from test_shutdown import start_server

from saesteer.server.runtime import stop_process_group

pytestmark = pytest.mark.slow  # a real server with the real model

KEY = "fuzz-key"
SAE = "smollm2-135m-res10-k32"
MODEL = "SmolLM2-135M-Instruct"
EXAMPLES = {"POST /v1/generate": 300, "GET /v1/saes": 10, "GET /v1/saes/{sae_id}/latents/{latent}": 60,
            "POST /v1/chat/completions": 80, "POST /v1/completions": 60, "GET /v1/models": 3,
            "POST /v1/concepts": 30, "GET /v1/concepts/{name}": 10, "GET /v1/concepts": 2,
            "POST /v1/features": 40, "POST /v1/concepts/search": 15}
GENERATING = ("/v1/generate", "/v1/chat/completions", "/v1/completions")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    proc, url, _, _ = start_server(tmp, SAESTEER_API_KEY=KEY, SAESTEER_MAX_PROMPT_TOKENS="40",
                                   SAESTEER_MAX_TOTAL_TOKENS="48", SAESTEER_MAX_READOUT_TOKENS="64",
                                   SAESTEER_MAX_SEARCH_TOKENS="3000")
    try:
        yield url
    finally:
        stop_process_group(proc)


def narrow(node):
    """The schema with SAE ids and hook points drawn from real and wrong values, so that fuzzed
    requests get past the id checks into planning, steering and generation."""
    names = {"sae": [SAE, "nope"], "sae_id": [SAE, "nope"], "model": [MODEL, "gpt-4o"],
             "hook": ["blocks.10.hook_resid_post", "blocks.3.hook_mlp_out", "blocks.99.hook_resid_post"]}
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "properties" and isinstance(v, dict):
                out[k] = {p: ({"type": "string", "enum": names[p]} if p in names else narrow(q)) for p, q in v.items()}
            elif k == "parameters" and isinstance(v, list):
                out[k] = [{**q, "schema": {"type": "string", "enum": names[q["name"]]}} if q.get("name") in names else narrow(q)
                          for q in v]
            else:
                out[k] = narrow(v)
        return out
    if isinstance(node, list):
        return [narrow(x) for x in node]
    return node


def test_fuzzed_requests_never_get_a_5xx(server):
    import schemathesis

    headers = {"Authorization": f"Bearer {KEY}"}
    raw = httpx.get(server + "/openapi.json", headers=headers).json()
    schema = schemathesis.openapi.from_dict(narrow(raw))
    statuses: Counter = Counter()
    failures = []
    slowest: dict[str, float] = {}
    t0 = time.time()
    for result in schema.get_all_operations():
        op = result.ok()
        n = EXAMPLES.get(f"{op.method.upper()} {op.path}")
        if n is None:
            continue

        @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case):
            t = time.monotonic()
            r = case.call(base_url=server, headers=headers, timeout=120)
            slowest[op.path] = max(slowest.get(op.path, 0.0), time.monotonic() - t)
            statuses[(op.path, r.status_code)] += 1
            if r.status_code == 422 and os.environ.get("FUZZ_DEBUG"):
                print(r.text[:200])
            if r.status_code >= 500:
                failures.append((op.path, case.body, r.status_code, r.text[:300]))

        run()
    took = time.time() - t0
    print(f"fuzzed {sum(statuses.values())} requests in {took:.0f} s: {dict(sorted(statuses.items()))}")
    print("slowest request per route (s):", {p: round(t, 1) for p, t in sorted(slowest.items())})
    assert not failures, failures[:5]
    assert max(slowest.values()) < 60, slowest  # every route bounded by its limits and deadlines
    assert any(code == 200 for (path, code) in statuses if path in GENERATING)  # some were valid
    for path in GENERATING + ("/v1/features", "/v1/concepts/search"):
        assert any(code == 422 for (p, code) in statuses if p == path)
    assert any(code == 200 for (p, code) in statuses if p in ("/v1/features", "/v1/concepts/search"))
