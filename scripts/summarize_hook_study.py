"""Summarise scripts/hook_point_study.sh: reconstruction and steerability per block, as a Markdown table.

    python scripts/summarize_hook_study.py [--study .cache/hook_study] [--budget 3.0]

For each block it reads the SAE's ``figures.json`` (written by ``saesteer train``) and the
``report.json`` of ``saesteer eval-steering``, and prints, per steering family, the mean over the
concepts of the best judge concept rate and keyword rate within ``--budget`` x the unsteered
perplexity, plus the best rate at any perplexity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saesteer.steering.eval.summary import resummarize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default=".cache/hook_study")
    ap.add_argument("--budget", type=float, default=3.0)
    a = ap.parse_args()
    root = Path(a.study)
    blocks = sorted(int(p.name.removeprefix("sae_l")) for p in root.glob("sae_l*") if (p / "figures.json").is_file())
    print("| block | L0 | NMSE | explained variance | CE loss recovered | delta LM loss | dead |")
    print("|---|---|---|---|---|---|---|")
    for b in blocks:
        f = json.loads((root / f"sae_l{b}" / "figures.json").read_text())
        print(f"| {b} | {f['l0']:.1f} | {f['nmse']:.3f} | {f['explained_variance']:.3f} | {f.get('ce_loss_recovered', float('nan')):.4f} | "
              f"{f.get('delta_lm_loss', float('nan')):.3f} | {100 * f['dead_fraction']:.1f} % |")
    print()
    rows = []
    for b in blocks:
        rp = root / f"steer_l{b}" / "report.json"
        if not rp.is_file():
            continue
        # concepts that name a fixed latent id belong to one SAE (the default); compare found latents only
        reports = [resummarize(r, a.budget) for r in json.loads(rp.read_text()) if r["concept"]["latent"] is None]
        methods = reports[0]["config"]["methods"]
        for m in methods:
            judge = sum(r["best"][m]["concept_rate"] for r in reports) / len(reports)
            kw = sum(r["best"][m]["keyword_rate"] or 0.0 for r in reports) / len(reports)
            anyp = sum(max(p["concept_rate"] for p in r["points"] if p["method"] in (m, "unsteered")) for r in reports) / len(reports)
            rows.append((b, m, judge, kw, anyp, len(reports)))
    print(f"| block | family | mean best judge rate (<= {a.budget:g}x perplexity) | mean best keyword rate (<= {a.budget:g}x) | "
          "mean best judge rate (any perplexity) | concepts |")
    print("|---|---|---|---|---|---|")
    for b, m, judge, kw, anyp, n in rows:
        print(f"| {b} | {m} | {judge:.2f} | {kw:.2f} | {anyp:.2f} | {n} |")


if __name__ == "__main__":
    main()
