"""``--generate-loop continuous``: non-streamed /v1/generate rides the continuous batch (no static
worker), ready, concurrent requests each getting their solo answer, refusals with the field named."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from litserve.utils import wrap_litserve_start
from pydantic import ValidationError

from saesteer.server.app import build_server
from saesteer.server.config import DEFAULT_SAE_NAME, ServerSettings

pytestmark = pytest.mark.slow  # LitServe workers with the real model

SAE = DEFAULT_SAE_NAME


def body(i: int) -> dict:
    steer = [[], [{"op": "clamp", "sae": SAE, "latent": 3656, "value": 6.0, "unit": "typical"}],
             [{"op": "add", "sae": SAE, "latent": 123, "value": 40.0}]][i % 3]
    return {"messages": [{"role": "user", "content": f"Tell me fact {i} about rivers."}], "max_new_tokens": 4 + i % 4,
            "interventions": steer, "compare": i == 4}


def test_non_streamed_generate_rides_the_continuous_batch(tmp_path):
    settings = ServerSettings(generate_loop="continuous", features=False, runtime_dir=str(tmp_path / "rt"))
    with wrap_litserve_start(build_server(settings), worker_monitor=True) as s, TestClient(s.app) as c:
        deadline = time.time() + 300
        while c.get("/ready").status_code != 200:  # readiness comes from the streaming worker's status file
            assert time.time() < deadline, c.get("/ready").text
            time.sleep(0.5)
        alone = [c.post("/v1/generate", json=body(i)).json() for i in range(6)]
        with ThreadPoolExecutor(6) as ex:
            together = [r.json() for r in ex.map(lambda i: c.post("/v1/generate", json=body(i)), range(6))]
        assert [a["tokens"] for a in alone] == [t["tokens"] for t in together]
        assert together[4]["unsteered"] is not None and together[4]["usage"]["completion_tokens"] == len(together[4]["tokens"])
        r = c.post("/v1/generate", json={**body(1), "interventions": [{"op": "ablate", "sae": SAE, "latent": 10**6}]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "interventions", 0, "latent"]


def test_continuous_needs_streaming():
    with pytest.raises(ValidationError, match="needs streaming"):
        ServerSettings(generate_loop="continuous", streaming=False)
