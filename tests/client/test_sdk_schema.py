"""The SDK on its own: no torch, and the schema refuses bad requests before they are sent."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError
from saesteer_client import GenerateRequest, ablate, add, add_vector, clamp, scale
from saesteer_client.schema import LatentIntervention, VectorIntervention


def test_sdk_imports_without_torch():
    code = "import sys, saesteer_client; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_helpers_build_valid_interventions():
    req = GenerateRequest(prompt="hi", interventions=[clamp("s", 1, 2.0), ablate("s", 2), scale("s", 3, 0.5),
                                                       add_vector([0.0, 1.0], 3.0, hook="blocks.1.hook_resid_post")])
    dumped = req.model_dump(mode="json", exclude_none=True)
    assert [i["op"] for i in dumped["interventions"]] == ["clamp", "ablate", "scale", "add_vector"]
    assert GenerateRequest.model_validate(dumped) == req


@pytest.mark.parametrize("kwargs,needle", [
    (dict(prompt="hi", interventions=[clamp("s", 1, 1.0), scale("s", 1, 2.0)]), "both edit latent 1"),
    (dict(prompt="hi", interventions=[{"op": "clamp", "sae": "s", "latent": 1}]), "clamp needs a value"),
    (dict(prompt="hi", interventions=[{"op": "add_vector", "vector": [1.0]}]), "exactly one of hook or sae"),
    (dict(prompt="hi", interventions=[{"op": "clamp", "sae": "s", "latent": 1, "value": float("inf")}]), "finite"),
    (dict(prompt="hi", interventions=[{"op": "clamp", "sae": "s", "latent": 1, "value": 1, "positions": []}]), "positions"),
    (dict(), "exactly one of prompt or messages"),
    (dict(prompt="hi", stop=["a"] * 9), "stop"),
])
def test_schema_refuses(kwargs, needle):
    with pytest.raises(ValidationError) as e:
        GenerateRequest(**kwargs)
    assert needle in str(e.value)


def test_strength_units():
    assert clamp("s", 1, 4.0, unit="typical").unit == "typical"
    assert add("s", 1, 2.0, unit="typical").model_dump()["unit"] == "typical"
    assert add_vector([0.0, 1.0], 0.5, sae="s", unit="resid_norm").unit == "resid_norm"
    assert clamp("s", 1, 4.0).unit == "raw"  # the default: old requests mean what they meant
    with pytest.raises(ValidationError, match="applies to clamp and add"):
        LatentIntervention(op="scale", sae="s", latent=1, value=2.0, unit="typical")
    with pytest.raises(ValidationError, match="zero vector"):
        VectorIntervention(op="add_vector", vector=[0.0, 0.0], sae="s", unit="resid_norm")
    with pytest.raises(ValidationError):
        LatentIntervention(op="clamp", sae="s", latent=1, value=2.0, unit="sigma")


@pytest.mark.slow
def test_serve_refuses_a_missing_sae_before_loading_the_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "saesteer", "serve", "--sae", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "no such folder" in r.stderr
