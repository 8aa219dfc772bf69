"""How the steering hook's cost scales: with the number of edited latents, with d_sae, with batch size.

For each setting we time, side by side in one run, the hook's own work at one decode step (the
activation x [batch, 1, d_in] in, the steered activation out; ``--iters`` calls, median of
``--repeats``) for the sparse-delta hook and for the full-decode hook (the eager twin: full encode,
edits, full decode), and one unsteered decode step of SmolLM2-135M-Instruct (a KV cache of
``--context`` tokens) at the same batch size. The speed ratio is plain step / (plain step + hook):
what steering leaves of unsteered decoding. The hook is timed alone because its cost (well under a
millisecond for a few edits) is far below the run-to-run noise of a whole CPU decode step. Each row
of a batch carries its own edits (heterogeneous batch). SAEs other than the default are random
BatchTopK SAEs of the given width (the cost does not depend on the weights).

    python benchmarks/steering_scaling.py [--repeats 5] [--iters 50] [--plot docs/steering_scaling.png]
                                          [--json out.json] [--big]   (--big adds d_sae 131072)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from saesteer.sae.io import load_sae
from saesteer.sae.model import SAE, SAEConfig
from saesteer.server.config import python_sae_spec
from saesteer.steering.core import StepPositions
from saesteer.steering.hooks import Steerer
from saesteer.modeling.lm import load_model
from saesteer.steering.plan import InterventionPlan, LatentEdit


def random_sae(d_sae: int, like: SAE) -> SAE:
    """A random BatchTopK SAE with ``like``'s hook point and d_in, ``d_sae`` latents (float32)."""
    cfg = SAEConfig(d_in=like.cfg.d_in, d_sae=d_sae, architecture="batchtopk", k=32, hook_point=like.cfg.hook_point)
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(d_sae)
    with torch.no_grad():
        w = torch.randn(d_sae, cfg.d_in, generator=g)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.threshold.fill_(0.5)
    return sae


