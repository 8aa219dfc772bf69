"""Streaming and the OpenAI-compatible routes over the continuous-batching worker, in-process with the
real SmolLM2 and the default SAE; the official ``openai`` package as the client."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from saesteer.server.config import PYTHON_SAE_NAME, ServerSettings
from saesteer.server.runtime import text_worker_pid

from serving import serve

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # LitServe workers with the real model

SAE = PYTHON_SAE_NAME
MODEL = "SmolLM2-135M-Instruct"
MSG = [{"role": "user", "content": "Describe a place you like."}]
STEER = [{"op": "clamp", "sae": SAE, "latent": 3656, "value": 8.0, "unit": "typical"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runtime = tmp_path_factory.mktemp("runtime")
    settings = ServerSettings(features=False, max_prompt_tokens=200,
                              max_total_tokens=1200, runtime_dir=str(runtime))
    with serve(settings, monitor=True) as c:  # the monitor restarts dead workers
        yield c, str(runtime)


def metrics(c) -> dict[str, float]:
    """``/metrics`` as {sample with labels: value}."""
    values = {}
    for line in c.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            values[name] = float(v)
    return values


@pytest.fixture(scope="module")
def oai(server):
    c, _ = server
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c, max_retries=0)


def sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines.get("event", "message"), json.loads(lines["data"])))
    return out


def test_models_lists_the_served_model(oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]


def test_openai_chat_plain_and_steered_streamed_equals_non_streamed(oai):
    contents = []
    for extra in (None, {"steering": STEER}):
        kw = dict(model=MODEL, messages=MSG, max_tokens=16, temperature=0, extra_body=extra)
        whole = oai.chat.completions.create(**kw)
        chunks = list(oai.chat.completions.create(stream=True, **kw))
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert streamed == whole.choices[0].message.content and streamed
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        assert whole.usage.completion_tokens == 16 or whole.choices[0].finish_reason == "stop"
        contents.append(streamed)
    assert contents[0] != contents[1]  # the steering arrived


def test_openai_completions_and_native_generate_agree(server, oai):
    c, _ = server
    whole = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in oai.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    native = c.post("/v1/generate", json={"prompt": "The capital of France is", "max_new_tokens": 8}).json()
    assert whole.choices[0].text == streamed == native["text"]  # the static loop and the continuous one agree


def test_generate_stream_events_add_up_and_compare_streams_both(server):
    c, _ = server
    body = {"messages": MSG, "max_new_tokens": 12, "interventions": STEER, "compare": True}
    plain = c.post("/v1/generate", json=body).json()
    r = c.post("/v1/generate", json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"}
    done = events[-1][1]["response"]
    for role, completion in (("steered", done), ("unsteered", done["unsteered"])):
        toks = [e for k, e in events if k == "token" and e["role"] == role]
        assert [e["token"] for e in toks] == completion["tokens"]
        assert "".join(e["text"] for e in toks) == completion["text"]
    assert done["tokens"] == plain["tokens"] and done["unsteered"]["tokens"] == plain["unsteered"]["tokens"]
    assert done["tokens"] != done["unsteered"]["tokens"]


def test_refused_before_the_first_token_gets_its_status(server, oai):
    c, _ = server
    r = c.post("/v1/generate", json={"messages": MSG, "stream": True,
                                     "interventions": [{"op": "ablate", "sae": SAE, "latent": 10**6}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "interventions"]
    r = c.post("/v1/generate", json={"messages": MSG, "stream": True, "interventions": [{"op": "ablate", "sae": "nope", "latent": 1}]})
    assert r.status_code in (404, 422) and "nope" in json.dumps(r.json())
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=MSG)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model=MODEL, messages=MSG, n=2)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model=MODEL, messages=MSG, stream=True,
                                    extra_body={"steering": [{"op": "clamp", "sae": SAE, "latent": -1, "value": 1}]})
    r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": MSG, "steering": [
        {"op": "ablate", "sae": SAE, "latent": 10**6}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steering", 0, "latent"]  # OpenAI's names
    assert c.post("/internal/text", json={"prompt": "hi"}).status_code == 404


def test_openai_penalties_reach_the_generation(oai, server):
    """OpenAI's frequency_penalty and presence_penalty (and vLLM's repetition_penalty) give the
    tokens /v1/generate gives with the same penalties, not the unpenalised ones; out of range, a 422."""
    c, _ = server
    poem = [{"role": "user", "content": "Write a short poem."}]
    pen = {"frequency_penalty": 1.0, "presence_penalty": 0.5, "repetition_penalty": 1.1}
    plain = c.post("/v1/generate", json={"messages": poem, "max_new_tokens": 24}).json()["text"]
    want = c.post("/v1/generate", json={"messages": poem, "max_new_tokens": 24, **pen}).json()["text"]
    got = oai.chat.completions.create(model=MODEL, messages=poem, max_tokens=24, temperature=0,
                                      frequency_penalty=1.0, presence_penalty=0.5, extra_body={"repetition_penalty": 1.1})
    assert got.choices[0].message.content == want != plain
    r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": poem, "frequency_penalty": 2.5})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "frequency_penalty"], r.text


def test_a_poisoned_stream_beside_good_ones(server):
    """A non-finite steer streamed beside good streams: it ends with an error event or a 4xx; the
    good ones get their tokens."""
    c, _ = server
    good = {"messages": MSG, "max_new_tokens": 8, "stream": True}
    bad = {**good, "interventions": [{"op": "add_vector", "sae": SAE, "vector": [1e5] * 576, "strength": 1e5}]}
    expect = c.post("/v1/generate", json={**good, "stream": False}).json()["tokens"]
    with ThreadPoolExecutor(4) as ex:
        rs = list(ex.map(lambda b: c.post("/v1/generate", json=b), [good, bad, good, good]))
    for i in (0, 2, 3):
        assert sse_events(rs[i].text)[-1][1]["response"]["tokens"] == expect
    assert rs[1].status_code == 422 or sse_events(rs[1].text)[-1][0] == "error"


def test_a_disconnect_frees_its_row(server):
    c, runtime = server
    before = metrics(c).get("saesteer_cancelled_requests_total", 0)
    t0 = time.time()
    with c.stream("POST", "/v1/generate", json={"messages": MSG, "max_new_tokens": 1000, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]  # two token events
        assert got[0] == "event: token"
    deadline = time.time() + 60
    while True:
        st = metrics(c)
        if st.get("saesteer_cancelled_requests_total", 0) == before + 1 and st["saesteer_batch_rows"] == 0:
            break
        assert time.time() < deadline, st
        time.sleep(0.2)
    assert time.time() - t0 < 60  # 1000 tokens would take minutes: the row left early


def test_metrics_count_streamed_tokens_and_time_to_first_token(server):
    c, _ = server
    r = c.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 5, "stream": True, "ignore_eos": True})
    assert [k for k, _ in sse_events(r.text)].count("token") == 5
    values = metrics(c)
    assert values['saesteer_time_to_first_token_seconds_count{route="/v1/generate"}'] >= 1
    assert values['saesteer_time_to_first_token_seconds_count{route="/v1/chat/completions"}'] >= 1
    assert values["saesteer_engine_tokens_total"] >= 5  # counted in the worker's process
    assert values["saesteer_batch_rows"] == 0 and values["saesteer_queued_requests"] == 0  # nothing generating now


def test_a_dead_streaming_worker_ends_its_streams_with_503_and_comes_back(server):
    """Last in this module: SIGKILL the continuous-batching worker mid-stream."""
    import os
    import signal

    c, runtime = server
    pid = text_worker_pid(runtime)
    with c.stream("POST", "/v1/generate", json={"messages": MSG, "max_new_tokens": 1000, "ignore_eos": True,
                                                "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines) == "event: token"
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        rest = list(lines)
    assert time.time() - killed < 15
    events = [line for line in rest if line.startswith("event: ")]
    assert events[-1] == "event: error" and '"status":503' in rest[-2] + rest[-1] + "".join(rest[-3:])
    deadline = time.time() + 240  # LitServe restarts the worker, which loads the model again
    while True:
        r = c.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 3, "stream": True})
        if r.status_code == 200 and sse_events(r.text)[-1][0] == "done":
            break
        assert time.time() < deadline, (r.status_code, r.text[:300])
        time.sleep(2)
    assert text_worker_pid(runtime) not in (None, pid)
    assert metrics(c)["saesteer_engine_tokens_total"] >= 5  # the dead worker's count stays counted
