"""Non-streamed /v1/generate rides the text worker's continuous batch: ready, concurrent requests
each getting their solo answer, refusals with the field named; also with float16 weights."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError

from saesteer.server.config import PYTHON_SAE_NAME, ServerSettings

from serving import serve

pytestmark = pytest.mark.slow  # LitServe workers with the real model

SAE = PYTHON_SAE_NAME


def body(i: int) -> dict:
    steer = [[], [{"op": "clamp", "sae": SAE, "latent": 3656, "value": 6.0, "unit": "typical"}],
             [{"op": "add", "sae": SAE, "latent": 123, "value": 40.0}]][i % 3]
    return {"messages": [{"role": "user", "content": f"Tell me fact {i} about rivers."}], "max_new_tokens": 4 + i % 4,
            "interventions": steer, "compare": i == 4}


def test_non_streamed_generate_rides_the_continuous_batch_with_float16_weights(tmp_path):
    """With float16 weights (``--weights float16``, the fastest batch-1 decode): the same contract
    as the default float32 server's (tests/server/test_api.py sends its poisoned request beside
    good ones on that one). (int8 runs the same ``speed_up`` path; its layers are tested in
    tests/sae.)"""
    settings = ServerSettings(features=False, runtime_dir=str(tmp_path / "rt"), weights="float16")
    # readiness comes from the text worker's status file
    with serve(settings, monitor=True, ready="/ready") as c:
        alone = [c.post("/v1/generate", json=body(i)).json() for i in range(6)]
        bad = {**body(1), "interventions": [{"op": "ablate", "sae": SAE, "latent": 10**6}]}
        with ThreadPoolExecutor(7) as ex:  # the refused request beside the good ones
            got = list(ex.map(lambda b: c.post("/v1/generate", json=b), [body(i) for i in range(3)] + [bad]
                              + [body(i) for i in range(3, 6)]))
        r = got.pop(3)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "interventions", 0, "latent"]
        together = [g.json() for g in got]
        assert [a["tokens"] for a in alone] == [t["tokens"] for t in together]
        assert together[4]["unsteered"] is not None and together[4]["usage"]["completion_tokens"] == len(together[4]["tokens"])


def test_lighter_weights_need_a_packed_float32_cpu_model():
    assert ServerSettings().weights == "float32"
    for bad in ({"pack_linears": False}, {"dtype": "bfloat16"}, {"device": "cuda"}):
        with pytest.raises(ValidationError, match="weights int8 applies to a float32 model on cpu"):
            ServerSettings(weights="int8", **bad)
    with pytest.raises(ValidationError, match="weights"):
        ServerSettings(weights="int4")
