"""``saesteer serve``: the steering server (its flags are ``server.config``'s settings)."""

from __future__ import annotations

import argparse


def cmd_serve(a: argparse.Namespace) -> int:
    from saesteer.server.app import serve_cli

    return serve_cli(a)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``serve`` subcommand."""
    s = sub.add_parser("serve", help="start the steering server")
    from saesteer.server.config import add_serve_args

    add_serve_args(s)
    s.set_defaults(fn=cmd_serve)
