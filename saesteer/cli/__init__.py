"""Command line: ``saesteer collect | train | calibrate | finetune | eval | latents | stats | eval-steering |
convert | corpus | concepts | policies | serve``.

Each module defines its subcommands' flags (``add_parser``) beside the functions that run them;
this one assembles the parser in the order ``saesteer --help`` lists them.
"""

from __future__ import annotations

import argparse

from . import concepts, convert, corpus, evaluate, policies, serve, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saesteer", description="Steer generative models through sparse autoencoders.")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (train, evaluate, convert, corpus, concepts, policies, serve):
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)
