"""BATCHED's lambda law: the best EWC lambda against the Fisher mini-batch size b.

On task-incremental Split MNIST (van de Ven's protocol, his class pairs per seed), BATCHED with
b in {1, 8, 32, 128, 512}: for each b the reproduction driver's cells (``recipes.reproduce``)
search lambda on seed 0 (bracketed, ``--step`` decades apart) and run the best lambda on fresh
seeds. At every task boundary of every cell the EXACT Fisher of the same trained network on the
same data is computed too, and tr(BATCHED_b) / tr(EXACT) is recorded. One command, resumable:

    python -m benchmarks.batched_lambda_scaling --data-dir ../shared/data --workers 16 \\
        --threads 1 --accelerator cpu

writes ``benchmarks/results/batched_lambda_scaling.{json,md,png}`` (and its ``.cells.jsonl``,
from which a rerun resumes). Rows: ``batch_size``, ``best_lambda``, ``mean_acc``, ``sem``,
``trace_ratio_to_exact`` (mean over the boundaries of the final seeds' runs), ``n_seeds``. The fit:
least squares of log10 best lambda on log10 b, lambda_b = 10^a * b^alpha, with alpha's standard
error; and the same for 1 / trace ratio (the scale BATCHED loses against EXACT).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from recipes import reproduce
from recipes.data import load_arrays
from recipes.runner import load_config, quiet_lightning

ROOT = Path(__file__).resolve().parents[1]

NAME = "batched_lambda_scaling"
BATCH_SIZES = (1, 8, 32, 128, 512)
#: log10 of BATCHED's best lambda at b = 128 on Split MNIST (reproduce_split_mnist_permuted.md);
#: the search for b starts at that times b / 128, the law a Fisher b times smaller would give.
ANCHOR_LOG10_LAMBDA = 12.0
ANCHOR_BATCH = 128


def variant(b: int) -> str:
    return f"BATCHED[b={b}]"


def search_centres(batch_sizes: list[int], anchor: float, step: float) -> dict[str, float]:
    """Each b's first search centre, on the lambda grid of ``step`` decades."""
    out = {}
    for b in batch_sizes:
        c = anchor + math.log10(b / ANCHOR_BATCH)
        out[variant(b)] = round(c / step) * step
    return out


