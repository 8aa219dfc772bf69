"""Train the small text-to-image model on synthetic captioned shapes (``steering.eval.shapes``).

A ``ShapesPipeline`` (``saesteer.sae.diffusion``): SD 1.x's CLIP tokenizer (49,408 tokens, built
offline from open-clip-torch's BPE file), a 10-layer, 64-wide CLIPTextModel (so layer 9 exists, as
in Concept Steerers' SD 1.4 hook point) and a pixel-space UNet2DConditionModel on 32x32 RGB, trained
jointly from scratch with the DDPM epsilon loss, 10 % empty captions for classifier-free guidance.
Every ``--eval-every`` steps it samples ``--eval-n`` images with DDIM and reads colour and shape
back from the pixels (``steering.eval.shapes.read_image``): the caption-following figures.

    python scripts/train_shapes_t2i.py --out saesteer/models/shapes-t2i --minutes 60
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from saesteer.sae.diffusion import ShapesPipeline, clip_tokenizer
from saesteer.steering.eval.shapes import SIZE, read_image, render, sample

MAX_TOKENS = 16  # captions are at most 10 BPE tokens + start and end


def build(seed: int = 0) -> ShapesPipeline:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = clip_tokenizer(max_length=MAX_TOKENS)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=10, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, projection_dim=64,
    ))
    unet = UNet2DConditionModel(
        sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=16, norm_num_groups=16,
    )
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    return ShapesPipeline(unet=unet, text_encoder=text, tokenizer=tok, scheduler=sched)


def batch(rng: np.random.Generator, n: int, p_empty: float = 0.1):
    specs = [sample(rng) for _ in range(n)]
    imgs = torch.from_numpy(np.stack([render(s) for s in specs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    caps = [("" if rng.random() < p_empty else s.caption) for s in specs]
    return imgs, caps


@torch.no_grad()
def evaluate(pipe: ShapesPipeline, n: int, seed: int = 123, steps: int = 20) -> dict:
    rng = np.random.default_rng(seed)
    specs = [sample(rng) for _ in range(n)]
    out = pipe(prompt=[s.caption for s in specs], num_inference_steps=steps, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(seed)).images
    reads = [read_image(np.asarray(im)) for im in out]
    return {"colour_acc": sum(r["colour"] == s.colour for r, s in zip(reads, specs)) / n,
            "shape_acc": sum(r["shape"] == s.shape for r, s in zip(reads, specs)) / n,
            "both_acc": sum(r["colour"] == s.colour and r["shape"] == s.shape for r, s in zip(reads, specs)) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=60.0, help="stop after this much training time")
    ap.add_argument("--steps", type=int, default=100_000, help="or after this many steps")
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from --out")
    a = ap.parse_args()
    out = Path(a.out)
    pipe = ShapesPipeline.from_pretrained(out) if a.resume else build(a.seed)
    pipe.set_progress_bar_config(disable=True)
    from diffusers import DDPMScheduler

    noise = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    rng = np.random.default_rng(a.seed + (7 if a.resume else 0))
    log_path = out / "training_log.json"
    log = json.loads(log_path.read_text()) if a.resume and log_path.is_file() else []
    start, t0, step, losses = (log[-1]["step"] if log else 0), time.time(), 0, []
    pipe.unet.train(), pipe.text_encoder.train()
    while step < a.steps and time.time() - t0 < a.minutes * 60:
        imgs, caps = batch(rng, a.batch_size)
        ids = pipe.tokenizer(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids)[0]
        t = torch.randint(0, 1000, (imgs.shape[0],))
        eps = torch.randn_like(imgs)
        loss = F.mse_loss(pipe.unet(noise.add_noise(imgs, eps, t), t, encoder_hidden_states=cond).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        warm = min(1.0, (start + step + 1) / 200)
        for g in opt.param_groups:
            g["lr"] = a.lr * warm
        opt.step()
        losses.append(float(loss))
        step += 1
        if step % a.eval_every == 0:
            pipe.unet.eval(), pipe.text_encoder.eval()
            figs = evaluate(pipe, a.eval_n)
            pipe.unet.train(), pipe.text_encoder.train()
            rec = {"step": start + step, "minutes": round((time.time() - t0) / 60, 2), "loss": float(np.mean(losses[-100:])), **figs}
            log.append(rec)
            print(json.dumps(rec), flush=True)
            pipe.save_pretrained(out)
            log_path.write_text(json.dumps(log, indent=1) + "\n")
    pipe.unet.eval(), pipe.text_encoder.eval()
    figs = evaluate(pipe, a.eval_n)
    log.append({"step": start + step, "minutes": round((time.time() - t0) / 60, 2),
                "loss": float(np.mean(losses[-100:])) if losses else math.nan, **figs, "final": True})
    print(json.dumps(log[-1]), flush=True)
    pipe.save_pretrained(out)
    log_path.write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
