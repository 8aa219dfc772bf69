"""Continuous batching against static batching, side by side in one run (issue 14's targets).

    python benchmarks/continuous_batching.py [--long 256 --short 16 --streams 16 --stream-tokens 32]

On the real SmolLM2-135M-Instruct (float32) and the default SAE, in-process (no HTTP):

1. Head-of-line: 4 requests of ``--long`` new tokens start, then (after 2 decode steps) 4 of
   ``--short``. Static batching (``steering.generate``, what ``POST /v1/generate`` does) runs the
   short ones as the next batch, after the long batch; continuous batching
   (``steering.engine.ContinuousBatch``) lets them join at once. The short requests' median latency,
   and the ratio continuous / static (target <= 0.35).
2. Throughput: ``--streams`` concurrent streams of ``--stream-tokens`` tokens through the continuous
   batch (half steered), against one stream alone: the aggregate tokens/s ratio (target >= 6), and
   time to first token p50/p95 under that load.
3. Decode-step efficiency at batch 1 (plain and steered): tokens/s x float32 weight bytes /
   the machine's bandwidth, measured here in the same run: copy bandwidth (bytes read + written,
   the issue's definition) measured between every chunk of 12 decode steps, each chunk against the
   bandwidth around it, the median over chunks reported (the host drifts within seconds); and read
   bandwidth (what a step that only reads weights can reach), measured before each setup. Side by side, each on its own
   copy of the model: PyTorch's default kernels; the linear
   layers packed for oneDNN (``modeling.lm.pack_linears``); and ``modeling.cpu_kernels.speed_up`` with fused
   projections in each weight format (float32: the server's default; float16; bfloat16; int8; lighter
   weights are counted against the float32 bytes, as the issue allows). For each, what the format
   costs against the float32 model on English text (the repository's README and docs, 2048 tokens):
   KL divergence per token, top-1 agreement and the change in next-token loss.

Parts 1 and 2 run on ``--weights`` (default float32, fused: what the server runs by default).

Rows ignore EOS so every request runs its full length. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from saesteer.sae.io import load_sae
from saesteer.modeling.cpu_kernels import WEIGHT_FORMATS, bf16_supported, speed_up
from saesteer.modeling.lm import load_model, pack_linears
from saesteer.server.config import python_sae_spec
from saesteer.steering.engine import ContinuousBatch
from saesteer.steering.generate import GenerationSpec, generate, render_prompt
from saesteer.steering.hooks import Steerer
from saesteer.steering.plan import InterventionPlan, LatentEdit

PROMPTS = ["Tell me a long story about a lighthouse keeper.", "Explain how rivers shape valleys.",
           "Describe a busy market in the morning.", "Write about the history of bridges."]


class CopyMeter:
    """Copy bandwidth (bytes read + written, GB/s) between two preallocated filled tensors, best of
    ``reps`` copies: the buffers are allocated once, so a measurement costs no page faults and can
    be taken between decode chunks."""

    def __init__(self, mb: int = 256):
        self.a = torch.rand(mb * (1 << 20) // 4)
        self.b = torch.zeros_like(self.a)

    def __call__(self, reps: int = 3) -> float:
        best = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            self.b.copy_(self.a)
            best = max(best, 2 * self.a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        return best


def copy_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """GB/s of a large tensor copy (bytes read + written), best of ``reps``.

    Both tensors are filled first: pages of a ``torch.empty`` tensor that were never written all map
    to the kernel's one zero page, which reads from cache. Measured side by side here (2 cores, with
    another job running): a copy from an untouched tensor 32.9 GB/s, from a filled one 26.6; a sum
    over an untouched tensor 67.4 GB/s, over a filled one 30.8."""
    return CopyMeter(mb)(reps)


def read_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """GB/s of reading a large filled tensor once (a sum: one add per 4 bytes read), best of
    ``reps``. A decode step at batch 1 reads every weight once and writes almost nothing, so this,
    not the copy bandwidth, bounds it."""
    a = torch.rand(mb * (1 << 20) // 4)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a float32 n x n matmul, best of ``reps`` (the compute limit)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def weight_bytes(model) -> int:
    """Bytes of parameters one decode step reads (tied embeddings counted once: the LM head reads
    them, the embedding lookup reads one row)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def head_of_line(model, tok, steerer, plan, n_long: int, n_short: int) -> dict:
    specs_long = [GenerationSpec(render_prompt(tok, messages=[{"role": "user", "content": p}]), max_new_tokens=n_long,
                                 ignore_eos=True, plan=plan if i % 2 else InterventionPlan()) for i, p in enumerate(PROMPTS)]
    specs_short = [GenerationSpec(render_prompt(tok, messages=[{"role": "user", "content": p + " Briefly."}]),
                                  max_new_tokens=n_short, ignore_eos=True, plan=plan if i % 2 else InterventionPlan())
                   for i, p in enumerate(PROMPTS)]
    # static: the short batch starts when the long batch ends (they arrived just after it started)
    t0 = time.perf_counter()
    generate(model, tok, specs_long, steerer)
    t_long = time.perf_counter() - t0
    t1 = time.perf_counter()
    generate(model, tok, specs_short, steerer)
    t_short = time.perf_counter() - t1
    static = [t_long + t_short] * len(specs_short)  # each short request waits for both batches
    # continuous: the long rows run; after 2 steps the short ones join and leave when done
    eng = ContinuousBatch(model, tok, steerer)
    eng.add_many([(f"long{i}", s) for i, s in enumerate(specs_long)])
    eng.step()
    eng.step()
    t_arrive = time.perf_counter()
    eng.add_many([(f"short{i}", s) for i, s in enumerate(specs_short)])  # they arrive together
    done: dict[str, float] = {}
    while len(done) < len(specs_short):
        for ev in eng.step():
            if ev.key.startswith("short") and ev.finish_reason is not None:
                done[ev.key] = time.perf_counter() - t_arrive
    while len(eng):
        eng.cancel(eng.keys()[0])
    cont = list(done.values())
    return {"static_short_median_s": round(statistics.median(static), 2),
            "continuous_short_median_s": round(statistics.median(cont), 2),
            "ratio_continuous_over_static": round(statistics.median(cont) / statistics.median(static), 3),
            "static_long_batch_s": round(t_long, 2)}