def least_squares(xs: list[float], ys: list[float]) -> dict[str, Any] | None:
    """y = a + slope x by ordinary least squares, with the slope's standard error
    sqrt(s^2 / Sxx), s^2 = residual sum of squares / (n - 2) (None for n = 2)."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    rss = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    se = math.sqrt(rss / (n - 2) / sxx) if n > 2 else None
    return {"slope": slope, "slope_se": se, "intercept": intercept, "n_points": n}


def rows_of(plan: reproduce.Plan, batch_sizes: list[int]) -> list[dict[str, Any]]:
    by_method = {r["method"]: r for r in plan.rows()}
    rows = []
    for b in batch_sizes:
        r = by_method[variant(b)]
        runs = plan.final_runs(variant(b))
        ratios = [x for run in runs for x in run.get("trace_ratios") or [] if x is not None]
        per_task = [
            [run["trace_ratios"][t] for run in runs if run.get("trace_ratios")]
            for t in range(max((len(run.get("trace_ratios") or []) for run in runs), default=0))
        ]
        ratio = sum(ratios) / len(ratios) if ratios else None
        rows.append(
            {
                "batch_size": b,
                "best_lambda": r["best_lambda"],
                "mean_acc": r["mean_acc"],
                "sem": r["sem"],
                "trace_ratio_to_exact": ratio,
                "trace_ratio_per_task": [
                    sum(v for v in col if v is not None) / len(col) if col else None
                    for col in per_task
                ],
                # lambda on EXACT's scale: what lambda_b * tr(BATCHED_b) / tr(EXACT) comes to
                "lambda_times_ratio": None
                if ratio is None or r["best_lambda"] is None
                else r["best_lambda"] * ratio,
                "n_seeds": r["n_seeds"],
                "lambda_bracketed": r["lambda_bracketed"],
                "search_acc": r["search_acc"],
                "fisher_seconds": r["fisher_seconds"],
            }
        )
    return rows


def fit_law(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """lambda_b = 10^a b^alpha and 1 / trace ratio = 10^c b^beta, by least squares in log10."""
    with_lambda = [r for r in rows if r["best_lambda"]]
    lam = least_squares(
        [math.log10(r["batch_size"]) for r in with_lambda],
        [math.log10(r["best_lambda"]) for r in with_lambda],
    )
    with_ratio = [r for r in rows if r["trace_ratio_to_exact"]]
    tr = least_squares(
        [math.log10(r["batch_size"]) for r in with_ratio],
        [-math.log10(r["trace_ratio_to_exact"]) for r in with_ratio],
    )
    return {
        "alpha": None if lam is None else lam["slope"],
        "alpha_se": None if lam is None else lam["slope_se"],
        "log10_lambda_at_b1": None if lam is None else lam["intercept"],
        "n_points": 0 if lam is None else lam["n_points"],
        "batch_sizes_used": [r["batch_size"] for r in with_lambda],
        "all_bracketed": all(r["lambda_bracketed"] for r in with_lambda),
        "beta": None if tr is None else tr["slope"],
        "beta_se": None if tr is None else tr["slope_se"],
        "log10_inverse_ratio_at_b1": None if tr is None else tr["intercept"],
    }


def law_sentence(fit: dict[str, Any]) -> str:
    if fit["alpha"] is None:
        return "Too few batch sizes with a best lambda for a fit."

    def pm(x: float, se: float | None) -> str:
        return f"{x:.2f}" + ("" if se is None else f" ± {se:.2f}")

    text = (
        f"Fitted law: best lambda ∝ b^alpha with alpha = {pm(fit['alpha'], fit['alpha_se'])} (least "
        f"squares on log10 best lambda against log10 b, {fit['n_points']} batch sizes"
        + ("" if fit["all_bracketed"] else "; some best lambdas at the edge of their grid")
        + ")"
    )
    if fit["alpha_se"] is not None:
        consistent = abs(fit["alpha"] - 1) <= 2 * fit["alpha_se"]
        text += (
            f"; alpha = 1 (lambda ∝ b) is {'within' if consistent else 'outside'} 2 s.e. of the fit"
        )
    if fit["beta"] is not None:
        text += (
            f". tr(EXACT) / tr(BATCHED_b) ∝ b^beta with beta = {pm(fit['beta'], fit['beta_se'])} on "
            "the same networks"
        )
    return text + "."


def write_report(
    plan: reproduce.Plan,
    batch_sizes: list[int],
    out: Path,
    name: str,
    settings: dict[str, Any],
    search: dict[str, Any],
    command: str,
    partial: bool,
    accelerator: str = "auto",
) -> None:
    rows = rows_of(plan, batch_sizes)
    fit = fit_law(rows)
    grid = sorted(
        ({k: v for k, v in r.items() if k != "matrix"} for r in plan.done.values()),
        key=lambda r: (
            reproduce.split_method(r["method"])[1]["fisher_batch_size"],
            r["lam"],
            r["seed"],
        ),
    )
    doc = {
        "command": command,
        "device": reproduce.device_name(accelerator),
        "versions": reproduce.versions(),
        "settings": settings,
        "search": search,
        "partial": partial,
        "rows": rows,
        "fit": fit,
        "grid": grid,
        "notes": (
            "BATCHED with Fisher mini-batch size b (batch_size); best_lambda chosen on seed 0 "
            "(grid spacing search.step decades, widened until bracketed); mean_acc ± sem: "
            "average accuracy over the 5 tasks (percent) on fresh seeds at that lambda; "
            "trace_ratio_to_exact: tr(BATCHED_b) / tr(EXACT) from the same network at each task "
            "boundary (EXACT computed on the same data right after the consolidation), mean over "
            "the boundaries of the final seeds' runs; fit: least squares in log10, lambda_b = "
            "10^log10_lambda_at_b1 * b^alpha and 1 / trace_ratio = 10^log10_inverse_ratio_at_b1 "
            "* b^beta."
        ),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2))
    lines = [
        f"{'Partial results (budget reached). ' if partial else ''}BATCHED's best lambda against "
        f"its Fisher batch size b: task-incremental {settings['dataset']}, "
        f"{settings['iters']} iterations per task, class order {settings.get('class_order', 'sorted')}; "
        f"lambda chosen on seed {reproduce.SEARCH_SEED}, accuracy mean ± s.e.m. over seeds "
        f"{plan.final_seeds}; trace ratio tr(BATCHED_b) / tr(EXACT) on the same networks.",
        "",
        "| b | best lambda | accuracy (%) | seeds | tr(BATCHED_b) / tr(EXACT) | lambda x ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lam = "—" if r["best_lambda"] is None else f"{r['best_lambda']:.3g}"
        if r["best_lambda"] is not None and not r["lambda_bracketed"]:
            lam += " (edge)"
        acc = reproduce._fmt(r["mean_acc"], ".2f") + (
            "" if r["sem"] is None else f" ± {r['sem']:.2f}"
        )
        lines.append(
            f"| {r['batch_size']} | {lam} | {acc} | {r['n_seeds']} | "
            f"{reproduce._fmt(r['trace_ratio_to_exact'], '.3g')} | "
            f"{reproduce._fmt(r['lambda_times_ratio'], '.3g')} |"
        )
    lines += ["", law_sentence(fit), "", f"Device: {doc['device']}."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(rows, fit, out / f"{name}.png")


def plot(rows: list[dict[str, Any]], fit: dict[str, Any], path: Path) -> None:
    """Best lambda and 1 / trace ratio against b, log-log, with the fitted law."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    pts = [(r["batch_size"], r["best_lambda"]) for r in rows if r["best_lambda"]]
    if pts:
        ax.plot(*zip(*pts), "o", color="C0", label="best lambda (seed 0)")
    if fit["alpha"] is not None and pts:
        bs = [min(p[0] for p in pts), max(p[0] for p in pts)]
        ax.plot(
            bs,
            [10 ** (fit["log10_lambda_at_b1"] + fit["alpha"] * math.log10(b)) for b in bs],
            "-",
            color="C0",
            lw=1,
            label=f"fit: lambda ∝ b^{fit['alpha']:.2f}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Fisher batch size b")
    ax.set_ylabel("best lambda", color="C0")
    inv = [
        (r["batch_size"], 1 / r["trace_ratio_to_exact"]) for r in rows if r["trace_ratio_to_exact"]
    ]
    ax2 = ax.twinx()
    if inv:
        ax2.plot(*zip(*inv), "s--", color="C1", label="tr(EXACT) / tr(BATCHED_b)")
    ax2.set_yscale("log")
    ax2.set_ylabel("tr(EXACT) / tr(BATCHED_b)", color="C1")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="upper left")
    ax.set_title("BATCHED: best lambda and lost Fisher scale against b")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.batched_lambda_scaling", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", default="split_mnist", help="recipe config (task-incremental)")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    p.add_argument("--seeds", type=int, default=5, help="fresh seeds at each best lambda (>= 3)")
    p.add_argument("--span", type=int, default=2, help="grid steps searched each side of a centre")
    p.add_argument("--step", type=float, default=0.5, help="decades between lambdas searched")
    p.add_argument("--max-extend", type=int, default=8, help="extra steps when best is at an edge")
    p.add_argument(
        "--anchor",
        type=float,
        default=ANCHOR_LOG10_LAMBDA,
        help=f"log10 of the expected best lambda at b = {ANCHOR_BATCH} (search centres scale "
        "with b from it)",
    )
    p.add_argument("--lambdas", type=float, nargs="+", help="one fixed grid for every b instead")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--threads", type=int, help="torch threads per worker (default: cores / workers)"
    )
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--budget-minutes", type=float)
    p.add_argument("--iters", type=int, help="iterations per task (default: the config's)")
    p.add_argument("--max-train-per-task", type=int, help="subsample training data (quick checks)")
    p.add_argument("--n-tasks", type=int, help="first n tasks only (quick checks)")
    p.add_argument("--results-dir", default="benchmarks/results")
    p.add_argument("--name", default=NAME)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    quiet_lightning()
    start = time.monotonic()
    if any(b < 1 for b in args.batch_sizes):
        raise SystemExit(f"error: --batch-sizes must be positive; got {args.batch_sizes}.")
    overrides: dict[str, Any] = {
        "data_dir": args.data_dir,
        "accelerator": args.accelerator,
        "trace_ratio_to": "exact",
    }
    for key in ("iters", "max_train_per_task", "n_tasks"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    cfg = load_config(args.config, **overrides)
    if cfg.scenario != "task":
        raise SystemExit(f"error: {args.config} is not task-incremental (scenario {cfg.scenario}).")
    settings = reproduce.settings_of(cfg)
    search = {"step": args.step, "span": args.span, "max_extend": args.max_extend}
    methods = [variant(b) for b in sorted(set(args.batch_sizes))]
    plan = reproduce.Plan(
        methods,
        args.seeds,
        search_centres(args.batch_sizes, args.anchor, args.step),
        args.span,
        args.max_extend,
        args.lambdas,
        step=args.step,
    )
    out = Path(args.results_dir)
    cells_path = out / f"{args.name}.cells.jsonl"
    plan.done = reproduce.read_cells(cells_path, settings)
    command = "python -m benchmarks.batched_lambda_scaling " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    try:
        load_arrays(cfg.dataset, cfg.data_dir, cfg.download, cfg.cache_dir)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{args.name}: {len(plan.done)} cells already done in {cells_path}", flush=True)
    batch_sizes = sorted(set(args.batch_sizes))

    def over_budget() -> bool:
        return (
            args.budget_minutes is not None and time.monotonic() - start > 60 * args.budget_minutes
        )

    def record(result: dict[str, Any]) -> None:
        result["settings"] = settings
        plan.done[reproduce.cell_key(result["method"], result["lam"], result["seed"])] = result
        out.mkdir(parents=True, exist_ok=True)
        with cells_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        ratios = [f"{x:.3g}" for x in result.get("trace_ratios") or [] if x is not None]
        print(
            f"[{time.monotonic() - start:7.0f}s] {result['method']:>14} lam={result['lam']:<9.3g} "
            f"seed={result['seed']} acc={reproduce._fmt(result['avg_acc'], '.2f')} "
            f"ratios={','.join(ratios)} {result.get('error', '')}",
            flush=True,
        )
        write_report(
            plan,
            batch_sizes,
            out,
            args.name,
            settings,
            search,
            command,
            bool(plan.todo()),
            args.accelerator,
        )

    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    reproduce.execute(plan, args.config, overrides, args.workers, threads, over_budget, record)
    partial = bool(plan.todo())
    write_report(
        plan, batch_sizes, out, args.name, settings, search, command, partial, args.accelerator
    )
    print((out / f"{args.name}.md").read_text())
    rows = rows_of(plan, batch_sizes)
    return {"rows": rows, "fit": fit_law(rows), "partial": partial}


if __name__ == "__main__":
    main()
