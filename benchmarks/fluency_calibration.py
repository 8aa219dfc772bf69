"""How the per-answer fluency rule of ``eval-steering`` treats text that is fluent by construction.

``eval-steering`` (and ``benchmarks/http_concept_check.py``) call an answer fluent when its
perplexity under the unsteered model, as the answer to its prompt, is at most ``--budget`` (3) times
the unsteered answers' mean, and its distinct-bigram ratio is at least 0.6. This script puts the
concepts' own example sentences, written by people, through the same rule: each sentence as the
answer to each held-out chat prompt (``benchmarks/neutral_prompts.json``, the 32 of the sweeps), and
each sentence standalone (after the BOS token) against the unsteered answers standalone.

It prints, per concept, the mean perplexity and the fraction within the budget, and writes the
table to ``--out`` (.md) with the numbers beside it (.json).

    python benchmarks/fluency_calibration.py --out docs/general_sae/fluency_calibration/report.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from saesteer.modeling.lm import load_model
from saesteer.steering.eval.scoring import completion_nll, load_concepts
from saesteer.steering.generate import GenerationSpec, generate, render_prompt

HERE = Path(__file__).parent


def perplexities(model, prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
    """exp of each completion's mean next-token NLL given its prompt (``completion_nll``)."""
    nll, _ = completion_nll(model, prompts, completions)
    return [math.exp(x) for x in nll]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concepts", nargs="+", default=[str(HERE / "unseen_concepts.json"), str(HERE / "everyday_concepts.json")])
    ap.add_argument("--prompts", default=str(HERE / "neutral_prompts.json"))
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model, tok = load_model()
    prompts = json.loads(Path(a.prompts).read_text())
    pids = [render_prompt(tok, None, [{"role": "user", "content": p}]) for p in prompts]
    eos = tok.eos_token_id
    base = [[t for t in r.tokens if t != eos] for r in generate(model, tok, [GenerationSpec(p, a.max_new_tokens) for p in pids])]
    bos = [tok.bos_token_id if tok.bos_token_id is not None else eos]
    ref_answer = sum(perplexities(model, pids, base)) / len(base)
    ref_alone = sum(perplexities(model, [bos] * len(base), base)) / len(base)
    rows = []
    for path in a.concepts:
        for c in load_concepts(path):
            sents = [tok(s, add_special_tokens=False)["input_ids"] for s in c.positive]
            ans = perplexities(model, [p for p in pids for _ in sents], [s for _ in pids for s in sents])
            alone = perplexities(model, [bos] * len(sents), sents)
            rows.append({"concept": c.name, "answer_ppl": sum(ans) / len(ans),
                         "answer_within": sum(x <= a.budget * ref_answer for x in ans) / len(ans),
                         "alone_ppl": sum(alone) / len(alone),
                         "alone_within": sum(x <= a.budget * ref_alone for x in alone) / len(alone)})
    lines = [f"Unsteered greedy answers ({len(prompts)} prompts, {a.max_new_tokens} tokens): perplexity {ref_answer:.2f} "
             f"as answers, {ref_alone:.2f} standalone. The concepts' own sentences, under the same model:", "",
             f"| concept | as answers: perplexity (x unsteered) | within {a.budget:g}x | standalone: perplexity (x unsteered) "
             f"| within {a.budget:g}x |", "|---|---|---|---|---|"]
    lines += [f"| {r['concept']} | {r['answer_ppl']:.1f} ({r['answer_ppl'] / ref_answer:.0f}x) | {r['answer_within']:.2f} "
              f"| {r['alone_ppl']:.1f} ({r['alone_ppl'] / ref_alone:.0f}x) | {r['alone_within']:.2f} |" for r in rows]
    md = "\n".join(lines)
    print(md)
    if a.out:
        Path(a.out).write_text(md + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps({"unsteered_answer_ppl": ref_answer, "unsteered_alone_ppl": ref_alone,
                                                                "budget": a.budget, "concepts": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
