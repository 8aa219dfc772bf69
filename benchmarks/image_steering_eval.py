"""Concept removal on the shipped shapes text-to-image model through its text-encoder SAE (issue 16).

For each colour: the latents are found by contrasting prompts (``search_prompt_concepts``: 16
captions asking for the colour against the same captions with each other colour), then ``removal_eval``
draws ``--n`` prompts that ask for the colour, unsteered and with the latents scaled by each factor
(Concept Steerers' steer with strength factor - 1, conditional + / unconditional -), every pair
from the same noise, and reads the pixels back. Also: caption following of the unsteered model on
random captions, and the seconds per image. Writes ``docs/image_steering_eval.{json,md}``.

    python benchmarks/image_steering_eval.py [--n 40] [--top-k 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from saesteer.modeling.diffusion import load_pipeline
from saesteer.sae.io import load_sae
from saesteer.sae.stats import load_latent_stats
from saesteer.server.config import ServerSettings
from saesteer.steering.concept_search import search_prompt_concepts
from saesteer.steering.eval.images import colour_specs, draw_in_batches, insertion_eval, removal_eval
from saesteer.steering.eval.shapes import COLOURS, SHAPES, read_image, sample
from saesteer.steering.hooks import Steerer

DOCS = Path(__file__).resolve().parent.parent / "docs"


def caption_following(pipe, n: int, seed: int = 123) -> dict:
    """Colour, shape and both read right on ``n`` random captions (20 DDIM steps, guidance 4)."""
    rng = np.random.default_rng(seed)
    specs = [sample(rng) for _ in range(n)]
    t0 = time.perf_counter()
    imgs = draw_in_batches(pipe, [s.caption for s in specs], seed=seed)
    secs = (time.perf_counter() - t0) / n
    reads = [read_image(im) for im in imgs]
    per_shape = {sh: float(np.mean([r["shape"] == s.shape for r, s in zip(reads, specs) if s.shape == sh])) for sh in SHAPES}
    return {"n": n, "colour_acc": float(np.mean([r["colour"] == s.colour for r, s in zip(reads, specs)])),
            "shape_acc": float(np.mean([r["shape"] == s.shape for r, s in zip(reads, specs)])),
            "both_acc": float(np.mean([r["colour"] == s.colour and r["shape"] == s.shape for r, s in zip(reads, specs)])),
            "shape_acc_by_shape": per_shape, "seconds_per_image_batched": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="prompts per colour")
    ap.add_argument("--top-k", type=int, default=4, help="latents per colour")
    ap.add_argument("--factors", type=float, nargs="+", default=[0.0, -0.5, -1.0, -2.0])
    ap.add_argument("--follow-n", type=int, default=100)
    ap.add_argument("--parts", nargs="+", choices=["removal", "insertion"], default=["removal", "insertion"],
                    help="what to measure; a part left out keeps its figures from the last run's JSON")
    a = ap.parse_args()
    settings = ServerSettings(model="shapes-t2i")
    pipe = load_pipeline(settings.model)
    sae_dir = Path(settings.saes[0])
    sae, stats = load_sae(sae_dir), load_latent_stats(sae_dir, contexts=True)
    steerer = Steerer(pipe.text_encoder, {"te9": sae})
    out = DOCS / "image_steering_eval.json"
    if "removal" not in a.parts:
        report = json.loads(out.read_text())
        for c in report["colours"]:  # the contexts as the statistics now hold them
            c["contexts"] = {int(i): [x["text"] for x in stats.contexts.get(int(i), [])[:3]] for i in c["latents"]}
    else:
        report = {"model": "shapes-t2i", "sae": sae_dir.name, "n": a.n, "top_k": a.top_k, "steps": 20, "guidance_scale": 1.5,
                  "following": caption_following(pipe, a.follow_n), "colours": []}
        print(json.dumps(report["following"]), flush=True)
    for colour in COLOURS if "removal" in a.parts else ():
        found = colour_specs(colour, 16, seed=1000)
        positive = [s.caption for s in found]
        negative = [s.caption.replace(f" {colour} ", f" {c} ") for s in found for c in COLOURS if c != colour]
        hits = search_prompt_concepts(pipe, {"te9": sae}, {"te9": stats}, positive, negative, top_k=a.top_k)
        res = removal_eval(pipe, steerer, "te9", [h.latent for h in hits], colour, a.factors, n=a.n, seed=0)
        res["contexts"] = {h.latent: [c["text"] for c in stats.contexts.get(h.latent, [])[:3]] for h in hits}
        report["colours"].append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "contexts"}), flush=True)
    if "insertion" in a.parts:
        report["insertion"] = []
        for shape, from_shape in (("star", "circle"), ("square", "triangle")):
            rng = np.random.default_rng(1000)
            found = [sample(rng, shape=shape) for _ in range(16)]
            negative = [s.caption.replace(f" {shape} ", f" {c} ") for s in found for c in SHAPES if c != shape]
            hits = search_prompt_concepts(pipe, {"te9": sae}, {"te9": stats}, [s.caption for s in found], negative, top_k=a.top_k)
            lat = [h.latent for h in hits]
            res = insertion_eval(pipe, steerer, "te9", lat, [float(stats.typical_activation[i]) for i in lat], shape, from_shape,
                                 [0.5, 1.0, 2.0], n=a.n, seed=0)
            report["insertion"].append(res)
            print(json.dumps(res), flush=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, DOCS / "image_steering_eval.md")


def _bar(c: dict) -> str:
    """Whether removal of colour ``c`` met the bar, at its best negative factor (by shape kept)."""
    ok = [s for s in c["steered"] if s["factor"] < 0 and s["cut"] >= 0.7]
    best = max(ok or [s for s in c["steered"] if s["factor"] < 0], key=lambda s: s["shape_acc"])
    met = best["cut"] >= 0.7 and best["shape_acc"] >= 0.8
    return f"{c['colour']} {'met' if met else 'not met'} (factor {best['factor']:g}: cut {best['cut']:.2f}, shape {best['shape_acc']:.2f})"


def write_markdown(r: dict, path: Path) -> None:
    f = r["following"]
    lines = [
        "# Concept removal on the shapes text-to-image model",
        "",
        "`python benchmarks/image_steering_eval.py` (figures below from its last run; the JSON beside this file has every number).",
        f"Model `{r['model']}` (`saesteer/models/shapes-t2i`), SAE `{r['sae']}`; {r['steps']} DDIM steps, guidance {r['guidance_scale']}, 32x32.",
        "",
        f"**Caption following, unsteered** ({f['n']} random captions): colour read right {f['colour_acc']:.2f}, shape {f['shape_acc']:.2f}, "
        f"both {f['both_acc']:.2f}; by shape: " + ", ".join(f"{k} {v:.2f}" for k, v in f["shape_acc_by_shape"].items()) +
        f". {f['seconds_per_image_batched']:.2f} s per image in batches of 20 on 2 CPU cores (shared with other jobs during this run).",
        "",
        f"**Removal**: for each colour, the top {r['top_k']} latents of the contrast search (16 captions asking for the colour "
        "against the same captions with each other colour), scaled by a factor on the conditional pass and by its negation's "
        "effect on the unconditional one (Concept Steerers' strength = factor - 1), on "
        f"{r['n']} prompts asking for the colour, each steered image drawn from the same noise as its unsteered twin. "
        "share: pixels within RGB distance 60 of the colour; cut = 1 - steered share / unsteered share; shape: the drawn "
        "shape read from the chromatic pixels, whatever their colour, is the one asked for; colours read: the dominant palette "
        "colour (None: no palette colour covers 1 % of the image).",
        "",
        "Issue 16's bar, a cut of at least 0.70 with the shape still right in at least 0.80 of the images, at a negative factor: "
        + "; ".join(_bar(c) for c in r["colours"]) + ".",
        "",
        "| colour | latents | unsteered share | unsteered shape | factor | share | cut | shape | colours read |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in r["colours"]:
        p = c["plain"]
        for s in c["steered"]:
            lines.append(f"| {c['colour']} | {', '.join(map(str, c['latents']))} | {p['share']:.3f} | {p['shape_acc']:.2f} | {s['factor']:g} | "
                         f"{s['share']:.3f} | {s['cut']:.2f} | {s['shape_acc']:.2f} | "
                         + ", ".join(f"{k} {v}" for k, v in sorted(s["colour_read"].items(), key=lambda kv: -kv[1])) + " |")
    if r.get("insertion"):
        lines += ["", f"**Insertion**: the top {r['top_k']} latents of the contrast search for a shape (16 captions asking for it against "
                  "the same captions with each other shape), each decoder direction added at every position but the start token, "
                  f"value times the latent's typical activation, on {r['n']} prompts asking for another shape (value 0: unsteered).", "",
                  "| insert | into | latents | value | read as the inserted shape | still the asked shape | colour kept |",
                  "|---|---|---|---|---|---|---|"]
        for ins in r["insertion"]:
            for run in ins["runs"]:
                lines.append(f"| {ins['shape']} | {ins['from']} | {', '.join(map(str, ins['latents']))} | {run['value']:g} | "
                             f"{run['shape_rate']:.2f} | {run['from_rate']:.2f} | {run['colour_kept']:.2f} |")
    lines += ["", "Top prompts of the latents found (from the SAE's statistics; `«»` marks the token, `«<pad>»` a padding position):", ""]
    for c in r["colours"]:
        for lat, ctx in c["contexts"].items():
            lines.append(f"- {c['colour']}, latent {lat}: " + "; ".join(f"`{t}`" for t in ctx))
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
