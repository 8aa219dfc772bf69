"""Named concepts over HTTP with the real SmolLM2 and the default SAE: saved, listed, applied by
name (the same tokens as the edits they stand for), refused with the field named, and still there
after a restart."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from litserve.utils import wrap_litserve_start

from saesteer.server.app import build_server
from saesteer.server.config import DEFAULT_SAE_NAME, ServerSettings

pytestmark = pytest.mark.slow  # LitServe workers with the real model

SAE = DEFAULT_SAE_NAME
MSG = [{"role": "user", "content": "Describe a place you like."}]
EDITS = [{"op": "clamp", "sae": SAE, "latent": 3656, "value": 4.0, "unit": "typical"},
         {"op": "add", "sae": SAE, "latent": 123, "value": 10.0}]


@contextmanager
def serve(folder):
    settings = ServerSettings(concepts_dir=str(folder), features=False, streaming=False, max_batch_size=4,
                              batch_timeout=0.05)
    with wrap_litserve_start(build_server(settings)) as s, TestClient(s.app) as c:
        deadline = time.time() + 300
        while c.get("/health").status_code != 200:
            assert time.time() < deadline, "the inference worker did not come up"
            time.sleep(0.5)
        yield c


def tokens(c, interventions) -> list[int]:
    r = c.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 10, "interventions": interventions})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_concepts_are_saved_applied_by_name_refused_and_survive_a_restart(tmp_path):
    folder = tmp_path / "concepts"
    with serve(folder) as c:
        r = c.post("/v1/concepts", json={"name": "place", "description": "places", "interventions": EDITS})
        assert r.status_code == 201, r.text
        assert c.post("/v1/concepts", json={"name": "place", "interventions": EDITS}).status_code == 200  # replaced
        assert [x["name"] for x in c.get("/v1/concepts").json()["concepts"]] == ["place"]
        assert c.get("/v1/concepts/place").json()["interventions"][0]["latent"] == 3656

        # applied by name: the tokens of the edits it stands for, strength scaling clamp and add values
        assert tokens(c, [{"op": "concept", "concept": "place"}]) == tokens(c, EDITS)
        doubled = [{**EDITS[0], "value": 8.0}, {**EDITS[1], "value": 20.0}]
        assert tokens(c, [{"op": "concept", "concept": "place", "strength": 2.0}]) == tokens(c, doubled)
        assert tokens(c, [{"op": "concept", "concept": "place"}]) != tokens(c, [])

        # refused, with the field named
        r = c.post("/v1/generate", json={"messages": MSG, "interventions": [{"op": "concept", "concept": "nope"}]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "interventions", 0, "concept"]
        r = c.post("/v1/concepts", json={"name": "bad", "interventions": [{"op": "ablate", "sae": SAE, "latent": 10**6}]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "interventions", 0, "latent"]
        r = c.post("/v1/concepts", json={"name": "bad", "interventions": [{"op": "ablate", "sae": "nope", "latent": 1}]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "interventions", 0, "sae"]
        r = c.post("/v1/concepts", json={"name": "Bad Name", "interventions": EDITS})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "name"]
        r = c.post("/v1/concepts", json={"name": "empty", "interventions": []})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "interventions"]
        assert c.get("/v1/concepts/nope").status_code == 404
        assert c.get("/v1/concepts/..%2F..%2Fetc").status_code in (404, 422)
        c.post("/v1/concepts", json={"name": "gone", "interventions": EDITS[:1]})
        assert c.delete("/v1/concepts/gone").status_code == 204 and c.get("/v1/concepts/gone").status_code == 404
    with serve(folder) as c:  # a new server on the same folder
        assert [x["name"] for x in c.get("/v1/concepts").json()["concepts"]] == ["place"]
        assert tokens(c, [{"op": "concept", "concept": "place"}]) == tokens(c, EDITS)


def test_a_server_without_a_concepts_folder_says_so(tmp_path):
    from saesteer.server.concepts import ConceptStore

    store = ConceptStore(None)
    assert store.get("x") is None and store.list() == [] and not store.delete("x")
    with pytest.raises(RuntimeError):
        from saesteer_client.schema import Concept

        store.save(Concept(name="x", interventions=EDITS))


def test_concept_search_over_http_suggests_a_working_clamp(tmp_path):
    settings = ServerSettings(features=True, streaming=False, max_batch_size=4, batch_timeout=0.05)
    with wrap_litserve_start(build_server(settings)) as s, TestClient(s.app) as c:
        deadline = time.time() + 300
        while c.get("/health").status_code != 200:
            assert time.time() < deadline, "the inference workers did not come up"
            time.sleep(0.5)
        body = {"positive": ["The waves crashed on the sandy beach.", "We sailed across the open sea.",
                             "Whales swim in the deep ocean."], "words": ["ocean", "sea"], "top_k": 5}
        r = c.post("/v1/concepts/search", json=body)
        assert r.status_code == 200, r.text
        hits = r.json()["latents"]
        assert len(hits) == 5 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert all(h["sae"] == SAE and h["input_score"] is not None and len(h["top_tokens"]) == 10 for h in hits)
        suggested = hits[0]["suggested"]
        assert suggested["op"] == "clamp" and suggested["unit"] == "typical"
        steered = tokens(c, [suggested])
        assert steered != tokens(c, [])  # the suggestion is accepted as is and changes the answer
        r = c.post("/v1/concepts/search", json={**body, "sae": "nope"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sae"]
        r = c.post("/v1/concepts/search", json={"positive": [], "words": []})
        assert r.status_code == 422