def throughput(model, tok, steerer, plan, streams: int, n: int) -> dict:
    def spec(i):
        return GenerationSpec(render_prompt(tok, messages=[{"role": "user", "content": f"{PROMPTS[i % 4]} ({i})"}]),
                              max_new_tokens=n, ignore_eos=True, plan=plan if i % 2 else InterventionPlan())

    def run(count: int) -> tuple[float, list[float]]:
        eng = ContinuousBatch(model, tok, steerer)
        t0 = time.perf_counter()
        eng.add_many([(str(i), spec(i)) for i in range(count)])  # all arrive at once: one prefill
        ttft = [time.perf_counter() - t0] * count
        while len(eng):
            eng.step()
        return count * n / (time.perf_counter() - t0), ttft

    one, _ = run(1)
    many, ttft = run(streams)
    q = statistics.quantiles(ttft, n=20)
    return {"one_stream_tokens_per_s": round(one, 1), f"{streams}_streams_tokens_per_s": round(many, 1),
            "ratio": round(many / one, 2), "ttft_p50_s": round(statistics.median(ttft), 2), "ttft_p95_s": round(q[18], 2)}


def batch1_efficiency(model, tok, steerer, plan, n: int, bandwidth: dict, wb: int | None = None,
                      chunk: int = 12, meter: CopyMeter | None = None) -> dict:
    """Batch-1 decode tokens/s, plain and steered, as a fraction of the limit ``bandwidth / weight
    bytes``.

    The host's bandwidth moves within seconds (two measurements a minute apart here: 45.3 and
    31.3 GB/s), so one figure taken before a 3-second run can halve or double the fraction. The
    ``n`` tokens are therefore decoded in chunks of ``chunk`` steps, the copy bandwidth measured
    (``meter``) before and after each, and each chunk's fraction taken against the mean of the two:
    ``fraction_of_copy_limit`` is the median over chunks (the per-chunk values are listed).
    ``bandwidth[kind]`` (measured once, before) gives the ``*_limit_tokens_per_s`` figures and the
    fraction of the read limit."""
    wb = wb or weight_bytes(model)
    meter = meter or CopyMeter()
    out = {"weight_mb": round(wb / 1e6, 1)}
    ids = render_prompt(tok, messages=[{"role": "user", "content": PROMPTS[0]}])
    for name, p in (("plain", InterventionPlan()), ("steered", plan)):
        eng = ContinuousBatch(model, tok, steerer)
        eng.add("a", GenerationSpec(ids, max_new_tokens=n + 3, ignore_eos=True, plan=p))
        eng.step()  # warm: first decode step after the prefill
        fractions, total = [], 0.0
        bw_before = meter()
        for _ in range(max(1, n // chunk)):
            t0 = time.perf_counter()
            for _ in range(chunk):
                eng.step()
            dt = time.perf_counter() - t0
            total += dt
            bw_after = meter()
            fractions.append(chunk / dt * wb / ((bw_before + bw_after) / 2 * 1e9))
            bw_before = bw_after
        tps = chunk * len(fractions) / total
        out[f"{name}_tokens_per_s"] = round(tps, 1)
        out[f"{name}_fraction_of_copy_limit"] = round(statistics.median(fractions), 3)
        out[f"{name}_chunk_fractions"] = [round(f, 3) for f in fractions]
        out[f"{name}_fraction_of_read_limit"] = round(tps * wb / (bandwidth["read"] * 1e9), 3)
    for kind, gbs in bandwidth.items():
        out[f"{kind}_limit_tokens_per_s"] = round(gbs * 1e9 / wb, 1)
    return out


def english_ids(tok, n: int = 2048, width: int = 256) -> torch.Tensor:
    """[n / width, width] token ids of the repository's README and docs (English prose)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = "\n\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    ids = tok(text, return_tensors="pt").input_ids[0, :n]
    return ids[: len(ids) // width * width].view(-1, width)


@torch.no_grad()
def format_cost(model, ref_logp: torch.Tensor, ids: torch.Tensor) -> dict:
    """KL(float32 || model) per token, top-1 agreement and next-token loss change on ``ids``."""
    logp = torch.cat([model(input_ids=row[None]).logits.log_softmax(-1) for row in ids])
    nll = lambda lp: float(-lp[:, :-1].gather(-1, ids[:, 1:, None]).mean())  # noqa: E731
    return {"kl_nats_per_token": round(float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()), 5),
            "top1_agreement": round(float((ref_logp.argmax(-1) == logp.argmax(-1)).float().mean()), 4),
            "delta_next_token_loss_nats": round(nll(logp) - nll(ref_logp), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", type=int, default=256)
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=32)
    ap.add_argument("--batch1-tokens", type=int, default=96)
    ap.add_argument("--weights", default="float32", choices=WEIGHT_FORMATS, help="weight format of parts 1 and 2")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model()
    sae = load_sae(python_sae_spec(), dtype=torch.float32)
    sid = sae.cfg.hook_point
    plan = InterventionPlan(latent_edits=[LatentEdit(sid, 3656, "clamp", 20.0, "all")])
    report = {"threads": torch.get_num_threads()}
    report["bandwidth_gb_s"] = {"copy": round(copy_bandwidth(), 1), "read": round(read_bandwidth(), 1)}
    wb = weight_bytes(model)  # float32: what the default kernels read per step
    ids = english_ids(tok)
    with torch.no_grad():
        ref_logp = torch.cat([model(input_ids=row[None]).logits.log_softmax(-1) for row in ids])
    meter = CopyMeter()
    setups = {"default_kernels": lambda m: {}, "packed": lambda m: {"linears": pack_linears(m, batch_hint=16)}}
    report["skipped"] = {}
    for w in WEIGHT_FORMATS:
        if w in ("bfloat16", "int8") and not bf16_supported():  # speed_up refuses them on this CPU
            report["skipped"][f"fused_{w}"] = "oneDNN runs no bfloat16 on this CPU"
            continue
        setups[f"fused_{w}"] = lambda m, w=w: speed_up(m, w)
    report["batch1"] = {}
    seen_bw = {"copy": [report["bandwidth_gb_s"]["copy"]], "read": [report["bandwidth_gb_s"]["read"]]}
    for name, setup in setups.items():
        m = copy.deepcopy(model)
        r = {"setup": setup(m)}
        # the host's memory bandwidth drifts within minutes (measured 31-49 GB/s copy on one day):
        # each setup is compared with the bandwidth measured just before it
        bw = {"copy": round(copy_bandwidth(), 1), "read": round(read_bandwidth(), 1)}
        for kind in bw:
            seen_bw[kind].append(bw[kind])
        r["bandwidth_gb_s"] = bw
        r.update(batch1_efficiency(m, tok, Steerer(m, {sid: sae}), plan, a.batch1_tokens, bw, wb, meter=meter))
        r["cost_against_float32"] = format_cost(m, ref_logp, ids)
        report["batch1"][name] = r
        del m
    base = report["batch1"]["default_kernels"]["plain_tokens_per_s"]
    for r in report["batch1"].values():
        r["speedup_over_default_kernels"] = round(r["plain_tokens_per_s"] / base, 2)
    report["bandwidth_range_gb_s"] = {k: [min(v), max(v)] for k, v in seen_bw.items()}
    report["weights"] = a.weights
    speed_up(model, a.weights)  # what the server does (--weights)
    steerer = Steerer(model, {sid: sae})
    report["head_of_line"] = head_of_line(model, tok, steerer, plan, a.long, a.short)
    report["throughput"] = throughput(model, tok, steerer, plan, a.streams, a.stream_tokens)
    # a token costs ~2 FLOPs per weight (the embedding lookup aside, the tied LM head included)
    gflops = matmul_gflops()
    flops_per_token = 2 * wb / 4
    agg = report["throughput"][f"{a.streams}_streams_tokens_per_s"]
    report["throughput"]["matmul_gflop_s"] = round(gflops, 1)
    report["throughput"]["fraction_of_compute_limit"] = round(agg * flops_per_token / (gflops * 1e9), 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
