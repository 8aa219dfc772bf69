"""A bad policies file stops the server from starting, naming the field (the server object is
built, no worker starts)."""

from __future__ import annotations

import argparse
import json

import pytest

from saesteer.server.config import ServerSettings
from saesteer.steering.policy import PolicyError


@pytest.mark.parametrize("policies, msg", [
    ({"policies": [{"name": "x", "detector": {"kind": "concept", "concept": "unknown"}, "threshold": 1, "action": "refuse"}]},
     "policies.0.detector.concept: unknown concept"),
    ({"policies": [{"name": "x", "detector": {"kind": "concept", "sae": "gone", "latents": [3]}, "threshold": 1,
                    "action": "refuse"}]}, "policies.0.detector.sae: unknown SAE 'gone'"),
    ({"policies": [{"name": "x", "threshold": 1, "action": "refuse"}]}, "policies.0.detector: Field required"),
])
def test_a_bad_policies_file_stops_the_server_from_starting(tmp_path, capsys, policies, msg):
    from saesteer.server.app import build_server, serve_cli
    from saesteer.server.config import add_serve_args

    path = tmp_path / "p.json"
    path.write_text(json.dumps(policies))
    with pytest.raises(PolicyError, match=msg.split(": ", 1)[1]):
        build_server(ServerSettings(policies=str(path)))
    ap = argparse.ArgumentParser()
    add_serve_args(ap)
    assert serve_cli(ap.parse_args(["--policies", str(path)])) == 2
    assert msg in capsys.readouterr().err


def test_audit_lines_carry_no_text_unless_configured(caplog):
    from types import SimpleNamespace

    from saesteer.server.api import audit

    hit = {"policy": "pii", "action": "refuse", "hits": 2, "max_score": 0.97,
           "tokens": [{"position": "generated", "index": 4, "score": 0.97}]}
    res = SimpleNamespace(safety=[hit], finish_reason="content_filter", text="call me at")
    with caplog.at_level("WARNING", logger="saesteer.audit"):
        audit("abc123", [res, None])
        audit("abc123", [res], with_text=True)
    plain, with_text = (json.loads(r.getMessage()) for r in caplog.records)
    assert plain == {"event": "policy_hit", "request": "abc123", "role": "steered", "policy": "pii", "action": "refuse",
                     "hits": 2, "max_score": 0.97, "finish_reason": "content_filter", "tokens": [["generated", 4]]}
    assert with_text["text"] == "call me at"


def test_policies_check_cli(tmp_path, capsys):
    from pathlib import Path

    import saesteer.steering as steering_pkg
    from saesteer.cli import main

    shipped = Path(steering_pkg.__file__).parent / "policies" / "pii.json"
    assert main(["policies", "check", "--file", str(shipped)]) == 0
    assert capsys.readouterr().out.startswith("pii\trefuse\traw_probe at blocks.10.hook_resid_post")
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"policies": [{"name": "x", "detector": {"kind": "concept", "concept": "nope"},
                                             "threshold": 1, "action": "flag"}]}))
    assert main(["policies", "check", "--file", str(bad)]) == 1
    assert "policies.0.detector.concept: unknown concept 'nope'" in capsys.readouterr().err
