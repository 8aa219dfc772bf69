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
