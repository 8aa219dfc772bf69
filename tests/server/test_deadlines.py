"""Deadlines and admission, in-process with real workers: a generation time limit, a bounded
queue, and a request whose worker is killed mid-generation (issue 12)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from saesteer.server.config import ServerSettings
from saesteer.server.runtime import read_workers

from serving import serve

pytestmark = pytest.mark.slow  # a real server with the real model

MSG = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    settings = ServerSettings(generation_timeout=8.0, max_queue=3,
                              runtime_dir=str(tmp_path_factory.mktemp("runtime")))
    with serve(settings, monitor=True) as c:  # the monitor restarts dead workers
        yield c, settings


def test_generation_time_limit_ends_the_request_with_504(served):
    c, _ = served
    t0 = time.time()
    r = c.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 1000, "ignore_eos": True})
    took = time.time() - t0
    assert r.status_code == 504, r.text
    assert r.json()["detail"][0]["type"] == "generation_timeout" and "8 s" in r.json()["detail"][0]["msg"]
    assert took < 8.0 + 30, took  # one decode step past the limit, plus prefill and the queue
    r = c.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 3})
    assert r.status_code == 200, r.text


def test_a_full_queue_answers_503_with_retry_after(served):
    c, settings = served
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda _: c.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 2}), range(8)))
    codes = sorted(r.status_code for r in got)
    assert set(codes) == {200, 503}, codes
    assert codes.count(200) >= settings.max_queue and codes.count(503) >= 1, codes
    full = [r for r in got if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and "queue is full" in r.text for r in full)


def test_a_killed_workers_request_ends_with_503_and_the_server_recovers(served):
    c, settings = served
    with ThreadPoolExecutor(1) as ex:
        t0 = time.time()
        fut = ex.submit(c.post, "/v1/generate", json={"messages": MSG, "max_new_tokens": 1000, "ignore_eos": True})
        busy = None
        while busy is None and time.time() - t0 < 60:
            busy = next((w for w in read_workers(settings.runtime_dir) if w["alive"] and w["state"] == "busy"), None)
            time.sleep(0.05)
        assert busy is not None, "the request never reached a worker"
        os.kill(busy["pid"], signal.SIGKILL)
        killed = time.time()
        r = fut.result(timeout=60)
        ended = time.time() - killed
    assert r.status_code == 503, r.text
    assert "died" in r.json()["detail"] and r.headers["retry-after"] == "5"
    assert ended < 10, ended
    deadline = time.time() + 240  # LitServe's monitor starts a new worker, which loads the model
    while True:
        r = c.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 3})
        if r.status_code == 200:
            break
        assert time.time() < deadline, (r.status_code, r.text)
        time.sleep(2)
