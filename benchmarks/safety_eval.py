"""Detecting a concept in SmolLM2's residual stream: regex vs probes vs SAE latents.

Generates ``--n`` labelled texts (``steering.eval.safety.pii_examples`` for personal data, or
``medical_examples`` for medical advice, a topical concept; Faker seeded), runs them
through the model to the default SAE's hook point (block 10), splits them 70/30 by text, trains the
detectors on the training texts and reports token- and request-level precision, recall and F1 on
the held-out ones, plus each detector's cost per token next to a plain decode step of the model
(timed side by side in this run). Writes JSON and Markdown.

    python benchmarks/safety_eval.py --n 1200 --out docs/safety_eval_pii.md
    python benchmarks/safety_eval.py --concept medical --n 1200 --out docs/safety_eval_medical.md
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saesteer.sae.io import load_sae
from saesteer.modeling.lm import load_model
from saesteer.sae.probes import select_latents, train_probe
from saesteer.server.config import python_sae_spec
from saesteer.steering.eval.safety import best_threshold, medical_examples, pii_examples, prf, token_features


def per_request(rows, token_pred) -> dict:
    pred = torch.tensor([bool(p.any()) for p in token_pred])
    gold = torch.tensor([r["positive"] for r in rows])
    return prf(pred, gold)


def timing(model, sae, probe_raw, probe_sae, concept, repeats: int = 30) -> dict:
    """ms per decode step of the plain model at batch 8 and the detectors' cost on that step's
    8 tokens, measured side by side, interleaved."""
    from transformers import DynamicCache

    ids = torch.randint(100, 20000, (8, 64))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    x = torch.randn(8, 1, sae.cfg.d_in) * 5
    w_raw, (w_s, lat_s), lat_c = probe_raw, probe_sae, concept
    cost = {"decode step": [], "raw probe": [], "sae probe": [], "concept latents": []}
    step = torch.randint(100, 20000, (8, 1))
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            model(input_ids=step, past_key_values=cache, use_cache=True)
            cache.crop(-1)
        cost["decode step"].append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.sigmoid(x @ w_raw)
        cost["raw probe"].append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.sigmoid(sae.encode_latents(x, lat_s) @ w_s)
        cost["sae probe"].append(time.perf_counter() - t)
        t = time.perf_counter()
        sae.encode_latents(x, lat_c).amax(-1)
        cost["concept latents"].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in cost.items()}
    return {k: {"ms": round(v, 4), "x decode step": round(v / med["decode step"], 5)} for k, v in med.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--k", type=int, default=32, help="latents of the sparse SAE probe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concept", choices=["pii", "medical"], default="pii",
                    help="personal data (with the regex baseline) or medical advice (a topical concept)")
    ap.add_argument("--out", default=None, help="Markdown report (and .json beside it)")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    model, tok = load_model()
    sae = load_sae(python_sae_spec(), dtype=torch.float32)
    examples = (pii_examples if a.concept == "pii" else medical_examples)(a.n, seed=a.seed)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(a.seed)).tolist()
    cut = int(0.7 * len(order))
    t0 = time.time()
    hook = sae.cfg.hook_point
    train = token_features(model, tok, hook, [examples[i] for i in order[:cut]], sae=sae)
    test = token_features(model, tok, hook, [examples[i] for i in order[cut:]], sae=sae)
    print(f"activations: {sum(len(r['y']) for r in train + test)} tokens in {time.time() - t0:.0f} s", flush=True)

    X, Z, Y = (torch.cat([r[k] for r in train]) for k in ("x", "z", "y"))
    results = {}
    if a.concept == "pii":  # the regex baseline
        results["regex"] = [r["regex"] for r in test]
    # raw-activation probe
    w, b, mu, sd = train_probe(X, Y)
    raw_score = lambda x: torch.sigmoid(((x - mu) / sd) @ w + b)  # noqa: E731
    thr = best_threshold(raw_score(X), Y.bool())
    results["raw_probe"] = [raw_score(r["x"]) >= thr for r in test]
    # sparse probe on SAE latents
    lat = select_latents(Z, Y, a.k)
    ws, bs, mus, sds = train_probe(Z[:, lat], Y)
    sae_score = lambda z: torch.sigmoid(((z[:, lat] - mus) / sds) @ ws + bs)  # noqa: E731
    thr_s = best_threshold(sae_score(Z), Y.bool())
    results["sae_probe"] = [sae_score(r["z"]) >= thr_s for r in test]
    # concept latents: the top 3 by class-mean difference, max activation over a threshold
    top3 = lat[:3]
    thr_c = best_threshold(Z[:, top3].amax(-1), Y.bool())
    results["concept_latents"] = [r["z"][:, top3].amax(-1) >= thr_c for r in test]

    gold_tok = torch.cat([r["y"] for r in test]).bool()
    report = {"concept": a.concept, "n_texts": a.n, "train_texts": cut, "test_texts": len(order) - cut,
              "test_tokens": int(len(gold_tok)), "positive_test_tokens": int(gold_tok.sum()),
              "sae": sae.cfg.hook_point, "sparse_probe_k": a.k, "concept_latents": top3.tolist(), "detectors": {}}
    for name, preds in results.items():
        report["detectors"][name] = {"token": prf(torch.cat(preds).bool(), gold_tok), "request": per_request(test, preds)}
    report["cost_per_step"] = timing(model, sae, w, (ws, lat), top3)
    print(json.dumps(report, indent=1))
    if a.out:
        what = ("an email, phone number, street address or card number; half with near misses" if a.concept == "pii"
                else "medical advice: doses, drugs, symptoms, first aid; half with other advice or medicine without advice")
        title = "Personal-data" if a.concept == "pii" else "Medical-advice (topical concept)"
        lines = [f"## {title} detection in SmolLM2-135M's residual stream (block 10)", "",
                 f"`python benchmarks/safety_eval.py --concept {a.concept} --n {a.n}`: {a.n} Faker-filled texts (half with "
                 f"{what}), {cut} for training and {len(order) - cut} held out ({report['test_tokens']} tokens, "
                 f"{report['positive_test_tokens']} of them positive). Thresholds fitted on the training texts (best token F1).", "",
                 "| detector | token P | token R | token F1 | request P | request R | request F1 |", "|---|---|---|---|---|---|---|"]
        for name, d in report["detectors"].items():
            t, r = d["token"], d["request"]
            lines.append(f"| {name} | {t['precision']:.3f} | {t['recall']:.3f} | {t['f1']:.3f} | "
                         f"{r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} |")
        lines += ["", "Cost on the 8 tokens of a batch-8 decode step, median of 30, timed beside the step itself:", "",
                  "| | ms | x decode step |", "|---|---|---|"]
        for name, c in report["cost_per_step"].items():
            lines.append(f"| {name} | {c['ms']:.4f} | {c['x decode step']:.5f} |")
        with open(a.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        with open(a.out.rsplit(".", 1)[0] + ".json", "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
