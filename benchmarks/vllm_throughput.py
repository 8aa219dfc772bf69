"""Output tokens/s of plain vLLM, vLLM with our SAE steering and the built-in engine, side by side in
one run, at several concurrencies (issue 33's benchmark).

    .venv-vllm/bin/python benchmarks/vllm_throughput.py [--streams 1,16,64 --tokens 64 --rounds 2]
        [--model FOLDER_OR_HUB_ID --sae SPEC --sae-id ID --latent 3656 --dtype float32 --device cpu]
        [--out docs/vllm_throughput.json]

Three engines, each measured in a child process of its own (a fresh process per engine and round,
so the engines never share memory or threads; the rounds go plain, steered, built-in, plain, ...):

- ``plain``: upstream vLLM's own model class on the same weights (``vllm.LLM``, no plugin).
- ``steered``: vLLM with the plugin's architecture (``SaeSteerLlamaForCausalLM``) and the SAE
  loaded, the path ``saesteer serve --engine vllm`` runs; each request's spec travels in
  ``SamplingParams.extra_args`` as a JSON string, as over ``vllm_xargs``.
- ``builtin``: our engine (``steering.generate.generate``: continuous batching over transformers,
  the model packed by ``speed_up`` as the server packs it).

Workloads, at each concurrency N (N requests submitted at once, distinct prompts, ``--tokens`` new
tokens each, EOS ignored, greedy): ``idle`` (no interventions; on ``steered`` the plugin's cost when
no request steers), ``clamp1`` (every request clamps one latent), ``clamp10`` (ten clamps each),
``specs16`` (16 different specs, one clamp and one add on different latents, cycled over the N
requests). The figure is output tokens / wall seconds from submission to the last token, the best
of ``--rounds`` x ``--repeats`` runs (each child warms every concurrency up first: the first step at
a new batch size is slow). Ratios printed: each steered workload against plain vLLM's idle run at the same N
(issue 33's target: >= 0.9 at every N), and the built-in engine against plain vLLM.

The same script runs on a GPU (``--device cuda --dtype bfloat16 --model a 1B+ Llama folder``); the
plugin steers under ``enforce_eager`` only, so ``plain`` is run eager too unless ``--plain-compiled``.
Prints one JSON object (and writes it with ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TOPICS = ["a lighthouse keeper", "the moon", "a lost dog", "baking bread", "a storm at sea", "an old clock",
          "a mountain village", "a robot gardener", "a desert caravan", "a winter market", "a jazz musician",
          "a secret garden", "a train journey", "a chess match", "a forgotten letter", "a river town"]
STYLES = ["Tell me a story about {}.", "Describe {} in detail.", "Write a poem about {}.", "Explain why people love {}."]
WORKLOADS = ("idle", "clamp1", "clamp10", "specs16")


def prompts(n: int) -> list[str]:
    """``n`` distinct chat prompts (prefix caching cannot make one request's prefill free)."""
    out = [s.format(t) for s in STYLES for t in TOPICS]
    return [out[i % len(out)] + ("" if i < len(out) else f" (version {i // len(out)})") for i in range(n)]


def interventions(workload: str, n: int, sae_id: str, latent: int, d_sae: int) -> list[list[dict]]:
    """The interventions of each of ``n`` requests (wire-schema dicts)."""
    if workload == "idle":
        return [[] for _ in range(n)]
    if workload == "clamp1":
        return [[{"op": "clamp", "sae": sae_id, "latent": latent, "value": 12.0}] for _ in range(n)]
    if workload == "clamp10":
        lats = [latent] + [(latent + 97 * j) % d_sae for j in range(1, 10)]
        return [[{"op": "clamp", "sae": sae_id, "latent": lat, "value": 4.0} for lat in lats] for _ in range(n)]
    specs = [[{"op": "clamp", "sae": sae_id, "latent": (latent + 131 * j) % d_sae, "value": 2.0 + j % 5},
              {"op": "add", "sae": sae_id, "latent": (latent + 131 * j + 61) % d_sae, "value": 4.0}] for j in range(16)]
    return [specs[i % 16] for i in range(n)]


def measure(run, a, workloads) -> dict[str, float]:
    """The best tokens/s of ``--repeats`` runs of each workload at each concurrency, the workloads
    interleaved and their order rotated each pass (idle, clamp1, clamp10, specs16, then clamp1,
    clamp10, specs16, idle, ...) so that drift within a pass hits each of them alike."""
    best: dict[str, float] = {}
    for n in a.streams:
        for r in range(a.repeats):
            k = r % len(workloads)
            for w in workloads[k:] + workloads[:k]:
                best[f"{w}@{n}"] = max(best.get(f"{w}@{n}", 0.0), run(n, w))
    return best


# -- the children --------------------------------------------------------------------------------

def child_vllm(a, steered: bool) -> dict:
    """Measure one vLLM engine (plain or steered) over every workload and concurrency."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from transformers import AutoTokenizer

    from saesteer.sae.sources import parse_sae_spec, read_config
    from saesteer.steering.generate import render_prompt
    from saesteer.steering.vllm_engine import plugin
    from saesteer.steering.vllm_engine.engine import vllm_engine_args

    n_max = max(a.streams)
    if steered:
        plugin.register()
        kw = vllm_engine_args(a.model, [a.sae], dtype=a.dtype, device=a.device, max_num_seqs=n_max, max_model_len=1024)
    else:
        kw = dict(model=a.model, dtype=a.dtype, enforce_eager=not a.plain_compiled, max_num_seqs=n_max,
                  max_model_len=1024, disable_log_stats=True)
    llm = vllm.LLM(**kw, seed=0)
    tok = AutoTokenizer.from_pretrained(a.model)
    d_sae = read_config(parse_sae_spec(a.sae))[1].d_sae

    def run(n: int, workload: str, tokens: int = a.tokens) -> float:
        texts = prompts(n)
        ivs = interventions(workload, n, a.sae_id, a.latent, d_sae)
        reqs, params = [], []
        for text, iv in zip(texts, ivs):
            ids = render_prompt(tok, messages=[{"role": "user", "content": text}])
            if steered:
                prompt, extra = plugin.steer_request(ids, iv)
            else:
                prompt, extra = {"prompt_token_ids": ids}, None
            reqs.append(prompt)
            params.append(vllm.SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, extra_args=extra))
        t0 = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        return sum(len(o.outputs[0].token_ids) for o in outs) / dt

    for n in a.streams:  # warm-up: the first step at a new batch size is slow (buffers, kernels)
        run(n, "specs16" if steered else "idle", tokens=8)
    res = measure(run, a, WORKLOADS if steered else ("idle",))
    llm.llm_engine.engine_core.shutdown()
    return res


def child_builtin(a) -> dict:
    """Measure the built-in engine over every workload and concurrency."""
    import torch
    from pydantic import TypeAdapter

    from saesteer.modeling.cpu_kernels import speed_up
    from saesteer.modeling.lm import load_model
    from saesteer.sae.io import load_sae
    from saesteer.steering.generate import GenerationSpec, generate, render_prompt
    from saesteer.steering.hooks import Steerer
    from saesteer.steering.plan import build_plan
    from saesteer_client.schema import Intervention

    dtype = getattr(torch, a.dtype)
    model, tok = load_model(a.builtin_model, device=a.device, dtype=dtype) if a.builtin_model else load_model()
    if a.device == "cpu":
        speed_up(model, a.dtype)
    sae = load_sae(a.sae, dtype=torch.float32).to(a.device)
    steerer = Steerer(model, {a.sae_id: sae})
    adapter = TypeAdapter(list[Intervention])

    def run(n: int, workload: str, tokens: int = a.tokens) -> float:
        specs = []
        for text, iv in zip(prompts(n), interventions(workload, n, a.sae_id, a.latent, sae.cfg.d_sae)):
            plan = {"plan": build_plan(adapter.validate_python(iv), {a.sae_id: sae.cfg})} if iv else {}
            ids = render_prompt(tok, messages=[{"role": "user", "content": text}])
            specs.append(GenerationSpec(input_ids=ids, max_new_tokens=tokens, ignore_eos=True, **plan))
        t0 = time.perf_counter()
        res = generate(model, tok, specs, steerer)
        dt = time.perf_counter() - t0
        return sum(len(r.tokens) for r in res) / dt

    for n in a.streams:  # warm-up, as for vLLM
        run(n, "specs16", tokens=8)
    return measure(run, a, WORKLOADS)


# -- the parent ----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="1,16,64", help="concurrencies, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=2, help="child processes per engine, alternating engines")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each workload inside a child, interleaved, the order rotated (4: each workload once in each place)")
    ap.add_argument("--model", default=None, help="a safetensors folder or hub id (default: the shipped GGUF, exported)")
    ap.add_argument("--builtin-model", default=None, help="the built-in engine's model (default: the shipped GGUF)")
    ap.add_argument("--sae", default=None, help="an SAE spec (default: the shipped Python-documentation SAE)")
    ap.add_argument("--sae-id", default="smollm2-135m-res10-k32")
    ap.add_argument("--latent", type=int, default=3656)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--plain-compiled", action="store_true", help="run plain vLLM in its default compiled mode")
    ap.add_argument("--engines", default="plain,steered,builtin")
    ap.add_argument("--child", choices=["plain", "steered", "builtin"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    a.streams = [int(s) for s in str(a.streams).split(",")]
    if a.sae is None:
        from saesteer.server.config import python_sae_spec

        a.sae = python_sae_spec()
    if a.model is None:
        from saesteer.server.config import ServerSettings
        from saesteer.steering.vllm_engine.export import vllm_model_dir

        a.model = vllm_model_dir(ServerSettings())
    if a.child:
        res = child_builtin(a) if a.child == "builtin" else child_vllm(a, a.child == "steered")
        print("RESULT " + json.dumps(res), flush=True)
        return

    child_args = ["--streams", ",".join(map(str, a.streams)), "--tokens", str(a.tokens), "--repeats", str(a.repeats),
                  "--model", a.model,
                  "--sae", a.sae, "--sae-id", a.sae_id, "--latent", str(a.latent), "--dtype", a.dtype,
                  "--device", a.device] + (["--builtin-model", a.builtin_model] if a.builtin_model else []) + \
                 (["--plain-compiled"] if a.plain_compiled else [])
    best: dict[str, dict[str, float]] = {}
    for r in range(a.rounds):
        for eng in a.engines.split(","):
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, __file__, *child_args, "--child", eng],
                               capture_output=True, text=True)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if p.returncode or line is None:
                sys.exit(f"{eng} failed ({p.returncode}):\n{p.stderr[-4000:]}")
            for k, v in json.loads(line[7:]).items():
                best.setdefault(eng, {})[k] = max(v, best.get(eng, {}).get(k, 0.0))
            print(f"round {r + 1} {eng}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    table = {eng: {k: round(v, 1) for k, v in res.items()} for eng, res in best.items()}
    ratios: dict[str, dict[str, float]] = {}
    for n in a.streams:
        base = best.get("plain", {}).get(f"idle@{n}")
        if not base:
            continue
        for eng in ("steered", "builtin"):
            for w in WORKLOADS:
                v = best.get(eng, {}).get(f"{w}@{n}")
                if v:
                    ratios.setdefault(f"{eng}/plain", {})[f"{w}@{n}"] = round(v / base, 3)
    out = {"tok_per_s": table, "ratio_to_plain_vllm": ratios,
           "setup": {"tokens": a.tokens, "streams": a.streams, "rounds": a.rounds, "repeats": a.repeats, "dtype": a.dtype,
                     "device": a.device, "cpu_count": os.cpu_count(), "model": Path(a.model).name,
                     "sae_id": a.sae_id, "plain_compiled": a.plain_compiled}}
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
