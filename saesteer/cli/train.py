"""``saesteer collect | train | calibrate | finetune``: activations collected, an SAE trained,
its threshold calibrated, and its KL fine-tune."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_args


def cmd_collect(a: argparse.Namespace) -> int:
    from saesteer.sae.activations import collect_activations, iter_texts, save_activations
    from saesteer.modeling.lm import load_model

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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``collect``, ``train``, ``calibrate`` and ``finetune`` subcommands."""
    from saesteer.sae.model import ARCHITECTURES

    c = sub.add_parser("collect", help="collect activations at a hook point into a safetensors file")
    add_model_args(c)
    c.add_argument("--hook-point", "--hook", dest="hook_point", action="append", default=None,
                   help="hook point (repeatable: one pass collects them all; --out is then a folder)")
    c.add_argument("--data", required=True, help="text source: a folder of {split}.jsonl.gz (e.g. a built corpus), a .jsonl(.gz) or .txt file, or an HF dataset id")
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
    add_model_args(t)  # defaults None: the config file's model/gguf_file, else the default LM
    t.add_argument("--config", default=None,
                   help="YAML (.yaml/.yml) or JSON (.json) file of TrainConfig and run fields (hook_point, data, acts, "
                        "val_acts, model, gguf_file, out_dtype, val_tokens, ce_tokens, out, ...)")
    t.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="set any config field, e.g. --set batch_size=2048 (repeatable; named flags win)")
    t.add_argument("--hook-point", "--hook", dest="hook_point", default=None, help="hook point (default blocks.10.hook_resid_post)")
    t.add_argument("--data", default=None, help="text source, as for collect (needed unless --acts, --val-acts and --ce-tokens 0)")
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
    add_model_args(ft)
    ft.add_argument("sae", help="SAE folder")
    ft.add_argument("--data", required=True, help="text source, as for collect (its train split; figures on validation)")
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
