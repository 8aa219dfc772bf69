"""Issue 15's HTTP criterion: concept search, given a few example sentences of an everyday concept
it has never been told about, suggests an intervention that brings the concept into most chat
answers, fluently.

For each concept of ``--concepts`` (default ``benchmarks/unseen_concepts.json``: trains, birds and
money, none of them among the 12 concepts the methods were measured on), against a running server
(``--url``, e.g. ``make serve``) through the client SDK:

1. ``POST /v1/concepts/search`` with the positive sentences (and the server's neutral negatives,
   unless ``--negatives`` gives some);
2. ``POST /v1/generate`` on the 8 held-out chat prompts of ``eval-steering``
   (``NEUTRAL_PROMPTS``), greedy, with the ``repetition_penalty`` the mix suggests (or
   ``--repetition-penalty``), ``--max-new-tokens`` tokens: unsteered, with the top hit's suggested
   clamp, with the suggested latent mix on ``--sae`` (as returned, no tuning), and, as
   the baseline, the mean-difference vector of the same sentences at the mix's strength and
   positions (read from the model loaded here, sent as ``add_vector``);
3. scored as ``eval-steering`` scores (``steering.eval.scoring``): the concept is present when the
   all-MiniLM-L6-v2 judge's similarity to the concept sentences exceeds 0.4; an answer is fluent
   when its perplexity under the unsteered model (loaded here) is at most 3x the unsteered answers'
   mean and its distinct-bigram ratio is at least 0.6; "not repetitive" keeps the second rule
   only (people's own sentences about a concept fail the first: ``fluency_calibration.py``).

    python benchmarks/http_concept_check.py --out docs/general_sae/http_check/report.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from saesteer.modeling.lm import load_model
from saesteer.server.config import DEFAULT_SAE_NAME
from saesteer.steering.concept_scores import NEUTRAL_SENTENCES, hook_rows
from saesteer.steering.eval.evaluate import NEUTRAL_PROMPTS
from saesteer.steering.eval.scoring import Concept, ConceptScorer, completion_nll, distinct_bigrams, load_concepts
from saesteer.steering.eval.summary import FLUENT_DISTINCT_BIGRAMS, fluent_answer
from saesteer.steering.eval.judge import SentenceJudge
from saesteer.steering.generate import render_prompt
from saesteer_client import Client, add_vector

HERE = Path(__file__).parent


def run(client: Client, model, tok, judge, concept: Concept, sae: str, max_new_tokens: int, budget: float,
        negative: list[str] | None = None, strength: float | None = None, repetition_penalty: float | None = None) -> dict:
    """One concept: search (``negative`` sentences sent as given, or none), a generation per prompt
    for each of the four arms, scores (module docstring). ``repetition_penalty`` None: the mix's."""
    neg = list(negative or [])
    hit = client.search_concepts(concept.positive, negative=neg, sae=sae, top_k=1)[0]
    (mix,) = client.search_concept_mixes(concept.positive, negative=neg, sae=sae,
                                         **({"mix_strength": strength} if strength else {}))
    if repetition_penalty is None:
        repetition_penalty = mix.repetition_penalty
    hook = next(s.hook_point for s in client.saes() if s.id == sae)
    pos, negr = (hook_rows(model, tok, hook, t) for t in (concept.positive, neg or list(NEUTRAL_SENTENCES)))
    md = (pos.mean(0) - negr.mean(0)).tolist()  # the baseline, as a raw vector at the same strength
    where = mix.suggested[0].positions  # the baseline steers where the suggested mix does
    arms = {"unsteered": [], "top_clamp": [hit.suggested], "mix": list(mix.suggested),
            "mean_diff": [add_vector(md, strength=mix.strength, unit="resid_norm", sae=sae, positions=where)]}
    scorer = ConceptScorer(judge, concept)
    prompt_ids = [render_prompt(tok, None, [{"role": "user", "content": p}]) for p in NEUTRAL_PROMPTS]
    out = {"concept": concept.name, "top_latent": hit.latent, "mix_latents": len(mix.suggested),
           "mix_strength": mix.strength, "mix_positions": where, "mix_mean_diff_cos": mix.mean_diff_cos,
           "repetition_penalty": repetition_penalty, "arms": {}}
    base_ppl = None
    for arm, ivs in arms.items():
        res = [client.generate(messages=[{"role": "user", "content": p}], interventions=ivs,
                               max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty) for p in NEUTRAL_PROMPTS]
        texts = [r.text for r in res]
        comp = [[t for t in r.tokens if t != tok.eos_token_id] for r in res]
        nll, _ = completion_nll(model, prompt_ids, comp)
        ppl = [math.exp(x) for x in nll]
        if base_ppl is None:
            base_ppl = sum(ppl) / len(ppl)
        sim, _ = scorer.scores(texts)
        kw = scorer.keyword_hits(texts)
        distinct = [distinct_bigrams(c) for c in comp]
        varied = [d >= FLUENT_DISTINCT_BIGRAMS for d in distinct]
        fluent = [fluent_answer(p, d, budget * base_ppl) for p, d in zip(ppl, distinct)]
        present = [bool(s > 0.4) for s in sim]
        out["arms"][arm] = {
            "concept_rate": sum(present) / len(present),
            "keyword_rate": sum(kw) / len(kw),
            "fluent_rate": sum(fluent) / len(fluent),
            "fluent_and_present": sum(f and p for f, p in zip(fluent, present)) / len(present),
            "varied_and_present": sum(v and p for v, p in zip(varied, present)) / len(present),
            "perplexity_ratio": sum(ppl) / len(ppl) / base_ppl,
            "samples": [{"prompt": p, "text": t, "similarity": round(float(s), 3), "perplexity_ratio": round(x / base_ppl, 2),
                         "varied": v} for p, t, s, x, v in zip(NEUTRAL_PROMPTS, texts, sim, ppl, varied)],
        }
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| concept | arm | concept rate | keyword rate | fluent | fluent and on concept | not repetitive and on concept "
             "| perplexity (x unsteered) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for arm, a in r["arms"].items():
            name = {"top_clamp": f"clamp latent {r['top_latent']}",
                    "mix": f"mix of {r['mix_latents']} (s={r['mix_strength']:g}, {r.get('mix_positions', 'all')}, cos {r['mix_mean_diff_cos']:.2f})"}.get(arm, arm)
            lines.append(f"| {r['concept']} | {name} | {a['concept_rate']:.2f} | {a['keyword_rate']:.2f} | {a['fluent_rate']:.2f} "
                         f"| {a['fluent_and_present']:.2f} | {a['varied_and_present']:.2f} | {a['perplexity_ratio']:.2f} |")
    lines.append("")
    for r in results:
        lines.append(f"**{r['concept']}, the mix's answers:**\n")
        lines += [f"- *{s['prompt']}* {s['text']!r} (judge {s['similarity']:.2f}, perplexity {s['perplexity_ratio']:.1f}x"
                  f"{'' if s['varied'] else ', repetitive'})" for s in r["arms"]["mix"]["samples"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--concepts", default=str(HERE / "unseen_concepts.json"))
    ap.add_argument("--sae", default=DEFAULT_SAE_NAME)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--fluency-budget", type=float, default=3.0)
    ap.add_argument("--negatives", default=None, help="a JSON list of sentences sent as the search's negatives "
                    "(default: none, the server's neutral set)")
    ap.add_argument("--strength", type=float, default=None, help="mix_strength sent (default: the server's)")
    ap.add_argument("--repetition-penalty", type=float, default=None,
                    help="every generation's repetition_penalty, the unsteered ones too (default: the one the mix "
                    "suggests)")
    ap.add_argument("--only", nargs="*", default=None, help="these concepts only")
    ap.add_argument("--out", default=None, help="write the table here (.md) and the samples beside it (.json)")
    a = ap.parse_args()
    model, tok = load_model()
    judge = SentenceJudge()
    concepts = [c for c in load_concepts(a.concepts) if not a.only or c.name in a.only]
    negative = json.loads(Path(a.negatives).read_text()) if a.negatives else None
    with Client(a.url) as client:
        results = [run(client, model, tok, judge, c, a.sae, a.max_new_tokens, a.fluency_budget, negative, a.strength,
                       a.repetition_penalty)
                   for c in concepts]
    md = markdown(results)
    print(md)
    if a.out:
        Path(a.out).write_text(md + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
