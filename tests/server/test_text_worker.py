"""The text worker's step on its own, in this process: an exception ends only its request, a
refused request only itself, read-outs answer between decode steps, a cancel frees its rows, and a
streamed request's tokens add up to its answer."""

from __future__ import annotations

import pytest
from saesteer_client.schema import DoneEvent, ErrorEvent, FeaturesRequest, FeaturesResponse, GenerateRequest, TokenEvent

from saesteer.server.api import Prepared
from saesteer.server.config import PYTHON_SAE_NAME, ServerSettings
from saesteer.server.text_worker import TextWorker
from saesteer.sae.sources import parse_sae_spec
from saesteer.steering.pool import SAEPool
from saesteer.steering.plan import InterventionPlan, LatentEdit

SAE = PYTHON_SAE_NAME
pytestmark = pytest.mark.slow  # loads a copy of the model in a TextWorker


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    settings = ServerSettings(features=False)
    w = TextWorker(settings, SAEPool([parse_sae_spec(s) for s in settings.saes]), str(tmp_path_factory.mktemp("rt")))
    w.setup("cpu")
    return w


def req(text, **kw):
    return GenerateRequest(messages=[{"role": "user", "content": text}], max_new_tokens=kw.pop("n", 5), **kw)


def run(worker, requests: dict) -> tuple[dict, dict]:
    """Submit ``requests`` ({uid: request}) together and step until the worker is idle: each
    request's last message and the streamed ones' token events."""
    for uid, r in requests.items():
        worker.submit(uid, r)
    finals, tokens = {}, {}
    while worker.busy():
        for uid, data, final in worker.step():
            events = data if isinstance(data, list) else [data]
            tokens.setdefault(uid, []).extend(e for e in events if isinstance(e, TokenEvent))
            if final:
                finals[uid] = events[-1]
    return finals, tokens


def test_an_exception_in_generation_fails_only_its_request(worker, monkeypatch):
    good = {"a": req("Tell me something interesting."),
            "d": req("Describe a place you like.", interventions=[{"op": "clamp", "sae": SAE, "latent": 3656, "value": 12.0}],
                     compare=True)}
    alone = {uid: run(worker, {uid: r})[0][uid] for uid, r in good.items()}
    assert all(isinstance(a, DoneEvent) and len(a.response.tokens) == 5 for a in alone.values())
    prepare = worker.prepare

    def slipped_past(request):  # a plan that slipped past validation: the hook's index lookup raises
        out = prepare(request)
        if request.messages[0].content == "Say hi.":
            return Prepared(request, out.input_ids, InterventionPlan(latent_edits=[LatentEdit(SAE, 10**6, "clamp", 1.0, "all")]))
        return out

    monkeypatch.setattr(worker, "prepare", slipped_past)
    refused = req("x", interventions=[{"op": "clamp", "sae": "nope", "latent": 1, "value": 1.0}])
    got, _ = run(worker, {"a": good["a"], "b": req("Say hi."), "c": refused, "d": good["d"]})
    assert isinstance(got["b"], ErrorEvent) and got["b"].status == 500 and "generation failed" in got["b"].detail[0].msg
    assert isinstance(got["c"], ErrorEvent) and got["c"].status == 422 and got["c"].detail[0].loc[:3] == ["body", "interventions", 0]
    assert got["a"].response.tokens == alone["a"].response.tokens
    assert got["d"].response.tokens == alone["d"].response.tokens
    assert got["d"].response.unsteered.tokens == alone["d"].response.unsteered.tokens
    assert not len(worker.engine)  # the failed rows left the batch


def test_read_outs_answer_between_decode_steps_and_streams_add_up(worker):
    long, short = req("Tell me a story.", n=24, stream=True), req("Hi.", n=3)
    read = FeaturesRequest(prompt="The cat sat on the mat.", sae=SAE, latents=[3656])
    worker.submit("long", long)
    (uid, first, final), = worker.step()  # the long one runs (its first two tokens), then the others join
    assert uid == "long" and not final and len(first) == 2
    got, tokens = run(worker, {"read": read, "short": short})
    assert isinstance(got["read"], FeaturesResponse) and got["read"].tokens[1].token == " cat"
    assert isinstance(got["long"], DoneEvent) and isinstance(got["short"], DoneEvent)
    assert "short" not in tokens or not tokens["short"]  # not streamed: no token events
    streamed = first + tokens["long"]
    assert [t.token for t in streamed] == got["long"].response.tokens
    assert "".join(t.text for t in streamed) == got["long"].response.text


def test_a_cancel_frees_its_rows(worker):
    worker.submit("x", req("Tell me a story.", n=200, compare=True))
    worker.step()
    assert len(worker.engine) == 2
    assert worker.cancel("x") and not len(worker.engine) and not worker.busy()
    assert not worker.cancel("x")
