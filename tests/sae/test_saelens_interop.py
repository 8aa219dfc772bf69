"""Optional: SAELens (if installed) loads what we write, with the same numerics as ours.

sae-lens is not a dependency of saesteer (it pulls transformer-lens, datasets, wandb, ...);
this test runs where a developer installed it and is skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from saesteer.sae.io import load_sae, save_sae  # noqa: E402
from saesteer.server.config import python_sae_spec  # noqa: E402

from .test_model import ARCHS, random_sae  # noqa: E402


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_loads_our_checkpoints_with_our_numerics(arch, tmp_path):
    ours = random_sae(arch, scale=0.5)  # the input scale is folded on save
    save_sae(ours, tmp_path / arch)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / arch), device="cpu")
    # read as a SAELens >= 6 config, so the hook point survives (add_sae attaches by it)
    assert theirs.cfg.metadata.hook_name == ours.cfg.hook_point
    x = torch.randn(32, ours.cfg.d_in, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        z_o, z_t = ours.encode(x), theirs.encode(x)
        assert _rel(z_t, z_o) < 1e-5
        assert _rel(theirs.decode(z_t), ours.decode(z_o)) < 1e-5


def test_saelens_reads_the_default_sae_as_a_jumprelu_with_the_same_code():
    ours = load_sae(python_sae_spec(), dtype=torch.float32)
    theirs = sae_lens.SAE.load_from_disk(python_sae_spec(), device="cpu", dtype="float32")
    assert theirs.cfg.metadata.hook_name == "blocks.10.hook_resid_post"
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(1)) * 6
    with torch.no_grad():
        assert _rel(theirs.encode(x), ours.encode(x)) < 1e-6
        assert _rel(theirs.decode(theirs.encode(x)), ours.decode(ours.encode(x))) < 1e-6
