"""Steering overhead and heterogeneous batching, measured side by side in one run.

1. Single stream (batch 1, greedy): plain transformers ``generate`` vs our generation path with no
   interventions, one clamp, ten clamps, a steering vector, and one clamp through the full-decode
   hook (the eager twin). Modes are interleaved over ``--repeats`` rounds; the median tokens/s of
   each is printed with its ratio to plain ``generate``.
2. Heterogeneous batching: N requests, each with a different clamp, served as one batch vs one by
   one: throughput ratio and p50/p95 latency.

    python benchmarks/steering_overhead.py [--new-tokens 32] [--repeats 3] [--batch 16]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from saesteer.sae.io import load_sae
from saesteer.server.config import python_sae_spec
from saesteer.steering.generate import GenerationSpec, generate, render_prompt
from saesteer.steering.hooks import Steerer
from saesteer.modeling.lm import load_model
from saesteer.steering.plan import InterventionPlan, LatentEdit, VectorEdit
from _common import NoEos


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load_model()
    sae = load_sae(python_sae_spec(), dtype=torch.float32)
    fast, full = Steerer(model, {"s": sae}), Steerer(model, {"s": sae}, full=True)
    ids = render_prompt(tok, messages=[{"role": "user", "content": "Tell me something interesting."}])
    n = a.new_tokens
    one = InterventionPlan(latent_edits=[LatentEdit("s", 123, "clamp", 20.0, "all")])
    ten = InterventionPlan(latent_edits=[LatentEdit("s", 100 + 37 * i, "clamp", 5.0, "all") for i in range(10)])
    vec = InterventionPlan(vector_edits=[VectorEdit(sae.cfg.hook_point, sae.W_dec[7].detach() * 4, "all")])

    def hf():
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        return out.shape[1] - len(ids)

    def ours(plan, steerer):
        spec = GenerationSpec(ids, n, plan=plan)
        # ignore EOS so every mode generates exactly n tokens
        return len(generate(model, NoEos(tok), [spec], steerer)[0].tokens)

    modes = {
        "transformers generate (plain)": hf,
        "saesteer, no interventions": lambda: ours(InterventionPlan(), fast),
        "saesteer, 1 clamp": lambda: ours(one, fast),
        "saesteer, 10 clamps": lambda: ours(ten, fast),
        "saesteer, steering vector": lambda: ours(vec, fast),
        "saesteer, 1 clamp, full-decode hook": lambda: ours(one, full),
    }
    for f in modes.values():  # warm-up
        f()
    rates: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(a.repeats):
        for name, f in modes.items():
            t = time.perf_counter()
            k = f()
            rates[name].append(k / (time.perf_counter() - t))
    base = statistics.median(rates["transformers generate (plain)"])
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"SmolLM2-135M fp32 CPU, batch 1, {n} new tokens, median of {a.repeats}")
    print("| mode | tokens/s | ratio to plain generate |\n|---|---|---|")
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"| {name} | {m:.1f} | {m / base:.2f} |")

    prompts = ["Tell me something interesting.", "Describe a place you like.", "Write one sentence about your morning.",
               "What is your favourite food?"]
    specs = [GenerationSpec(render_prompt(tok, messages=[{"role": "user", "content": prompts[i % 4]}]), n,
                            plan=InterventionPlan(latent_edits=[LatentEdit("s", 50 * i + 3, "clamp", 10.0, "all")]))
             for i in range(a.batch)]
    t0 = time.perf_counter()
    lat_seq = []
    for s in specs:
        t = time.perf_counter()
        generate(model, NoEos(tok), [s], fast)
        lat_seq.append(time.perf_counter() - t0)  # request i waits for all before it
    seq_total = time.perf_counter() - t0
    t = time.perf_counter()
    generate(model, NoEos(tok), specs, fast)
    batch_total = time.perf_counter() - t
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    print(f"\n{a.batch} requests, {a.batch} different clamps, {n} new tokens each")
    print("| serving | total s | tokens/s | p50 latency s | p95 latency s |\n|---|---|---|---|---|")
    print(f"| one by one | {seq_total:.1f} | {a.batch * n / seq_total:.1f} | {q(lat_seq, 0.5):.1f} | {q(lat_seq, 0.95):.1f} |")
    print(f"| one batch | {batch_total:.1f} | {a.batch * n / batch_total:.1f} | {batch_total:.1f} | {batch_total:.1f} |")
    print(f"throughput ratio batched / one by one: {seq_total / batch_total:.2f}")


if __name__ == "__main__":
    main()
