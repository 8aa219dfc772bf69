"""POST /v1/images over HTTP, in process, on a tiny random ShapesPipeline with a tiny SAE on its
text encoder's layer 9: PNGs of the requested size, idle steering exact, bad input 422."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("diffusers")

from PIL import Image

from saesteer.sae.io import save_sae
from saesteer.server.config import ServerSettings

from tests.server.serving import error_detail, serve

from .test_groundwork import tiny_pipeline_folder, tiny_sae

pytestmark = pytest.mark.slow  # a LitServe worker


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    pipe = tiny_pipeline_folder(root / "pipe")
    save_sae(tiny_sae(), root / "te9")
    with serve(ServerSettings(model=str(pipe), saes=[f"te9={root / 'te9'}"], features=False, max_image_passes=50)) as c:
        yield c


def pixels(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_png"]))))


def test_images_of_the_requested_size_and_idle_steering_is_exact(client):
    base = {"prompt": "a small red circle on a white background", "steps": 3, "seed": 7}
    r = client.post("/v1/images", json={**base, "width": 24, "height": 16, "n": 2})
    assert r.status_code == 200, r.text
    imgs = [pixels(i) for i in r.json()["images"]]
    assert len(imgs) == 2 and imgs[0].shape == (16, 24, 3)
    assert r.headers["x-saesteer-cost"] == "9"  # 2 images x 3 steps x 1.5 times the native area
    plain = pixels(client.post("/v1/images", json=base).json()["images"][0])
    assert plain.shape == (16, 16, 3)  # the model's default size
    idle = client.post("/v1/images", json={**base, "interventions": [{"op": "scale", "sae": "te9", "latent": 3, "value": 1.0}]})
    assert np.array_equal(pixels(idle.json()["images"][0]), plain)
    steer = {**base, "compare": True, "interventions": [{"op": "clamp", "sae": "te9", "latent": 3, "value": 40.0}]}
    got = client.post("/v1/images", json=steer).json()
    assert np.array_equal(pixels(got["unsteered"][0]), plain)
    assert not np.array_equal(pixels(got["images"][0]), plain)
    one = client.post("/v1/images", json={**steer, "branches": "cond", "compare": False}).json()
    assert not np.array_equal(pixels(one["images"][0]), pixels(got["images"][0]))  # uncond untouched differs


@pytest.mark.parametrize("body,field,reason", [
    ({"prompt": "x", "width": 20}, '"width"', "multiple of 8"),
    ({"prompt": "x", "height": 40}, '"height"', "limit of 32 pixels"),  # twice the tiny model's 16
    ({"prompt": "x", "steps": 0}, '"steps"', "greater than or equal"),
    ({"prompt": "x", "steps": 101}, '"steps"', "less than or equal"),
    ({"prompt": "x", "n": 9}, '"n"', "less than or equal"),
    ({"prompt": "x", "n": 8, "steps": 10}, '"n"', "80 denoiser passes"),  # over max_image_passes (50)
    ({"prompt": "x", "steps": 30, "compare": True}, '"steps"', "limit is 50 (max_image_passes)"),
    ({"prompt": "x", "interventions": [{"op": "clamp", "sae": "smollm2-135m-res10-k32", "latent": 1, "value": 1}]}, '"sae"', "unknown SAE"),
    ({"prompt": "x", "interventions": [{"op": "clamp", "sae": "te9", "latent": 64, "value": 1}]}, '"latent"', "out of range"),
    ({"prompt": "x", "interventions": [{"op": "add_vector", "sae": "te9", "vector": [1.0] * 576}]}, '"vector"', "d_in 32"),
])
def test_bad_image_requests_are_a_422_naming_the_field(client, body, field, reason):
    status, detail = error_detail(client.post("/v1/images", json=body))
    assert status == 422
    assert field in detail and reason in detail, detail


def test_concept_search_on_an_image_server_contrasts_prompts(client):
    body = {"positive": ["a small red circle on a white background", "a large red star on a black background"],
            "negative": ["a small blue circle on a white background", "a large blue star on a black background"], "top_k": 3}
    r = client.post("/v1/concepts/search", json=body)
    assert r.status_code == 200, r.text
    hits = r.json()["latents"]
    assert 1 <= len(hits) <= 3 and all(h["sae"] == "te9" and 0 <= h["latent"] < 64 for h in hits)
    assert all((h["suggested"]["op"], h["suggested"]["latent"], h["suggested"]["value"]) == ("scale", h["latent"], -1.0)
               for h in hits)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("body,field,reason", [
    ({"positive": ["a red circle"]}, '"negative"', "no neutral default"),
    ({"words": ["red"], "negative": ["a blue circle"]}, '"positive"', "contrasting prompts"),
    ({"positive": ["a red circle"], "negative": ["a blue circle"], "sae": "nope"}, '"sae"', "unknown SAE"),
])
def test_bad_image_concept_searches_are_a_422_naming_the_field(client, body, field, reason):
    status, detail = error_detail(client.post("/v1/concepts/search", json=body))
    assert status == 422
    assert field in detail and reason in detail, detail


def test_refused_image_requests_beside_good_ones_leave_them_unchanged(client):
    """An oversized image and a search without negatives, sent concurrently with good requests:
    each bad one gets its 422, the good ones the same pixels as when sent alone."""
    from concurrent.futures import ThreadPoolExecutor

    good = {"prompt": "a small red circle on a white background", "steps": 3, "seed": 11}
    alone = pixels(client.post("/v1/images", json=good).json()["images"][0])
    calls = [("/v1/images", good), ("/v1/images", {**good, "width": 40}),
             ("/v1/concepts/search", {"positive": ["a red circle"]}), ("/v1/images", good)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda c: client.post(c[0], json=c[1]), calls))
    assert answers[1].status_code == 422 and '"width"' in answers[1].text and "limit of 32" in answers[1].text
    assert answers[2].status_code == 422 and '"negative"' in answers[2].text
    for a in (answers[0], answers[3]):
        assert a.status_code == 200 and np.array_equal(pixels(a.json()["images"][0]), alone)


def test_images_past_the_deadline_are_a_504_and_the_worker_goes_on(tmp_path):
    """With an image_timeout shorter than one denoising step, an image request stops after its
    first step with a 504 naming the setting; the same worker then answers a concept search."""
    pipe = tiny_pipeline_folder(tmp_path / "pipe")
    save_sae(tiny_sae(), tmp_path / "te9")
    with serve(ServerSettings(model=str(pipe), saes=[f"te9={tmp_path / 'te9'}"], features=False, image_timeout=1e-6)) as c:
        r = c.post("/v1/images", json={"prompt": "a red circle", "steps": 50})
        assert r.status_code == 504 and r.json()["detail"][0]["type"] == "image_timeout", r.text
        assert r.headers["x-saesteer-cost"] == "50"  # the work admitted is charged
        r = c.post("/v1/concepts/search", json={"positive": ["a red circle"], "negative": ["a blue circle"], "top_k": 2})
        assert r.status_code == 200, r.text
