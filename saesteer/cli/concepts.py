"""``saesteer concepts search | list | save``: named concepts and concept search on a running server."""

from __future__ import annotations

import argparse
import sys


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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``concepts`` subcommand."""
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
