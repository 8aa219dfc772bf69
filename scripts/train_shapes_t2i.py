"""Train the small text-to-image model on synthetic captioned shapes (``steering.eval.shapes``).

A ``ShapesPipeline`` (``saesteer.modeling.diffusion``): SD 1.x's CLIP tokenizer (49,408 tokens, built
offline from open-clip-torch's BPE file), a 10-layer, 64-wide CLIPTextModel (so layer 9 exists, as
in Concept Steerers' SD 1.4 hook point) and a pixel-space UNet2DConditionModel on 32x32 RGB, trained
jointly from scratch, 10 % empty captions for classifier-free guidance. What makes it learn on two
CPU cores in about half an hour (a first design, cross-attention alone and the epsilon loss, drew
the same blob whatever the caption after 11 minutes):

- the caption also enters every ResNet block through the time embedding (attention-pooled text
  embeddings, scale-and-shift), beside cross-attention at 16x16 and 8x8 (no attention at 32x32, and
  the transformer blocks attend to the text only: self-attention over 256 pixels was half the step);
- the v-prediction loss (``--prediction-type``), which weighs the image at high noise, where colour
  and background are decided;
- auxiliary linear heads on the text encoder's pooled output that read each caption attribute
  (``--aux-weight``; not shipped), so the encoder separates colours and shapes from the start.

Every ``--eval-every`` steps it samples ``--eval-n`` images with DDIM at the pipeline's default
steps and guidance and reads colour and shape back from the pixels
(``steering.eval.shapes.read_image``): the caption-following figures in ``training_log.json``.

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

from saesteer.modeling.diffusion import ShapesPipeline, clip_tokenizer
from saesteer.steering.eval.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZE, SIZES, read_image, render, sample

MAX_TOKENS = 16  # captions are at most 10 BPE tokens + start and end


def build(seed: int = 0, prediction_type: str = "v_prediction") -> ShapesPipeline:
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
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=16, norm_num_groups=16, only_cross_attention=True,
        # the caption also enters every ResNet block as a FiLM of its time embedding (attention-pooled
        # text embeddings), not only through cross-attention: global attributes (colour, shape) are
        # learnt in minutes instead of hours
        addition_embed_type="text", addition_embed_type_num_heads=4, resnet_time_scale_shift="scale_shift",
    )
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                          prediction_type=prediction_type)
    return ShapesPipeline(unet=unet, text_encoder=text, tokenizer=tok, scheduler=sched)


ATTRIBUTES = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "background": list(BACKGROUNDS)}


def batch(rng: np.random.Generator, n: int, p_empty: float = 0.1):
    """Images [n, 3, SIZE, SIZE] in [-1, 1], captions ('' for about ``p_empty`` of them) and each
    attribute's class index [n] (-100 where the caption is empty: ignored by the auxiliary loss)."""
    specs = [sample(rng) for _ in range(n)]
    imgs = torch.from_numpy(np.stack([render(s) for s in specs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    empty = rng.random(n) < p_empty
    caps = ["" if e else s.caption for s, e in zip(specs, empty)]
    labels = {k: torch.tensor([-100 if e else v.index(getattr(s, k)) for s, e in zip(specs, empty)])
              for k, v in ATTRIBUTES.items()}
    return imgs, caps, labels


@torch.no_grad()
def evaluate(pipe: ShapesPipeline, n: int, seed: int = 123, steps: int = 20) -> dict:
    rng = np.random.default_rng(seed)
    specs = [sample(rng) for _ in range(n)]
    out = pipe(prompt=[s.caption for s in specs], num_inference_steps=steps,
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
    ap.add_argument("--aux-weight", type=float, default=0.1,
                    help="weight of the text encoder's auxiliary attribute loss (linear heads on its pooled output)")
    ap.add_argument("--resume", action="store_true", help="continue from --out")
    ap.add_argument("--prediction-type", choices=["v_prediction", "epsilon"], default="v_prediction",
                    help="the UNet's target: v (Salimans & Ho, 2022; its loss weighs the image at high noise, where "
                    "colour and background are decided: with epsilon, 1,200 steps in, the image predicted from pure noise "
                    "at t=950 for a white-background caption was still mid-grey) or epsilon")
    a = ap.parse_args()
    out = Path(a.out)
    from diffusers import DDIMScheduler, DDPMScheduler

    pipe = ShapesPipeline.from_pretrained(out) if a.resume else build(a.seed, a.prediction_type)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=a.prediction_type)
    pipe.set_progress_bar_config(disable=True)
    noise = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=a.prediction_type)
    # auxiliary heads (not shipped): read each caption attribute from the pooled text embedding, so
    # the encoder separates colours and shapes from the first steps on instead of waiting for the
    # diffusion loss's weak gradient through cross-attention
    d_text = pipe.text_encoder.config.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(d_text, len(v)) for k, v in ATTRIBUTES.items()})
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    rng = np.random.default_rng(a.seed + (7 if a.resume else 0))
    log_path = out / "training_log.json"
    log = json.loads(log_path.read_text()) if a.resume and log_path.is_file() else []
    start, t0, step, losses, aux_losses = (log[-1]["step"] if log else 0), time.time(), 0, [], []
    pipe.unet.train(), pipe.text_encoder.train()
    while step < a.steps and time.time() - t0 < a.minutes * 60:
        imgs, caps, labels = batch(rng, a.batch_size)
        ids = pipe.tokenizer(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        enc = pipe.text_encoder(ids)
        cond, pooled = enc[0], enc.pooler_output
        t = torch.randint(0, 1000, (imgs.shape[0],))
        eps = torch.randn_like(imgs)
        target = eps if a.prediction_type == "epsilon" else noise.get_velocity(imgs, eps, t)
        diff = F.mse_loss(pipe.unet(noise.add_noise(imgs, eps, t), t, encoder_hidden_states=cond).sample, target)
        aux = sum(F.cross_entropy(h(pooled), labels[k], ignore_index=-100) for k, h in heads.items())
        aux_losses.append(float(aux.detach()))
        loss = diff + a.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        warm = min(1.0, (start + step + 1) / 200)
        for g in opt.param_groups:
            g["lr"] = a.lr * warm
        opt.step()
        losses.append(float(diff.detach()))
        step += 1
        if step % a.eval_every == 0:
            pipe.unet.eval(), pipe.text_encoder.eval()
            figs = evaluate(pipe, a.eval_n)
            pipe.unet.train(), pipe.text_encoder.train()
            rec = {"step": start + step, "minutes": round((time.time() - t0) / 60, 2), "loss": float(np.mean(losses[-100:])),
                   "aux_loss": float(np.mean(aux_losses[-100:])), **figs}
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
