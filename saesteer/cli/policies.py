"""``saesteer policies train | check``: content-safety detector probes and policies files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_model_args


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
    from saesteer.modeling.lm import load_model
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``policies`` subcommand."""
    po = sub.add_parser("policies", help="content-safety policies: train a detector probe, or check a policies file")
    po.add_argument("action", choices=["train", "check"], help="train: a probe from labelled examples; check: a policies file")
    add_model_args(po)
    po.add_argument("--examples", default="pii", help="train: 'pii' (Faker-generated personal data, seeded), 'medical' (medical advice) or a "
                    "JSONL file of {text, spans: [[start, end], ...]} or {text, label: 0|1}")
    po.add_argument("--n", type=int, default=1200, help="train with 'pii': texts generated")
    po.add_argument("--kind", choices=["raw", "sae"], default="raw", help="train: probe on the raw activation or on SAE latents")
    po.add_argument("--sae", default=None, help="the SAE (spec as for serve; default the shipped one): its hook point, "
                    "and its latents for --kind sae")
    po.add_argument("--k", type=int, default=32, help="train --kind sae: latents of the sparse probe")
    po.add_argument("--chat-every", type=int, default=2, help="train: every Nth text is read as a chat answer (0: never)")
    po.add_argument("--negatives", default=None,
                    help="train: JSON lines of ordinary {text} documents whose passages are added as negatives (the shipped "
                    "probes: ../shared/corpus/train.jsonl.gz); unset: none")
    po.add_argument("--n-negatives", type=int, default=1200, help="train: passages taken from --negatives")
    po.add_argument("--chat-negatives", type=int, default=96,
                    help="train: the model's own answers to everyday questions added as negatives")
    po.add_argument("--seed", type=int, default=0)
    po.add_argument("--out", default=None, help="train: the probe file (.safetensors)")
    po.add_argument("--file", default=None, help="check: the policies file")
    po.add_argument("--concepts-dir", default=None, help="check: the concepts folder the server uses")
    po.set_defaults(fn=cmd_policies)
