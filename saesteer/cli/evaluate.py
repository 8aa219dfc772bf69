"""``saesteer eval | latents | stats | eval-steering``: an SAE's figures, its latents found or
shown, their statistics and output scores, and the steering sweep."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from saesteer_client.schema import DEFAULT_MIX_FIT_STEPS, DEFAULT_MIX_LATENTS, DEFAULT_MIX_SIGNS, MIX_SIGNS, PositionKind

from .common import add_model_args


def cmd_eval(a: argparse.Namespace) -> int:
    from saesteer.sae.evaluate import eval_cli

    return eval_cli(a)


def cmd_latents(a: argparse.Namespace) -> int:
    import torch

    if a.search or a.show is not None:
        from saesteer.sae.stats import latent_record, load_latent_stats, search_latents

        stats = load_latent_stats(a.sae, contexts=True)
        if stats is None:
            print(f"error: {a.sae} has no latent statistics; run `saesteer stats {a.sae}` first", file=sys.stderr)
            return 2
        rows = [latent_record(stats, a.show)] if a.show is not None else search_latents(stats, a.search, a.top)
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if not (a.positive and a.negative):
        print("error: give --positive and --negative texts, --search WORD, or --show LATENT", file=sys.stderr)
        return 2
    from saesteer.sae.io import load_sae
    from saesteer.steering.eval.concepts import contrast_latents
    from saesteer.modeling.lm import load_model

    sae = load_sae(a.sae, dtype=torch.float32)
    model, tok = load_model(a.model, a.gguf_file)
    rows = contrast_latents(model, tok, sae, a.positive, a.negative, a.top)
    print(json.dumps(rows, indent=2))
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    import torch

    if a.output_scores:
        return _output_scores(a)

    from saesteer.sae.activations import iter_texts
    from saesteer.sae.formats import load_any
    from saesteer.sae.evaluate import compute_latent_stats
    from saesteer.sae.stats import save_latent_stats
    from saesteer.modeling.lm import load_model

    if a.data is None:
        print("error: saesteer stats needs --data, the text to read the statistics from", file=sys.stderr)
        return 2
    sae = load_any(a.sae, dtype=torch.float32)  # any supported format (Llama Scope, sparsify, ...)
    model, tok = load_model(a.model, a.gguf_file)
    stats = compute_latent_stats(
        model, tok, sae, iter_texts(a.data, a.split), a.n_tokens, context_size=a.context_size, top_contexts=a.top_contexts
    )
    stats.meta.update(data=Path(a.data).name if Path(a.data).exists() else a.data, split=a.split)
    paths = save_latent_stats(stats, a.out or a.sae)
    fired = int((stats.frequency > 0).sum())
    print(
        f"{stats.n_tokens} tokens: {fired}/{sae.cfg.d_sae} latents fire; median typical activation "
        f"{float(stats.typical_activation[stats.frequency > 0].median()):.3g}; mean residual norm {stats.resid_norm_mean:.4g}"
    )
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _output_scores(a: argparse.Namespace) -> int:
    import time

    import torch

    from saesteer.sae.formats import load_any
    from saesteer.sae.output_scores import output_scores, save_latent_output
    from saesteer.modeling.lm import load_model, pack_linears

    sae = load_any(a.sae, dtype=torch.float32)
    model, tok = load_model(a.model, a.gguf_file)
    pack_linears(model)  # oneDNN: the same numbers within float32 rounding, 2-4x faster matmuls here
    t0 = time.time()
    out = output_scores(model, tok, sae, amplification=a.amplification, top_k=a.logit_lens_k, batch_size=a.batch_size)
    paths = save_latent_output(out, a.out or a.sae, tok)
    s = out.output_score
    print(f"{sae.cfg.d_sae} latents in {time.time() - t0:.0f} s: output score median {float(s.median()):.3g}, "
          f"max {float(s.max()):.3g}; {int((s > 0.01).sum())} latents above 0.01")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_eval_steering(a: argparse.Namespace) -> int:
    import torch

    from saesteer.sae.formats import load_any
    from saesteer.sae.stats import load_latent_stats
    from saesteer.steering.eval.evaluate import DEFAULT_STRENGTHS, NEUTRAL_PROMPTS, SweepConfig, sweep
    from saesteer.steering.eval.interventions import AXBENCH_METHODS, METHODS, MIX_LATENTS
    from saesteer.steering.eval.report import markdown_report, write_reports
    from saesteer.steering.eval.scoring import Concept, load_concepts
    from saesteer.sae.output_scores import load_latent_output
    from saesteer.steering.eval.judge import SentenceJudge
    from saesteer.modeling.lm import load_model

    stats = load_latent_stats(a.stats or a.sae)
    if stats is None:
        print(f"error: {a.stats or a.sae} has no latent statistics; run `saesteer stats {a.sae}` first", file=sys.stderr)
        return 2
    if a.concepts:
        concepts = load_concepts(a.concepts)
        if a.only:
            concepts = [c for c in concepts if c.name in a.only]
    else:
        if not (a.positive and a.negative):
            print("error: give --concepts FILE, or --positive and --negative sentences", file=sys.stderr)
            return 2
        concepts = [Concept(a.name, a.positive, a.negative, a.latent, a.keyword or [])]
    if a.latent is not None:
        for c in concepts:
            c.latent = a.latent
    methods = tuple(a.method or (AXBENCH_METHODS if a.axbench else METHODS))
    if a.mix_latents is not None and a.mix_latents < 1:
        print(f"error: --mix-latents must be at least 1, not {a.mix_latents}", file=sys.stderr)
        return 2
    output = load_latent_output(a.stats or a.sae) if "latent_output" in methods else None
    if "latent_output" in methods and output is None:
        print(f"error: latent_output needs output scores; run `saesteer stats {a.sae} --output-scores` first", file=sys.stderr)
        return 2
    # prompting has no strength: one point whatever the grid
    strengths = {m: tuple(a.strengths) if a.strengths and m != "prompting" else DEFAULT_STRENGTHS[m] for m in methods}
    prompts = tuple(a.prompt or []) + tuple(json.loads(Path(a.prompts).read_text()) if a.prompts else ())
    prompts = prompts or NEUTRAL_PROMPTS
    cfg = SweepConfig(methods=methods, strengths=strengths, prompts=prompts, max_new_tokens=a.max_new_tokens,
                      batch_size=a.batch_size, fluency_budget=a.fluency_budget, judge_threshold=a.judge_threshold,
                      mix_latents=MIX_LATENTS if a.mix_latents is None else a.mix_latents, positions=a.positions,
                      mix_signs=a.mix_signs, mix_max_frequency=a.mix_max_frequency, mix_fit_steps=a.mix_fit_steps,
                      repetition_penalty=a.repetition_penalty)
    sae = load_any(a.sae, dtype=torch.float32)
    model, tok = load_model(a.model, a.gguf_file)
    judge = SentenceJudge(a.judge)
    reports = [sweep(model, tok, sae, stats, c, judge, cfg, sae_id=Path(a.sae).name, output=output and output[0]) for c in concepts]
    paths = write_reports(reports, a.out)
    if "plot" not in paths:
        print("matplotlib is not installed: no plot (pip install 'saesteer[eval]')", file=sys.stderr)
    print("\n\n".join(markdown_report(reports).split("\n\n")[:2]))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``eval``, ``latents``, ``stats`` and ``eval-steering`` subcommands."""
    e = sub.add_parser("eval", help="evaluate an SAE: L0, NMSE, explained variance, CE loss recovered, dead latents")
    add_model_args(e)
    e.add_argument("sae", help="SAE folder")
    e.add_argument("--data", required=True, help="text source: a folder of {split}.jsonl.gz (e.g. a built corpus), a .jsonl(.gz) or .txt file, or an HF dataset id")
    e.add_argument("--split", default="validation")
    e.add_argument("--n-tokens", type=int, default=100_000, help="tokens for the reconstruction figures")
    e.add_argument("--ce-tokens", type=int, default=16_384, help="tokens for CE loss recovered")
    e.add_argument("--json", default=None, help="write the figures to this JSON file")
    e.add_argument("--markdown", default=None, help="write the figures as a Markdown table to this file")
    e.set_defaults(fn=cmd_eval)

    lt = sub.add_parser("latents", help="find latents: by contrast (--positive/--negative), by their top contexts (--search), or show one (--show)")
    add_model_args(lt)
    lt.add_argument("sae", help="SAE folder")
    lt.add_argument("--positive", nargs="+", default=None, help="texts that carry the concept")
    lt.add_argument("--negative", nargs="+", default=None, help="neutral texts")
    lt.add_argument("--search", default=None, help="a word or phrase to find in the latents' top activating contexts (needs `saesteer stats`)")
    lt.add_argument("--show", type=int, default=None, help="print one latent's statistics and top contexts")
    lt.add_argument("--top", type=int, default=10)
    lt.set_defaults(fn=cmd_latents)

    st = sub.add_parser("stats", help="latent statistics (frequency, typical and max activation, top contexts) saved with the SAE")
    add_model_args(st)
    st.add_argument("sae", help="SAE folder")
    st.add_argument("--data", default=None, help="text source: a folder of {split}.jsonl.gz (e.g. a built corpus), a .jsonl(.gz) or .txt file, or an HF dataset id (not needed with --output-scores)")
    st.add_argument("--split", default="validation")
    st.add_argument("--n-tokens", type=int, default=100_000)
    st.add_argument("--context-size", type=int, default=128)
    st.add_argument("--top-contexts", type=int, default=5)
    st.add_argument("--out", default=None, help="folder for the files (default: the SAE folder)")
    st.add_argument("--output-scores", action="store_true",
                    help="instead: each latent's logit-lens top tokens and output score (Arad et al. 2025), "
                         "saved as latent_output.safetensors and latent_top_tokens.json")
    st.add_argument("--amplification", type=float, default=10.0, help="--output-scores: alpha, in multiples of the "
                    "largest latent activation at the prompt's last position")
    st.add_argument("--logit-lens-k", type=int, default=20, help="--output-scores: logit-lens tokens per latent")
    st.add_argument("--batch-size", type=int, default=128, help="--output-scores: latents per forward pass")
    st.set_defaults(fn=cmd_stats)

    es = sub.add_parser("eval-steering", help="sweep steering strength: concept, fluency and relevance per method")
    add_model_args(es)
    es.add_argument("sae", help="SAE folder, any supported format (with latent statistics: see `saesteer stats`)")
    es.add_argument("--stats", default=None, help="folder of the latent statistics if not the SAE's (`saesteer stats --out`)")
    es.add_argument("--concepts", default=None, help="JSON file: a concept {name, positive, negative, latent?, keywords?} or a list")
    es.add_argument("--only", nargs="+", default=None, help="concept names to run from --concepts")
    es.add_argument("--name", default="concept")
    es.add_argument("--positive", nargs="+", default=None, help="sentences that carry the concept")
    es.add_argument("--negative", nargs="+", default=None, help="neutral contrast sentences")
    es.add_argument("--keyword", action="append", default=None, help="a word that marks the concept (repeatable)")
    es.add_argument("--latent", type=int, default=None, help="the concept latent (default: found by contrast)")
    es.add_argument("--axbench", action="store_true", help="the AxBench comparison: latents chosen by input score, by output "
                    "score and by concept search, against mean-difference vectors and prompting (needs `saesteer stats "
                    "--output-scores`; latents chosen by their measured effect: --method latent_effect)")
    es.add_argument("--method", action="append", default=None, choices=["latent_clamp", "latent_add", "mean_diff", "decoder", "latent_input", "latent_output",
                                                                              "latent_search", "latent_effect", "latent_mix", "prompting"],
                    help="repeatable; default latent_clamp, latent_add, mean_diff, decoder (--axbench: its five)")
    es.add_argument("--strengths", type=float, nargs="+", default=None,
                    help="one grid for every method (latent methods: x typical activation; vectors: x residual norm)")
    es.add_argument("--prompt", action="append", default=None, help="a neutral chat prompt (repeatable; default: 8 built-in ones)")
    es.add_argument("--prompts", default=None, help="a JSON file holding a list of neutral chat prompts (added to --prompt's), e.g. "
                    "benchmarks/neutral_prompts.json: 32, the first 8 the built-in ones")
    es.add_argument("--max-new-tokens", type=int, default=32)
    es.add_argument("--batch-size", type=int, default=32)
    es.add_argument("--mix-latents", type=int, default=None, help=f"latents --method latent_mix sums (default {DEFAULT_MIX_LATENTS}, as concept search)")
    es.add_argument("--mix-signs", default=DEFAULT_MIX_SIGNS, choices=MIX_SIGNS,
                    help="latent_mix's latents: those the concept turns up (positive, as concept search) or up and down (both)")
    es.add_argument("--mix-max-frequency", type=float, default=None,
                    help="latent_mix leaves out latents firing on more than this fraction of tokens (default: none left out)")
    es.add_argument("--mix-fit-steps", type=int, default=DEFAULT_MIX_FIT_STEPS,
                    help=f"fit_mix steps reweighting latent_mix by the model's output (default {DEFAULT_MIX_FIT_STEPS}, as concept search; 0: none)")
    es.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="every answer's repetition penalty, unsteered ones too (as a request's; default 1: off)")
    es.add_argument("--positions", default="all", choices=get_args(PositionKind),
                    help="where every steering edit applies (as a request's positions; default all)")
    es.add_argument("--fluency-budget", type=float, default=3.0, help="summary: best concept rate at perplexity <= this x unsteered")
    es.add_argument("--judge-threshold", type=float, default=0.4, help="the concept counts as present above this judge similarity")
    es.add_argument("--judge", default=None, help="sentence encoder folder or hub id (default: the shipped all-MiniLM-L6-v2)")
    es.add_argument("--out", required=True, help="folder for report.json, report.md and concept_vs_fluency.png")
    es.set_defaults(fn=cmd_eval_steering)
