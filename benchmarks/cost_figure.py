"""The exact-diagonal benchmark's costs as a figure: time per batch against a training step.

One panel per model of ``benchmarks/results/exact_diagonal_gpu.json`` (or ``--json``): a bar per
implementation that ran (ours per batch of a pass, BackPACK, curvlinops, nngeometry, the
``vmap`` route and the per-input reference loop), its ``ratio_to_step`` on a log axis, ours in
one colour and the other libraries in another. Skipped implementations have no bar.

    python -m benchmarks.cost_figure            # -> docs/assets/exact_diagonal_gpu_cost.png
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from matplotlib.figure import Figure

from lightning_fisher.diagnostics.figures import save_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON = os.path.join(ROOT, "benchmarks", "results", "exact_diagonal_gpu.json")
PNG = os.path.join(ROOT, "docs", "assets", "exact_diagonal_gpu_cost.png")
#: (implementation, label) in the order drawn; ours per batch of a pass (plan and proof reused)
BARS = (
    ("ours-exact-later", "ours exact"),
    ("ours-empirical-later", "ours empirical"),
    ("ours-hutchinson", "ours Hutchinson (1 probe)"),
    ("backpack-diagggn-exact", "BackPACK DiagGGNExact"),
    ("backpack-sum-grad-squared", "BackPACK SumGradSquared"),
    ("curvlinops-hutchinson-diag", "curvlinops Hutchinson (1 matvec)"),
    ("nngeometry-pmatdiag", "nngeometry PMatDiag"),
    ("vmap-exact", "torch.func vmap, exact"),
    ("reference-loop", "per-input loop, exact"),
)


def cost_figure(report: dict[str, Any]) -> Figure:
    """One horizontal bar chart per model: each implementation's time over a training step's."""
    models = list(dict.fromkeys(r["model"] for r in report["rows"]))
    ratios = {(r["model"], r["implementation"]): r["ratio_to_step"] for r in report["rows"]}
    fig = Figure(figsize=(10, 1.2 + 1.9 * len(models)))
    axes = fig.subplots(len(models), 1, squeeze=False)[:, 0]
    for ax, model in zip(axes, models):
        shown = [
            (lab, ratios[model, impl], impl) for impl, lab in BARS if ratios.get((model, impl))
        ]
        ys = list(range(len(shown)))[::-1]
        colours = ["tab:blue" if impl.startswith("ours") else "tab:grey" for *_, impl in shown]
        ax.barh(ys, [v for _, v, _ in shown], color=colours)
        for y, (_, v, _) in zip(ys, shown):
            ax.text(v * 1.08, y, f"{v:.3g}x", va="center", fontsize=7)
        ax.set_yticks(ys, [lab for lab, _, _ in shown], fontsize=7)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(model, fontsize=9, loc="left")
        ax.set_xlim(0.5, max(v for _, v, _ in shown) * 4)
    axes[-1].set_xlabel(
        "time per batch / a training step on the same batch (log scale; 1 = a step)"
    )
    fig.suptitle(f"Fisher diagonal, cost per batch on {report['device']}", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=JSON, help="an exact_diagonal report")
    ap.add_argument("--out", default=PNG, help="the PNG to write")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        report = json.load(f)
    print("wrote", save_png(cost_figure(report), args.out, dpi=100))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
