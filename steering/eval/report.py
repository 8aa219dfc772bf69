"""A sweep's reports written out: the Markdown tables (every point, the best at equal fluency, the
AxBench scores), the concept-vs-fluency plot, and the files of ``saesteer eval-steering``
(``report.json``, ``report.md``, ``concept_vs_fluency.png``: ``write_reports``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .summary import axbench_summary


def markdown_report(reports: Sequence[dict]) -> str:
    """A Markdown section per concept (every sweep point) and a summary table at equal fluency."""
    lines = []
    if reports:
        budget = reports[0]["config"]["fluency_budget"]
        methods = reports[0]["config"]["methods"]
        lines += [
            f"### Best concept rate at perplexity <= {budget:g}x unsteered",
            "",
            "Each cell: judge concept rate / keyword rate (strength) of the best point within the fluency budget.",
            "",
            "| concept | " + " | ".join(methods) + " |",
            "|---|" + "---|" * len(methods),
        ]

        def cell(b):
            kw = "-" if b.get("keyword_rate") is None else f"{b['keyword_rate']:.2f}"
            return f"{b['concept_rate']:.2f} / {kw} (s={b['strength']:g})"

        for r in reports:
            cells = [cell(r["best"][m]) for m in methods]
            lines.append(f"| {r['concept']['name']} (latent {r['setup']['latent']}) | " + " | ".join(cells) + " |")
        lines.append("")
        if all("best_axbench" in r for r in reports):
            lines += axbench_table(reports)
    for r in reports:
        lines += [
            f"### {r['concept']['name']}: latent {r['setup']['latent']} (typical activation {r['setup']['typical_activation']:.3g}), "
            f"residual norm {r['setup']['resid_norm_mean']:.4g} at {r['sae']['hook_point']}",
            "",
        ]
        for rule, sel in r["setup"].get("selected", {}).items():
            scores = ", ".join(f"{k} {sel[k]:.3g}" for k in ("input_score", "output_score") if sel.get(k) is not None)
            lines.append(f"- latent_{rule}: latent {sel['latent']} (typical {sel['typical']:.3g}; {scores})")
        if r["setup"].get("selected"):
            lines.append("")
        lines += [
            "| method | strength | concept rate | similarity | margin | keyword rate | latent act | perplexity (x unsteered) | distinct-2 | relevance | AxBench |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in r["points"]:
            kw = "-" if p["keyword_rate"] is None else f"{p['keyword_rate']:.2f}"
            ax = "-" if p.get("axbench") is None else f"{p['axbench']:.3f}"
            lines.append(
                f"| {p['method']} | {p['strength']:g} | {p['concept_rate']:.2f} | {p['concept_similarity']:.3f} | "
                f"{p['concept_margin']:+.3f} | {kw} | {p['latent_activation']:.2f} | {p['perplexity']:.2f} "
                f"({p['perplexity_ratio']:.2f}) | {p['distinct_bigrams']:.2f} | {p['relevance']:.2f} | {ax} |"
            )
        lines.append("")
    return "\n".join(lines)


def axbench_table(reports: Sequence[dict]) -> list[str]:
    """Markdown lines: each concept's AxBench score per method (at its best strength), and the means."""
    methods = reports[0]["config"]["methods"]
    lines = [
        "### AxBench score (harmonic mean of concept, fluency, relevance) at each method's best strength",
        "",
        "Each cell: mean score (strength), concept rate, fluent rate.",
        "",
        "| concept | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for r in reports:
        cells = [f"{b['axbench']:.3f} (s={b['strength']:g}), {b['concept_rate']:.2f}, {b['fluent_rate']:.2f}"
                 for b in (r["best_axbench"][m] for m in methods)]
        lines.append(f"| {r['concept']['name']} | " + " | ".join(cells) + " |")
    summ = axbench_summary(reports)
    lines.append("| **mean** | " + " | ".join(f"**{summ[m]['axbench']:.3f}**" for m in methods) + " |")
    lines.append("| concept rate within the fluency budget, mean | " + " | ".join(f"{summ[m]['concept_rate_fluent']:.2f}" for m in methods) + " |")
    if summ[methods[0]]["matches_or_beats"] is not None:
        lines.append("| concepts where it matches or beats mean_diff at equal fluency | "
                     + " | ".join(f"{summ[m]['matches_or_beats']} of {summ[m]['concepts']}" for m in methods) + " |")
    if "concept_rate_at_budget" in summ[methods[0]]:
        lines.append("| concept rate at exactly the fluency budget (interpolated), mean | "
                     + " | ".join(f"{summ[m]['concept_rate_at_budget']:.3f}" for m in methods) + " |")
        if summ[methods[0]]["matches_or_beats_at_budget"] is not None:
            lines.append("| concepts where it matches or beats mean_diff at exactly the budget | "
                         + " | ".join(f"{summ[m]['matches_or_beats_at_budget']} of {summ[m]['concepts']}" for m in methods) + " |")
    lines.append("")
    return lines


def plot_report(reports: Sequence[dict], path: str | Path) -> Path:
    """Concept rate vs perplexity ratio across strengths, one panel per concept, a line per method (PNG).

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(reports)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, reports):
        base = next(p for p in r["points"] if p["strength"] == 0)
        for m in r["config"]["methods"]:
            pts = [base] + [p for p in r["points"] if p["method"] == m and p["strength"] != 0]
            ax.plot([p["perplexity_ratio"] for p in pts], [p["concept_rate"] for p in pts], marker="o", label=m)
            for p in pts[1:]:
                ax.annotate(f"{p['strength']:g}", (p["perplexity_ratio"], p["concept_rate"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_title(f"{r['concept']['name']} (latent {r['setup']['latent']})")
        ax.set_xlabel("perplexity / unsteered")
        ax.set_ylabel("concept rate (judge)")
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(reports: Sequence[dict], out: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (with matplotlib) ``concept_vs_fluency.png`` into ``out``.

    Returns:
        The paths written, by kind (``json``, ``markdown``, ``plot``; no ``plot`` without matplotlib).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(list(reports), indent=1))
    paths["markdown"].write_text(markdown_report(reports))
    try:
        paths["plot"] = plot_report(reports, out / "concept_vs_fluency.png")
    except ImportError:
        pass
    return paths
