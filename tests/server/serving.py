"""The in-process server the tests of this folder talk to: LitServe's real worker processes and
FastAPI's TestClient (``shared/litserve.md``, section 7)."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

from fastapi.testclient import TestClient
from litserve.utils import wrap_litserve_start

from saesteer.server.app import build_server
from saesteer.server.config import ServerSettings


@contextmanager
def serve(settings: ServerSettings, monitor: bool = False, ready: str = "/health"):
    """A TestClient of the server for ``settings``, once ``ready`` answers 200 (the workers load the
    model in setup). ``monitor``: LitServe's worker monitor runs, restarting dead workers."""
    with wrap_litserve_start(build_server(settings), worker_monitor=monitor) as s, TestClient(s.app) as c:
        deadline = time.time() + 300
        while (r := c.get(ready)).status_code != 200:
            assert time.time() < deadline, f"the inference workers did not come up: {r.text[:300]}"
            time.sleep(0.5)
        yield c


def error_detail(r) -> tuple[int, str]:
    """``(status, the response's detail as JSON text)`` of a refused request, for checking that it names
    the field and the reason; fails unless the status is a 4xx."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    return r.status_code, json.dumps(r.json()["detail"])


def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(log_path, cwd, args: tuple[str, ...] = (), env: dict | None = None, ready: str = "/health",
                  timeout: float = 300):
    """``saesteer serve --port <free port> *args`` as a real process in its own session (stdout and
    stderr to ``log_path``), once ``ready`` answers 200: ``(process, base url, port)``. Fails the test
    with the log's tail if the process exits or does not come up in ``timeout`` seconds (then it is killed)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import httpx
    import pytest

    port = free_port()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "saesteer", "serve", "--port", str(port), *args], stdout=fh,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        try:
            if httpx.get(url + ready, timeout=2).status_code == 200:
                return proc, url, port
        except httpx.HTTPError:
            pass
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"server did not come up:\n{Path(log_path).read_text()[-3000:]}")
