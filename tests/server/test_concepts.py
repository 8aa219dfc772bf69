"""Named concepts over HTTP with the real SmolLM2 and the default SAE: saved, listed, applied by
name (the same tokens as the edits they stand for), refused with the field named, and still there
after a restart."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from saesteer_client.schema import SUGGESTED_REPETITION_PENALTY

from saesteer.server.config import PYTHON_SAE_NAME, ServerSettings

from serving import serve

pytestmark = pytest.mark.slow  # LitServe workers with the real model

SAE = PYTHON_SAE_NAME
MSG = [{"role": "user", "content": "Describe a place you like."}]
EDITS = [{"op": "clamp", "sae": SAE, "latent": 3656, "value": 4.0, "unit": "typical"},
         {"op": "add", "sae": SAE, "latent": 123, "value": 10.0}]


def serve_concepts(folder):
    return serve(ServerSettings(concepts_dir=str(folder), features=False))


def tokens(c, interventions) -> list[int]:
    r = c.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 10, "interventions": interventions})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_concepts_are_saved_applied_by_name_refused_and_survive_a_restart(tmp_path):
    folder = tmp_path / "concepts"
    with serve_concepts(folder) as c:
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

        # refused, with the field named, beside good requests that are not touched
        good = {"messages": MSG, "max_new_tokens": 10, "interventions": [{"op": "concept", "concept": "place"}]}
        bad = {"messages": MSG, "interventions": [{"op": "concept", "concept": "nope"}]}
        with ThreadPoolExecutor(3) as ex:
            got = list(ex.map(lambda b: c.post("/v1/generate", json=b), [good, bad, good]))
        r = got[1]
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "interventions", 0, "concept"]
        assert got[0].json()["tokens"] == got[2].json()["tokens"] == tokens(c, EDITS)
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
    with serve_concepts(folder) as c:  # a new server on the same folder
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
    settings = ServerSettings(features=True)
    with serve(settings) as c:
        body = {"positive": ["The waves crashed on the sandy beach.", "We sailed across the open sea.",
                             "Whales swim in the deep ocean."], "words": ["ocean", "sea"], "top_k": 5}
        r = c.post("/v1/concepts/search", json=body)
        assert r.status_code == 200, r.text
        assert 0 < int(r.headers["x-saesteer-cost"]) <= settings.max_search_tokens  # what the rate limit charges
        hits = r.json()["latents"]
        assert len(hits) == 5 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        attached = {s["id"] for s in c.get("/v1/saes").json()["saes"]}
        assert len(attached) == 2  # the default: the general-English SAE and the Python-documentation one
        assert all(h["sae"] in attached and h["input_score"] is not None and len(h["top_tokens"]) == 10 for h in hits)
        suggested = hits[0]["suggested"]
        assert suggested["op"] == "clamp" and suggested["unit"] == "typical"
        steered = tokens(c, [suggested])
        assert steered != tokens(c, [])  # the suggestion is accepted as is and changes the answer
        r_alone = r.json()
        mixes = r.json()["mixes"]  # a latent mix per attached SAE, 128 add edits each
        assert sorted(m["sae"] for m in mixes) == sorted(attached)
        assert all(len(m["suggested"]) == 128 and {e["op"] for e in m["suggested"]} == {"add"} and m["strength"] == 0.5
                   and 0 < m["mean_diff_cos"] <= 1 for m in mixes)
        # the default mix adds the concept's latents only, on the prompt's tokens, weights fitted to the output
        assert all(e["value"] > 0 and e["positions"] == "prompt" for m in mixes for e in m["suggested"])
        assert all(m["fit_steps"] == 10 and m["fit_nll_end"] < m["fit_nll_start"] for m in mixes), mixes
        assert all(m["repetition_penalty"] == SUGGESTED_REPETITION_PENALTY for m in mixes)  # the decoding to send with it
        general = next(m for m in mixes if m["sae"] != SAE)["suggested"]
        plain = c.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 40})
        # the mix as sent, beside a request poisoned with a latent out of range: only that one fails
        # and the mix with the decoding it suggests
        def send(iv, penalty=1.0):
            return c.post("/v1/generate", json={"messages": MSG, "max_new_tokens": 40, "interventions": iv,
                                                "repetition_penalty": penalty})

        with ThreadPoolExecutor(4) as ex:
            rs = list(ex.map(send, [general, general[:-1] + [{**general[-1], "latent": 10**6}], [], general],
                             [1.0, 1.0, 1.0, SUGGESTED_REPETITION_PENALTY]))
        assert rs[1].status_code == 422 and rs[1].json()["detail"][0]["loc"][:3] == ["body", "interventions", 127], rs[1].text
        assert rs[2].status_code == 200 and rs[2].json()["text"] == plain.json()["text"]
        assert rs[0].status_code == 200, rs[0].text
        ocean = ("sea", "ocean", "wave", "beach", "water")
        text = rs[0].json()["text"].lower()
        assert any(w in text for w in ocean), text  # the concept comes in
        assert not any(w in plain.json()["text"].lower() for w in ("sea", "ocean", "wave", "beach"))
        assert rs[3].status_code == 200, rs[3].text
        penalised = rs[3].json()["text"].lower()
        assert any(w in penalised for w in ocean), penalised
        words = penalised.split()
        assert len(set(zip(words, words[1:]))) == len(words) - 1, penalised  # no word pair said twice
        r = c.post("/v1/concepts/search", json={**body, "mix_latents": 257})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "mix_latents"]
        # bad mix fields sent beside a good search: each gets its 422, the good one what it got alone
        unfitted = {**body, "mix_fit_steps": 0}
        alone = c.post("/v1/concepts/search", json=unfitted).json()
        assert alone["latents"] == r_alone["latents"]
        assert all(m["fit_steps"] == 0 and m["fit_nll_start"] is None for m in alone["mixes"])
        bad = [("mix_signs", "negative"), ("mix_positions", "middle"), ("mix_fit_steps", 51), ("mix_fit_steps", -1)]
        with ThreadPoolExecutor(5) as ex:
            rs = list(ex.map(lambda b: c.post("/v1/concepts/search", json=b), [{**unfitted, f: v} for f, v in bad] + [unfitted]))
        for (field, _), r in zip(bad, rs):
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], r.text
        assert rs[-1].status_code == 200 and rs[-1].json() == alone
        both = c.post("/v1/concepts/search", json={**unfitted, "mix_signs": "both", "mix_latents": 16,
                                                   "mix_positions": "all"}).json()["mixes"]
        assert all(len(m["suggested"]) == 16 for m in both) and any(e["value"] < 0 for m in both for e in m["suggested"])
        assert all(e["positions"] == "all" for m in both for e in m["suggested"])
        r = c.post("/v1/concepts/search", json={**body, "sae": "nope"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sae"]
        r = c.post("/v1/concepts/search", json={"positive": [], "words": []})
        assert r.status_code == 422