def plans_for(batch: int, edits: int, d_sae: int) -> list[InterventionPlan]:
    """Row b clamps ``edits`` latents of its own (different rows, different latents)."""
    return [
        InterventionPlan(latent_edits=[LatentEdit("s", (97 * (b * edits + i) + 13) % d_sae, "clamp", 5.0, "all") for i in range(edits)])
        for b in range(batch)
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timing of the plain step")
    ap.add_argument("--iters", type=int, default=50, help="hook calls per timing")
    ap.add_argument("--context", type=int, default=64, help="tokens in the KV cache")
    ap.add_argument("--big", action="store_true", help="also d_sae 131072 (Llama Scope's largest width)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="write a PNG of the three sweeps")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load_model()
    default = load_sae(python_sae_spec(), dtype=torch.float32)
    from transformers import DynamicCache

    def step_timer(batch: int, steerer: Steerer | None, plans):
        """Seconds per decode step (median of ``a.steps`` steps after the prefill)."""
        ids = torch.randint(100, 1000, (batch, a.context), generator=torch.Generator().manual_seed(0))
        cache = DynamicCache(config=model.config)
        pos = StepPositions(abs_pos=torch.arange(a.context).expand(batch, -1).clone(), prompt_len=torch.full((batch,), a.context))
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = ids[:, -1:]
        times = []
        ctx = steerer.steer(plans, pos) if steerer is not None else None
        if ctx is not None:
            ctx.__enter__()
        try:
            for s in range(a.steps):
                pos.abs_pos = torch.full((batch, 1), a.context + s)
                t = time.perf_counter()
                model(input_ids=nxt, past_key_values=cache, use_cache=True, position_ids=pos.abs_pos)
                times.append(time.perf_counter() - t)
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        return statistics.median(times)

    settings = []  # (sweep, x, batch, edits, sae)
    for e in (1, 4, 16, 64):
        settings.append(("edited latents", e, 1, e, default))
    widths = (4608, 16384, 65536) + ((131072,) if a.big else ())
    saes = {d: (default if d == default.cfg.d_sae else random_sae(d, default)) for d in widths}
    for d in widths:
        settings.append(("d_sae", d, 1, 10, saes[d]))
    for b in (1, 4, 16):
        settings.append(("batch size", b, b, 1, default))

    def hook_timer(steerer: Steerer, plans, sae: SAE, batch: int) -> float:
        """Seconds per call of the hook's work on a decode-step activation [batch, 1, d_in]."""
        groups = [g for gs in steerer._groups(plans, {"s": sae}).values() for g in gs]
        pos = StepPositions(abs_pos=torch.full((batch, 1), a.context), prompt_len=torch.full((batch,), a.context))
        x = torch.randn(batch, 1, sae.cfg.d_in, generator=torch.Generator().manual_seed(1)) * 6.0

        def run():
            out = x
            for g in groups:
                out = out + g.delta(x, pos, steerer.full)
            return out

        run()
        t = time.perf_counter()
        for _ in range(a.iters):
            run()
        return (time.perf_counter() - t) / a.iters

    plain_step: dict[int, float] = {}
    rows = []
    for sweep, x, batch, edits, sae in settings:
        fast, full = Steerer(model, {"s": sae}), Steerer(model, {"s": sae}, full=True)
        plans = plans_for(batch, edits, sae.cfg.d_sae)
        if batch not in plain_step:
            step_timer(batch, None, None)  # warm-up
            plain_step[batch] = statistics.median(step_timer(batch, None, None) for _ in range(a.repeats)) * 1e3
        samples = {"sparse": [], "full": []}
        for _ in range(a.repeats):
            samples["sparse"].append(hook_timer(fast, plans, sae, batch))
            samples["full"].append(hook_timer(full, plans, sae, batch))
        med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        plain = plain_step[batch]
        row = {
            "sweep": sweep, "x": x, "batch": batch, "edits_per_row": edits, "d_sae": sae.cfg.d_sae,
            "plain_ms": plain, "sparse_hook_ms": med["sparse"], "full_hook_ms": med["full"],
            "sparse_ratio": plain / (plain + med["sparse"]), "full_ratio": plain / (plain + med["full"]),
        }
        rows.append(row)
        print(f"{sweep:>15} {x:>7}: plain step {plain:7.2f} ms  sparse hook {med['sparse']:7.3f} ms "
              f"(x{row['sparse_ratio']:.3f})  full hook {med['full']:7.3f} ms (x{row['full_ratio']:.3f})", flush=True)

    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    print(f"\nmachine: {machine}; decode step with a {a.context}-token KV cache (median of {a.repeats} x {a.steps} steps); "
          f"hook: median of {a.repeats} x {a.iters} calls")
    print("\n| sweep | value | batch | edits/row | d_sae | plain decode step, ms | sparse-delta hook, ms (speed vs plain) | full-decode hook, ms (speed vs plain) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sweep']} | {r['x']} | {r['batch']} | {r['edits_per_row']} | {r['d_sae']} | {r['plain_ms']:.1f} | "
              f"{r['sparse_hook_ms']:.3f} ({r['sparse_ratio']:.3f}x) | {r['full_hook_ms']:.3f} ({r['full_ratio']:.3f}x) |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "context": a.context, "rows": rows}, f, indent=1)
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        for ax, sweep in zip(axes, ("edited latents", "d_sae", "batch size")):
            rs = [r for r in rows if r["sweep"] == sweep]
            xs = [r["x"] for r in rs]
            ax.plot(xs, [r["sparse_hook_ms"] for r in rs], marker="o", label="sparse delta")
            ax.plot(xs, [r["full_hook_ms"] for r in rs], marker="s", label="full decode")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(sweep)
            ax.set_ylabel("hook cost, ms per decode step")
            ax.set_title(f"{sweep} (plain step {statistics.median(r['plain_ms'] for r in rs):.0f} ms)", fontsize=9)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"steering hook cost on SmolLM2-135M ({machine})", fontsize=9)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
