"""Shared fixtures: the real SmolLM2-135M-Instruct (loaded once per session) and the default SAE."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def lm():
    from saesteer.sae.lm import load_model

    torch.manual_seed(0)
    return load_model()


@pytest.fixture(scope="session")
def default_sae():
    from saesteer.sae.io import load_sae
    from saesteer.server.config import default_sae_spec

    return load_sae(default_sae_spec(), dtype=torch.float32)
