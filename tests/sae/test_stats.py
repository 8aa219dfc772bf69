"""Latent statistics on the real SmolLM2 and the default SAE: checked against a direct computation."""

from __future__ import annotations

import re

import pytest
import torch

from saesteer.sae.activations import hook_activations, sink_mask, token_windows
from saesteer.sae.evaluate import compute_latent_stats
from saesteer.sae.stats import latent_record, load_latent_stats, save_latent_stats, search_latents
from saesteer.server.config import python_sae_spec

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Rain fell over the harbour all night, and the boats rocked at their moorings.",
    "In 1969 the first humans walked on the Moon, watched by millions on television.",
] * 4


def test_stats_match_direct_computation(lm, python_sae, tmp_path):
    model, tok = lm
    stats = compute_latent_stats(model, tok, python_sae, TEXTS, n_tokens=10_000, context_size=32, batch_size=4,
                                 top_contexts=3, progress=False)
    windows = list(token_windows(TEXTS, tok, 32))
    acts = hook_activations(model, python_sae.cfg.hook_point, torch.tensor(windows))
    x = acts[sink_mask(acts)].float()
    z = python_sae.encode(x)
    assert stats.n_tokens == x.shape[0]
    fires = (z > 0).float()
    torch.testing.assert_close(stats.frequency, fires.mean(0))
    mean = (z.sum(0) / fires.sum(0).clamp(min=1)) * (fires.sum(0) > 0)
    torch.testing.assert_close(stats.typical_activation, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.max_activation, z.max(0).values)
    assert abs(stats.resid_norm_mean - float(x.norm(dim=-1).mean())) < 1e-3 * stats.resid_norm_mean
    # each latent's best context is its maximum, and it marks the activating token
    lat = int(stats.max_activation.argmax())
    best = stats.contexts[lat][0]
    assert abs(best["activation"] - float(stats.max_activation[lat])) < 1e-3
    assert f"«{best['token']}»" in best["text"]
    assert all(a["activation"] >= b["activation"] for a, b in zip(stats.contexts[lat], stats.contexts[lat][1:]))
    # the unit of latent strengths
    assert stats.typical(lat) == float(stats.typical_activation[lat])
    never = int((stats.frequency == 0).nonzero()[0]) if bool((stats.frequency == 0).any()) else None
    if never is not None:
        try:
            stats.typical(never)
            raise AssertionError("a latent that never fires has no typical activation")
        except ValueError as e:
            assert "never fired" in str(e)

    save_latent_stats(stats, tmp_path)
    back = load_latent_stats(tmp_path, contexts=True)
    torch.testing.assert_close(back.typical_activation, stats.typical_activation)
    assert back.n_tokens == stats.n_tokens and back.resid_norm_mean == stats.resid_norm_mean
    assert back.contexts[lat] == stats.contexts[lat]
    assert load_latent_stats(tmp_path / "nowhere") is None


def test_default_sae_ships_its_statistics(python_sae):
    stats = load_latent_stats(python_sae_spec())
    assert stats is not None and stats.n_tokens >= 50_000
    assert stats.frequency.shape == (python_sae.cfg.d_sae,)
    # BatchTopK at k 32: the mean L0 on held-out text is the sum of the frequencies
    assert 25 < float(stats.frequency.sum()) < 40
    assert stats.meta["hook_point"] == python_sae.cfg.hook_point


def test_search_and_show_latents_by_their_contexts():
    stats = load_latent_stats(python_sae_spec(), contexts=True)
    rec = latent_record(stats, 3656)
    assert rec["typical_activation"] == float(stats.typical_activation[3656]) and len(rec["contexts"]) == 5
    found = search_latents(stats, "func", top=5)
    assert found and all(r["matches"] > 0 for r in found)
    assert [r["matches"] for r in found] == sorted((r["matches"] for r in found), reverse=True)
    assert all(any("func" in c["text"].lower() for c in r["contexts"]) for r in found)
    # word starts only: "cat" must not match inside "deprecated"
    for r in search_latents(stats, "cat", top=20):
        assert any(re.search(r"(?<!\w)cat", c["text"], re.I) for c in r["contexts"])
    for bad in ("", "   "):
        with pytest.raises(ValueError):
            search_latents(stats, bad)
    with pytest.raises(IndexError):
        latent_record(stats, stats.frequency.shape[0])
    with pytest.raises(ValueError, match="no contexts"):
        search_latents(load_latent_stats(python_sae_spec()), "func")


def test_latents_cli_shows_and_searches_without_a_model(capsys, tmp_path):
    import json

    from saesteer.cli import main

    assert main(["latents", python_sae_spec(), "--show", "3656"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown[0]["latent"] == 3656 and len(shown[0]["contexts"]) == 5
    assert main(["latents", python_sae_spec(), "--search", "func", "--top", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["latents", str(tmp_path), "--search", "func"]) == 2  # no statistics there: says so
    assert "saesteer stats" in capsys.readouterr().err


def test_statistics_files_of_the_old_name_still_load(tmp_path):
    """Files written before ``typical_activation`` had its name call it ``mean_activation``."""
    from safetensors.torch import save_file

    from saesteer.sae.stats import STATS_FILE

    typical = torch.tensor([0.0, 1.5, 2.25])
    save_file({"frequency": torch.tensor([0.0, 0.1, 0.2]), "mean_activation": typical, "max_activation": typical * 2},
              str(tmp_path / STATS_FILE), metadata={"n_tokens": "10", "resid_norm_mean": "3.5", "hook_name": "blocks.1.hook_resid_post"})
    stats = load_latent_stats(tmp_path)
    assert torch.equal(stats.typical_activation, typical) and stats.typical(2) == 2.25 and stats.resid_norm_mean == 3.5
