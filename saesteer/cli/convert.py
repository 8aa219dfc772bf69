"""``saesteer convert``: an SAE checkpoint of another format in ours (``sae.formats.convert``)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``convert`` subcommand (its flags are ``sae.formats.convert``'s)."""
    from saesteer.sae.formats.convert import add_convert_args, convert_cli

    cv = sub.add_parser("convert", help="convert an SAE checkpoint of another format into ours (SAELens layout)")
    add_convert_args(cv)
    cv.set_defaults(fn=convert_cli)
