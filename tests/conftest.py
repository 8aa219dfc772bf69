"""Shared fixtures: the real SmolLM2-135M-Instruct (loaded once per session) and the shipped Python-documentation SAE
(smollm2-135m-res10-k32), whose latents the mechanics tests use."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def lm():
    from saesteer.modeling.lm import load_model

    torch.manual_seed(0)
    return load_model()


@pytest.fixture(scope="session")
def python_sae():
    from saesteer.sae.io import load_sae
    from saesteer.server.config import python_sae_spec

    return load_sae(python_sae_spec(), dtype=torch.float32)
