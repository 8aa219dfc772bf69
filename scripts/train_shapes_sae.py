"""Train the shapes model's text-encoder SAE (Concept Steerers' recipe on our small model).

A BatchTopK SAE (Bussmann et al., 2024) on the output of the CLIP text encoder's layer 9
(``blocks.9.hook_resid_post``, Concept Steerers' SD 1.4 hook point) over ``steering.eval.shapes.
prompt_set()`` (289 prompts, every position but the start token: ``saesteer.modeling.diffusion.
prompt_activations``), with the same trainer as the LLM SAEs; then its statistics and top prompts
per latent (``prompt_latent_stats``) and its reconstruction figures on the training prompts and on
held-out captions of another wording, written beside it.

    python scripts/train_shapes_sae.py --model saesteer/models/shapes-t2i --out saesteer/models/shapes-t2i/sae-te9
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from saesteer.modeling.diffusion import load_pipeline
from saesteer.sae.text_encoder import prompt_activations, prompt_latent_stats
from saesteer.sae.io import save_sae
from saesteer.sae.stats import save_latent_stats
from saesteer.sae.train import TrainConfig, train_sae
from saesteer.steering.eval.shapes import prompt_set


def held_out_prompts() -> list[str]:
    """Captions in wordings the model never saw (for the SAE's figures, not its training)."""
    from saesteer.steering.eval.shapes import BACKGROUNDS, COLOURS, SHAPES

    return [f"{c} {s}, {b} background" for s in SHAPES for c in COLOURS for b in BACKGROUNDS]


@torch.no_grad()
def figures(sae, acts: torch.Tensor) -> dict:
    """Normalized MSE, explained variance and mean L0 of ``sae`` on ``acts`` [N, d_in]."""
    x = acts.to(sae.dtype)
    z = sae.encode(x)
    err = (sae.decode(z) - x).pow(2).sum(-1)
    var = (x - x.mean(0)).pow(2).sum(-1)
    return {"nmse": float(err.sum() / x.pow(2).sum(-1).sum()), "explained_variance": float(1 - err.sum() / var.sum()),
            "l0": float((z > 0).sum(-1).float().mean()), "n_tokens": int(x.shape[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the ShapesPipeline folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--hook-point", default="blocks.9.hook_resid_post")
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--n-tokens", type=int, default=3_000_000, help="training tokens (passes over the prompt set)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    pipe = load_pipeline(a.model)
    prompts = prompt_set()
    acts = prompt_activations(pipe, prompts, a.hook_point)
    flat = acts.reshape(-1, acts.shape[-1])
    cfg = TrainConfig(architecture="batchtopk", d_sae=a.d_sae, k=a.k, batch_size=1024, n_tokens=a.n_tokens, lr=1e-3,
                      aux_k=64, dead_tokens=20_000, seed=a.seed)
    res = train_sae(flat, cfg, hook_point=a.hook_point, model_name=Path(a.model).name, progress=False)
    sae = res.sae.eval()
    out = Path(a.out)
    save_sae(sae, out)
    stats = prompt_latent_stats(pipe, sae, prompts)
    save_latent_stats(stats, out)
    held = prompt_activations(pipe, held_out_prompts(), a.hook_point)
    figs = {"train_prompts": figures(sae, flat), "held_out_wording": figures(sae, held.reshape(-1, held.shape[-1])),
            "alive_latents": int((stats.frequency > 0).sum()), "d_sae": a.d_sae, "k": a.k, "n_tokens_trained": a.n_tokens,
            "prompts": len(prompts)}
    (out / "figures.json").write_text(json.dumps(figs, indent=1) + "\n")
    print(json.dumps(figs, indent=1))


if __name__ == "__main__":
    main()
