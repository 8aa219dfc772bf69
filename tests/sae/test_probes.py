"""Linear probes (sae.probes) and the personal-data data and baseline (steering.eval.safety)."""

from __future__ import annotations

import torch

from saesteer.sae.probes import LinearProbe, load_probe, save_probe, select_latents, train_probe
from saesteer.steering.eval.safety import PII_KINDS, pii_examples, prf, regex_token_scores, token_labels


def test_a_probe_finds_a_planted_direction_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 24, generator=g)
    direction = torch.zeros(24)
    direction[5], direction[11] = 2.0, -1.5
    y = (X @ direction + 0.3 * torch.randn(4000, generator=g)) > 1.0
    w, b, mean, std = train_probe(X[:3000], y[:3000])
    probe = LinearProbe("raw", "blocks.1.hook_resid_post", w, b, mean, std)
    held = prf(probe.score(X[3000:]) >= 0.5, y[3000:])
    assert held["f1"] > 0.9
    assert set(w.abs().topk(2).indices.tolist()) == {5, 11}
    # the score is sigmoid of the standardised features' dot product, computed directly in float64
    ref = torch.sigmoid(((X.double() - mean.double()) / std.double()) @ w.double() + float(b))
    assert float((probe.score(X).double() - ref).abs().max()) < 1e-5
    back = load_probe(save_probe(probe, tmp_path / "p.safetensors"))
    assert torch.equal(back.score(X), probe.score(X)) and back.hook_point == probe.hook_point


def test_select_latents_ranks_by_class_mean_difference():
    z = torch.zeros(100, 10)
    y = torch.arange(100) < 50
    z[y, 7], z[y, 2], z[~y, 4] = 3.0, 1.0, 5.0
    assert select_latents(z, y, 2).tolist() == [7, 2]


def test_pii_examples_label_their_spans(lm):
    _, tok = lm
    ex = pii_examples(40, seed=3)
    assert sum(e.positive for e in ex) == 20 and {s[2] for e in ex for s in e.spans} == set(PII_KINDS)
    assert pii_examples(40, seed=3)[7].text == ex[7].text  # seeded
    for e in ex:
        ids, labels = token_labels(tok, e)
        assert len(ids) == len(labels) and bool(labels.any()) == e.positive
        if e.positive:  # the labelled tokens spell the value
            s, t, _ = e.spans[0]
            assert e.text[s:t].replace(" ", "") in tok.decode([i for i, l in zip(ids, labels) if l]).replace(" ", "")
    # the regex baseline finds every email and no near miss
    for e in ex:
        hit = bool(regex_token_scores(tok, e).any())
        if e.spans and e.spans[0][2] == "email":
            assert hit
        if not e.positive:
            assert not hit, e.text
