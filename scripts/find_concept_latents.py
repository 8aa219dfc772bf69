"""Find concept latents of an SAE by contrast and measure whether clamping them steers generations.

For each concept: rank latents by how much more they fire on concept sentences than on neutral
ones (saesteer.steering.eval.concepts), then clamp each of the best few to multiples of its typical
activation on the concept sentences and generate greedily on three neutral chat prompts; a
generation counts when a regex finds the concept. Prints a Markdown table and writes JSON.

    python scripts/find_concept_latents.py SAE_DIR [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from saesteer.sae.io import load_sae
from saesteer.steering.eval.concepts import contrast_latents
from saesteer.steering.generate import GenerationSpec, generate, render_prompt
from saesteer.steering.hooks import Steerer
from saesteer.modeling.lm import load_model
from saesteer.steering.plan import InterventionPlan, LatentEdit

NEUTRAL = ["The meeting is scheduled for Tuesday.", "She bought bread at the store.", "The report was finished on time.",
           "He walked to work in the morning.", "The price of the ticket went up.", "They talked about the weather."]
CONCEPTS = {
    "cats": (["I love my cat, she purrs all day.", "The kitten chased a ball of yarn.",
              "Cats are curious animals that like to nap in the sun.", "My cat meows when she is hungry.",
              "The tabby cat climbed onto the windowsill."], r"\b(cat|cats|kitten|kittens|feline|meow\w*|purr\w*)\b"),
    "ocean": (["The ocean waves crashed against the shore.", "We sailed across the blue sea.",
               "The beach was covered with seashells and salty spray.", "Whales swim deep in the ocean.",
               "The tide came in over the sandy beach."], r"\b(ocean\w*|sea|seas|wave\w*|beach\w*|shore\w*|tide\w*)\b"),
    "python": (["def main():\n    print('hello')", "import numpy as np", "for i in range(10):\n    x += i",
                "class Foo:\n    def __init__(self):\n        self.x = 1", "return sorted(items, key=len)"],
               r"(\bdef \w+\(|\bimport \w+|print\(|\bPython\b|```)"),
}
PROMPTS = ["Write one sentence about your morning.", "Tell me something interesting.", "Describe a place you like."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sae")
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--multiples", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    sae = load_sae(a.sae, dtype=torch.float32)
    model, tok = load_model()
    steer = Steerer(model, {"sae": sae})
    prompts = [render_prompt(tok, messages=[{"role": "user", "content": p}]) for p in PROMPTS]
    plain = generate(model, tok, [GenerationSpec(p, a.max_new_tokens) for p in prompts])
    report = {"unsteered": [r.text for r in plain], "concepts": {}}
    print("| concept | latent | pos / neg act | clamp | hits | example |\n|---|---|---|---|---|---|")
    for name, (pos, pattern) in CONCEPTS.items():
        rx = re.compile(pattern, re.I)
        rows = []
        for lat in contrast_latents(model, tok, sae, pos, NEUTRAL, a.top):
            for m in a.multiples:
                value = round(m * lat["pos_mean"], 1)
                plan = InterventionPlan(latent_edits=[LatentEdit("sae", lat["latent"], "clamp", value, "all")])
                outs = generate(model, tok, [GenerationSpec(p, a.max_new_tokens, plan=plan) for p in prompts], steer)
                hits = sum(bool(rx.search(o.text)) for o in outs)
                rows.append({**lat, "clamp": value, "multiple": m, "hits": hits, "texts": [o.text for o in outs]})
                ex = outs[0].text.replace("\n", " ")[:70]
                print(f"| {name} | {lat['latent']} | {lat['pos_mean']:.1f} / {lat['neg_mean']:.1f} | {value} | {hits}/3 | {ex} |", flush=True)
        report["concepts"][name] = rows
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
