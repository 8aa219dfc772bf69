"""The shipped general-English SAEs (issue 15), block 10 and block 18, on the real SmolLM2: they load
with their statistics and output scores, reconstruct held-out text near their model cards' figures,
and spliced in they keep most of the model's next-token loss.

The text is ``shared/corpus``'s validation split (part of neither SAE's training windows), on a
few thousand tokens, so the bounds sit above the cards' figures (NMSE 0.10-0.104, delta LM
0.029-0.046 nats on 60-120 K tokens) by a margin for the sample, and far below what a broken SAE gives
(a wrong hook point, scale or dtype: NMSE >= 0.5, delta LM > 1 nat).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saesteer.sae.activations import collect_activations, iter_texts
from saesteer.sae.evaluate import ce_loss_metrics, reconstruction_metrics
from saesteer.sae.io import load_sae
from saesteer.sae.output_scores import load_latent_output
from saesteer.sae.stats import load_latent_stats
from saesteer.server.config import pretrained_sae_spec

SHARED_CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"
GENERAL = {"smollm2-135m-general-res10-k96": "blocks.10.hook_resid_post",
           "smollm2-135m-general-res18-k128": "blocks.18.hook_resid_post"}


@pytest.mark.skipif(not SHARED_CORPUS.is_dir(), reason="needs ../shared/corpus beside the project")
@pytest.mark.parametrize("name", list(GENERAL))
def test_shipped_general_sae_reconstructs_held_out_text(lm, name):
    model, tok = lm
    folder = pretrained_sae_spec(name)
    sae = load_sae(folder, dtype=torch.float32)
    assert sae.cfg.hook_point == GENERAL[name] and sae.cfg.d_in == 576
    stats, output = load_latent_stats(folder), load_latent_output(folder)  # what concept search reads
    assert stats is not None and output is not None and stats.frequency.shape == (sae.cfg.d_sae,)
    card = json.loads((Path(folder) / "figures.json").read_text())
    assert card["nmse"] <= 0.15 and card["ce_loss_recovered"] >= 0.99 and card["delta_lm_loss"] <= 0.05

    acts = collect_activations(model, tok, sae.cfg.hook_point, iter_texts(SHARED_CORPUS, "validation"), 4096,
                               progress=False)
    figs = reconstruction_metrics(sae, acts)
    assert figs["nmse"] < 0.15 and figs["dead_fraction"] < 0.9, figs  # few latents fire on 4 K tokens
    # one batch of 8 windows (1016 predictions): 3 full forwards with 49 K-wide logits dominate this test
    ce = ce_loss_metrics(model, tok, sae, iter_texts(SHARED_CORPUS, "validation"), n_tokens=1016, batch_size=8)
    assert ce["ce_loss_recovered"] > 0.98 and ce["delta_lm_loss"] < 0.12, ce
