"""``saesteer convert``: an SAE checkpoint of any supported format, written in ours (SAELens layout)."""

from __future__ import annotations

import argparse
import sys

from ..io import SAEFormatError, save_sae
from . import FORMATS, load_any
from ._common import DTYPES


def add_convert_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``saesteer convert``'s arguments to ``p``: SRC, --format, --out, --hook-point, --dtype.

    Returns ``p``; wire it as ``add_convert_args(sub.add_parser("convert"))`` and
    ``set_defaults(fn=convert_cli)``. ``--dtype`` is one of float32, float16, bfloat16.
    """
    p.add_argument("src", help="foreign SAE checkpoint folder (or its params.npz / weights file)")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="source format (default: detect)")
    p.add_argument("--out", required=True, help="output folder (our format: SAELens layout)")
    p.add_argument("--hook-point", "--hook", dest="hook_point", default=None, help="hook point to record (default: the one the format implies); "
                   "for a sparsify run folder, the hook-point sub-folder to convert")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="dtype on disk (default: the source's)")
    return p


def convert_cli(args: argparse.Namespace) -> int:
    """``saesteer convert SRC --format auto|... --out DIR [--hook-point H] [--dtype D]``.

    Loads SRC with ``load_any`` (weight transforms in float64, one rounding to ``--dtype`` or the
    source dtype) and writes it with ``saesteer.sae.io.save_sae``.

    Returns:
        0 on success (prints the output folder and the SAE's shape); 2 with the reason on stderr
        if the source is refused (``SAEFormatError``; nothing is written then).

    Reference: sources as in ``load_any``; the output is our format (SAELens v6 layout,
    ``cfg.json`` + ``sae_weights.safetensors``), see ``saesteer.sae.io``.
    """
    try:
        sae = load_any(args.src, format=args.format, hook_point=args.hook_point, dtype=args.dtype)
    except SAEFormatError as e:
        print(f"saesteer convert: {e}", file=sys.stderr)
        return 2
    out = save_sae(sae, args.out)
    c = sae.cfg
    print(
        f"wrote {out}: {c.architecture} d_in={c.d_in} d_sae={c.d_sae}"
        + (f" k={c.k}" if c.k is not None else "")
        + f" hook_point={c.hook_point or '?'} dtype={c.dtype}"
    )
    return 0
