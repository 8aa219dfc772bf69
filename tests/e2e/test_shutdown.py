"""SIGTERM to a real ``saesteer serve``: in-flight requests finish, new ones get 503, every
process stops and the port is free within 30 s (issue 12)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from saesteer.server.runtime import descendants, read_workers

from tests.server.serving import serve_process

pytestmark = pytest.mark.slow  # a real server with the real model

MSG = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def start_server(tmp_path, **env_extra):
    runtime = tmp_path / "runtime"
    env = {"SAESTEER_RUNTIME_DIR": str(runtime), "SAESTEER_MAX_BATCH_SIZE": "4", **env_extra}
    proc, url, port = serve_process(tmp_path / "server.log", tmp_path, env=env)
    return proc, url, port, runtime


def kill_worker_mid_request(url, runtime):
    """SIGKILL the worker holding a long request: the request ends with 503 well within 60 s
    (LitServe alone leaves it waiting), and the restarted worker serves again."""
    result = {}

    def long_request():
        result["r"] = httpx.post(url + "/v1/generate", json={"messages": MSG, "max_new_tokens": 1000, "ignore_eos": True}, timeout=120)

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 60
    busy = None
    while busy is None:
        assert time.time() < deadline, "the request never reached the worker"
        busy = next((w for w in read_workers(str(runtime)) if w["alive"] and w["state"] == "busy"), None)
        time.sleep(0.05)
    os.kill(busy["pid"], signal.SIGKILL)
    killed = time.time()
    t.join(90)
    ended = time.time() - killed
    assert result["r"].status_code == 503 and "died" in result["r"].text, result["r"].text
    assert ended < 60, ended
    deadline = time.time() + 240
    while True:  # LitServe's monitor restarts the worker, which loads the model again
        r = httpx.post(url + "/v1/generate", json={"messages": MSG, "max_new_tokens": 2}, timeout=120)
        if r.status_code == 200:
            return ended
        assert time.time() < deadline, (r.status_code, r.text)
        time.sleep(2)


def test_worker_death_then_sigterm(tmp_path):
    """One real server: a killed worker's request ends with 503 and the server recovers; then
    SIGTERM drains the request in flight, refuses new ones and stops every process."""
    proc, url, port, runtime = start_server(tmp_path, SAESTEER_DRAIN_TIMEOUT="60")
    try:
        ended = kill_worker_mid_request(url, runtime)
        print(f"request of the killed worker ended {ended:.1f} s after the kill")
        result = {}

        def long_request():
            # long enough to be in flight when the refused request arrives (~4 s at 40 tokens/s)
            result["r"] = httpx.post(url + "/v1/generate", json={"messages": MSG, "max_new_tokens": 160, "ignore_eos": True},
                                     timeout=120)

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.time() + 60
        while not any(w["alive"] and w["state"] == "busy" for w in read_workers(str(runtime))):
            assert time.time() < deadline, "the request never reached the worker"
            time.sleep(0.05)
        procs = descendants(proc.pid)
        assert len(procs) >= 2  # the HTTP process and the inference worker at least
        t_term = time.time()
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        refused = httpx.post(url + "/v1/generate", json={"messages": MSG, "max_new_tokens": 2}, timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
        t.join(120)
        assert result["r"].status_code == 200, result["r"].text  # the in-flight request finished
        assert len(result["r"].json()["tokens"]) == 160
        proc.wait(timeout=30)
        took = time.time() - t_term
        assert took < 30, took
        gone_by = time.time() + 5
        while any(alive(p) for p in procs) and time.time() < gone_by:
            time.sleep(0.2)
        assert not [p for p in procs if alive(p)], "processes left behind"
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # the port is free
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
