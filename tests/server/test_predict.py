"""GenerateAPI.predict on its own, in this process: an exception ends only its row."""

from __future__ import annotations

import pytest
from saesteer_client.schema import GenerateRequest

from saesteer.server.api import GenerateAPI, Prepared, Rejected
from saesteer.server.config import PYTHON_SAE_NAME, ServerSettings
from saesteer.sae.sources import parse_sae_spec
from saesteer.steering.pool import SAEPool
from saesteer.steering.plan import InterventionPlan, LatentEdit

SAE = PYTHON_SAE_NAME
pytestmark = pytest.mark.slow  # loads a second copy of the model in a GenerateAPI


@pytest.fixture(scope="module")
def api():
    settings = ServerSettings()
    a = GenerateAPI(settings, SAEPool([parse_sae_spec(s) for s in settings.saes]))
    a.setup("cpu")
    return a


def req(text, **kw):
    return GenerateRequest(messages=[{"role": "user", "content": text}], max_new_tokens=5, **kw)


def test_an_exception_in_generation_fails_only_its_row(api):
    good = [api.decode_request(req("Tell me something interesting.")),
            api.decode_request(req("Describe a place you like.", interventions=[
                {"op": "clamp", "sae": SAE, "latent": 3656, "value": 12.0}], compare=True))]
    assert all(isinstance(g, Prepared) for g in good)
    # a plan that slipped past validation: the hook's index lookup raises inside the batch
    broken = Prepared(req("Say hi."), good[0].input_ids,
                      InterventionPlan(latent_edits=[LatentEdit(SAE, 10**6, "clamp", 1.0, "all")]))
    refused = api.decode_request(req("x", interventions=[{"op": "clamp", "sae": "nope", "latent": 1, "value": 1.0}]))
    assert isinstance(refused, Rejected) and refused.status == 422
    out = api.predict([good[0], broken, refused, good[1]])
    assert isinstance(out[1], Rejected) and out[1].status == 500 and "generation failed" in out[1].detail[0].msg
    assert out[2] is refused
    alone = [api.predict([g])[0] for g in good]
    assert out[0]["steered"].tokens == alone[0]["steered"].tokens and len(alone[0]["steered"].tokens) == 5
    assert out[3]["steered"].tokens == alone[1]["steered"].tokens
    assert out[3]["unsteered"].tokens == alone[1]["unsteered"].tokens
    # the unbatched loop (max_batch_size=1) gets the same treatment
    single = api.predict(broken)
    assert isinstance(single, Rejected) and single.status == 500
