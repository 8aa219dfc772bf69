"""A real ``saesteer serve`` process on loopback, driven by the SDK and by concurrent raw requests."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from saesteer_client import Client, SaesteerError, add, add_vector, clamp
from saesteer_client.schema import SUGGESTED_REPETITION_PENALTY

from saesteer.server.config import DEFAULT_SAE_NAME, PYTHON_SAE_NAME
from saesteer.server.runtime import stop_process_group
from tests.server.serving import serve_process

pytestmark = pytest.mark.slow  # a real server process: model load and worker start, ~25 s

SAE = PYTHON_SAE_NAME
KEY = "test-key-123"
MSG = [{"role": "user", "content": "Describe a place you like."}]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    env = {"SAESTEER_API_KEY": KEY, "SAESTEER_MAX_BATCH_SIZE": "4", "SAESTEER_BATCH_TIMEOUT": "0.3"}
    proc, url, _ = serve_process(tmp_path_factory.mktemp("server") / "server.log", tmp_path_factory.mktemp("cwd"), env=env)
    try:
        yield url
    finally:
        stop_process_group(proc)  # SIGTERM: the graceful stop (tests/e2e/test_shutdown.py); SIGINT took the full 20 s


def test_sdk_lists_and_generates(server_url):
    with Client(server_url, api_key=KEY) as c:
        assert c.health()
        saes = c.saes()
        # the default: the general-English SAE first, the Python-documentation one beside it
        assert [s.id for s in saes] == [DEFAULT_SAE_NAME, SAE] and all(s.d_in == 576 for s in saes)
        r = c.generate(messages=MSG, interventions=[add(SAE, 123, 60.0)], max_new_tokens=10, compare=True)
        assert r.unsteered is not None and r.tokens != r.unsteered.tokens
        assert r.usage.completion_tokens == len(r.tokens)


def test_sdk_raises_with_the_field_named(server_url):
    with Client(server_url, api_key=KEY) as c:
        with pytest.raises(SaesteerError) as e:
            c.generate(messages=MSG, interventions=[clamp(SAE, 99_999, 1.0)], max_new_tokens=2)
        assert e.value.status_code == 422
        assert e.value.detail[0]["loc"][-1] == "latent"


def test_docs_are_behind_the_key_and_declare_it(server_url):
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(server_url + path).status_code == 401, path
    r = httpx.get(server_url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    schema = r.json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "the server's API key"}
    assert schema["security"] == [{"bearerAuth": []}]
    assert schema["paths"]["/health"]["get"]["security"] == []
    assert httpx.get(server_url + "/docs", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_auth_is_required(server_url):
    assert httpx.get(server_url + "/health").status_code == 200
    assert httpx.get(server_url + "/v1/saes").status_code == 401
    with Client(server_url, api_key="wrong") as c, pytest.raises(SaesteerError) as e:
        c.generate("Hello", max_new_tokens=2)
    assert e.value.status_code == 401


def test_one_bad_request_spoils_no_other_in_its_batch(server_url):
    goods = [
        {"messages": MSG, "max_new_tokens": 8},
        {"messages": MSG, "max_new_tokens": 8, "interventions": [clamp(SAE, 123, 40.0).model_dump()]},
        {"messages": MSG, "max_new_tokens": 8, "interventions": [add_vector([0.5] * 576, 20.0, sae=SAE).model_dump()]},
    ]
    bad = {"messages": MSG, "max_new_tokens": 8, "interventions": [{"op": "clamp", "sae": SAE, "latent": 5000, "value": 1.0}]}
    headers = {"Authorization": f"Bearer {KEY}"}

    def post(body):
        return httpx.post(server_url + "/v1/generate", json=body, headers=headers, timeout=300)

    with ThreadPoolExecutor(4) as ex:
        rs = list(ex.map(post, goods + [bad]))
    assert [r.status_code for r in rs] == [200, 200, 200, 422]
    alone = [post(b).json()["tokens"] for b in goods]
    assert [r.json()["tokens"] for r in rs[:3]] == alone  # batched == one by one (greedy)


def test_sdk_stream_adds_up_to_the_response(server_url):
    with Client(server_url, api_key=KEY) as c:
        events = list(c.stream(messages=MSG, interventions=[add(SAE, 123, 60.0)], max_new_tokens=10))
        done = events[-1]
        assert done.type == "done" and all(e.type == "token" for e in events[:-1])
        assert "".join(e.text for e in events[:-1]) == done.response.text
        assert [e.token for e in events[:-1]] == done.response.tokens
        with pytest.raises(SaesteerError) as e:  # refused before the first token: its status, not a 200
            next(c.stream(messages=MSG, interventions=[clamp(SAE, 99_999, 1.0)]))
        assert e.value.status_code == 422


def test_async_sdk_drives_16_concurrent_streams_each_as_alone(server_url):
    """16 streams at once, each with its own steering (and some sampled with a seed), through the
    continuous batch: each gets the tokens it gets alone."""
    import asyncio

    from saesteer_client import AsyncClient, scale

    def request(i: int) -> dict:
        steer = [[], [clamp(SAE, 3656, 6.0, unit="typical")], [add(SAE, 123, 40.0)], [scale(SAE, 3656, 0.0)]][i % 4]
        kw = {"temperature": 0.8, "seed": i} if i % 3 == 0 else {}
        return dict(messages=[{"role": "user", "content": f"Give me fact number {i} about rivers."}],
                    interventions=steer, max_new_tokens=6 + i % 5, **kw)

    async def one(c, i):
        return [e async for e in c.stream(**request(i))][-1].response.tokens

    async def main():
        async with AsyncClient(server_url, api_key=KEY) as c:
            together = await asyncio.gather(*(one(c, i) for i in range(16)))
            alone = [await one(c, i) for i in range(16)]
        return together, alone

    together, alone = asyncio.run(main())
    assert together == alone
    assert len({tuple(t) for t in together}) > 8  # they really differ


def test_cli_concept_search_against_the_server(server_url):
    out = subprocess.run([sys.executable, "-m", "saesteer", "concepts", "search", "--url", server_url, "--api-key", KEY,
                          "--words", "ocean", "sea", "--positive", "Whales swim in the deep ocean.", "--top-k", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = out.stdout.strip().splitlines()
    assert len(rows) == 3 and all(r.split("\t")[0] in (DEFAULT_SAE_NAME, SAE) and '"op":"clamp"' in r for r in rows)
    no_dir = subprocess.run([sys.executable, "-m", "saesteer", "concepts", "save", "--name", "ocean", "--url", server_url,
                             "--api-key", KEY, "--words", "ocean"], capture_output=True, text=True, timeout=120)
    assert no_dir.returncode == 1 and "concepts-dir" in no_dir.stderr  # this server keeps no concepts


def test_sdk_concept_search_mixes_send_as_they_are(server_url):
    """``search_concept_mixes``: one mix per attached SAE with the asked size and strength, whose
    edits the server takes as a request's interventions and which change the answer."""
    pos = ["The waves crashed on the sandy beach.", "We sailed across the open sea.", "Whales swim in the deep ocean."]
    with Client(server_url, api_key=KEY) as c:
        mixes = c.search_concept_mixes(pos, mix_latents=16, mix_strength=0.2, mix_fit_steps=2)
        assert sorted(m.sae for m in mixes) == sorted(s.id for s in c.saes())
        assert all(len(m.suggested) == 16 and m.strength == 0.2 and {e.op for e in m.suggested} == {"add"} for m in mixes)
        assert all(m.fit_steps == 2 and m.fit_nll_end < m.fit_nll_start and m.repetition_penalty == SUGGESTED_REPETITION_PENALTY
                   for m in mixes)
        general = next(m for m in mixes if m.sae == DEFAULT_SAE_NAME)
        steered = c.generate(messages=MSG, interventions=general.suggested, max_new_tokens=8)
        assert steered.tokens != c.generate(messages=MSG, max_new_tokens=8).tokens
