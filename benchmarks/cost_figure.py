"""The GPU benchmarks' costs as figures: time against a training step, on a log axis.

* ``exact_diagonal_gpu_cost.png``: one panel per model of ``exact_diagonal_gpu.json``, a bar per
  implementation that ran (ours per batch of a pass, BackPACK, curvlinops, nngeometry, the
  ``vmap`` route and the per-input reference loop), ours in one colour and the other libraries
  in another; skipped implementations have no bar;
* ``lm_fisher_scale_cost.png``: one panel per model of ``lm_fisher_scale.json``, a bar per Fisher
  row (method and granularity) and the EWC step.

    python -m benchmarks.cost_figure            # -> benchmarks/results/*_cost.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from lightning_fisher.diagnostics.figures import save_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
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


def _panels(
    panels: list[tuple[str, list[tuple[str, float, str]]]], title: str, height: float
) -> Figure:
    """One horizontal bar chart per (title, bars) panel, bars (label, ratio, colour), on one
    shared log axis of ratios to a training step."""
    fig = Figure(figsize=(10, 1.2 + height * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    top = max([v for _, bars in panels for _, v, _ in bars] or [1.0]) * 4
    for ax, (name, bars) in zip(axes, panels):
        ys = list(range(len(bars)))[::-1]
        ax.barh(ys, [v for _, v, _ in bars], color=[c for *_, c in bars])
        for y, (_, v, _) in zip(ys, bars):
            ax.text(v * 1.08, y, f"{v:.3g}x", va="center", fontsize=7)
        ax.set_yticks(ys, [lab for lab, _, _ in bars], fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(0.3, top)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(name, fontsize=9, loc="left")
    axes[-1].set_xlabel(
        "time per batch / a training step on the same batch (log scale; 1 = a step)"
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def cost_figure(report: dict[str, Any]) -> Figure:
    """One horizontal bar chart per model: each implementation's time over a training step."""
    ratios = {(r["model"], r["implementation"]): r["ratio_to_step"] for r in report["rows"]}
    panels = [
        (
            model,
            [
                (label, ratios[model, impl], "tab:blue" if impl.startswith("ours") else "tab:grey")
                for impl, label in BARS
                if ratios.get((model, impl))
            ],
        )
        for model in dict.fromkeys(r["model"] for r in report["rows"])
    ]
    return _panels(panels, f"Fisher diagonal, cost per batch on {report['device']}", 1.9)


def lm_cost_figure(report: dict[str, Any]) -> Figure:
    """One horizontal bar chart per model: each row's time over the model's training step."""
    panels = [
        (
            model,
            [
                (_lm_label(r), r["ratio_to_step"], "tab:blue")
                for r in report["rows"]
                if r["model"] == model and r["ratio_to_step"] and r["method"] != "train-step"
            ],
        )
        for model in dict.fromkeys(r["model"] for r in report["rows"])
    ]
    s = report.get("settings", {})
    title = (
        f"Language-model Fisher, {s.get('batch')} x {s.get('seq_len')} tokens, {s.get('dtype')}, "
        f"{report['device']}"
    )
    return _panels(panels, title, 1.6)


def _lm_label(row: dict[str, Any]) -> str:
    if row["method"] == "backward":
        return "one backward of the batch"
    label = row["method"] + (f" ({row['granularity']})" if row.get("granularity") else "")
    note = row.get("note") or ""
    if "causal=False" in note:
        label += ", uncut"
    elif "causal cut" in note:
        label += ", causal cut"
    rounds = re.search(r"\((\d+) interleaved rounds\)", note)
    if rounds:
        label += f", {rounds.group(1)} rounds"
    return label


FIGURES = {
    "exact_diagonal_gpu": ("exact_diagonal_gpu_cost", cost_figure),
    "lm_fisher_scale": ("lm_fisher_scale_cost", lm_cost_figure),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=RESULTS, help="folder of the reports and figures")
    args = ap.parse_args(argv)
    for report_name, (figure_name, draw) in FIGURES.items():
        path = os.path.join(args.results, report_name + ".json")
        if not os.path.exists(path):
            print("no", path)
            continue
        with open(path) as f:
            report = json.load(f)
        out = os.path.join(args.results, figure_name + ".png")
        print("wrote", save_png(draw(report), out, dpi=100))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
