"""Reproduce van de Ven's (2025) EWC table: methods x lambda x seeds, resumable, in parallel.

    python -m recipes.reproduce --benchmark split_mnist --data-dir ../shared/data --workers 12
    python -m recipes.reproduce --benchmark split_cifar10 --data-dir ../shared/data --workers 8 \\
        --seeds 3 --span 2 --centers-from benchmarks/results/reproduce_split_mnist.json
    python -m recipes.reproduce --benchmark class_incremental_split_mnist \\
        --data-dir ../shared/data --workers 16 --threads 1 --accelerator cpu

The ``class_incremental_*`` benchmarks run the same protocol with one 10-way head (every class
active in training, in the Fisher and in the evaluation); their reports are named after the
benchmark and compare the Fisher methods with each other (nothing is published for them).

Protocol per method (every EWC row, plus NONE):

1. search: seed 0 over lambda = 10^(c - span * step) .. 10^(c + span * step) (``--step`` decades
   apart, 1 by default) around the method's centre c; while the best lambda sits at an edge of
   what was tried, the grid grows one step that way (``--max-extend`` times), so the chosen lambda
   is bracketed; with ``--flat-tolerance d`` it stops growing when the edge beats its neighbour by
   less than d points (a curve flat within the seeds' noise, where more lambdas would chase
   noise; the report marks such a lambda "edge, flat");
2. final: the best lambda on ``--seeds`` fresh seeds (1..S), which give the reported mean and
   standard error (seed 0 only selects lambda, so the mean carries no selection bias).

The class pairs are the config's ``class_order`` (``permuted`` per seed, as van de Ven's code, for
Split MNIST and CIFAR-10; ``--class-order sorted`` for 0-1, 2-3, ...); the default ``<name>`` is
``reproduce_<benchmark>`` with ``_permuted`` appended under the permuted order.

Every finished cell is appended to ``<name>.cells.jsonl`` at once; a rerun skips cells already
there (same settings), so a killed or time-limited run resumes where it stopped. After every cell
the report is rewritten: ``<name>.json`` (rows: method, best_lambda, mean_acc, sem, n_seeds,
fisher_seconds; ``comparisons``: EXACT vs EMPIRICAL, EXACT vs BATCHED and LOWER vs EXACT, paired
over the seeds they share), ``<name>.md`` and ``<name>_lambda.png`` (accuracy against lambda per
method). With ``--budget-minutes`` no cell starts after the budget and the report says ``partial``.
Cells run in ``--workers`` processes sharing one GPU; each preloads its data on the device once.

A method name ``M[b=K]`` (e.g. ``BATCHED[b=8]``) is method ``M`` with a Fisher batch size of ``K``
(``benchmarks/batched_lambda_scaling.py`` uses these).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

import lightning_fisher as lf
from lightning_fisher import _json as strict_json

from .data import Task, load_arrays
from .runner import TABLE_METHODS, build_tasks, load_config, quiet_lightning, run_continual

#: benchmark -> its config in recipes/configs
BENCHMARKS = {
    "split_mnist": "split_mnist",
    "split_cifar10": "split_cifar10",
    "split_digits": "split_digits",
    "class_incremental_split_mnist": "class_incremental_split_mnist",
    "class_incremental_split_cifar10": "class_incremental_split_cifar10",
}
#: report names that do not follow ``reproduce_<benchmark>[_permuted]``
REPORT_NAMES = {
    "class_incremental_split_mnist": "class_incremental_split_mnist",
    "class_incremental_split_cifar10": "class_incremental_split_cifar10",
}
#: van de Ven (2025), task-incremental, average accuracy (percent) at each method's best lambda.
PUBLISHED = {
    "split_mnist": {
        "EXACT": 99.12,
        "EXACT(n=500)": 98.93,
        "SAMPLE": 99.12,
        "EMPIRICAL": 99.12,
        "BATCHED": 99.11,
        "NONE": 85.41,
    },
    "split_cifar10": {
        "EXACT": 84.91,
        "EXACT(n=500)": 84.57,
        "SAMPLE": 83.77,
        "EMPIRICAL": 83.28,
        "BATCHED": 83.38,
        "NONE": 69.53,
    },
    "split_digits": {},  # not published: a quick check of the pipeline
    "class_incremental_split_mnist": {},
    "class_incremental_split_cifar10": {},
}
ROW_ORDER = (
    "EXACT",
    "EXACT(n=500)",
    "SAMPLE",
    "EMPIRICAL",
    "BATCHED",
    "HUTCHINSON",
    "SQUISHER",
    "LOWER",
    "UPPER",
    "NONE",
)
#: default run order: the baseline and the rows the acceptance compares first
PRIORITY = (
    "NONE",
    "EXACT",
    "EMPIRICAL",
    "BATCHED",
    "EXACT(n=500)",
    "SAMPLE",
    "HUTCHINSON",
    "SQUISHER",
    "LOWER",
    "UPPER",
)
#: log10 of the lambda each search starts around: the published ranges for the data-pass
#: estimators (HUTCHINSON is unbiased for EXACT's F, so the same scale). The Squisher's is not
#: published for this protocol; a short CPU run of Split MNIST found 1e4 good and 1e6 diverging
#: (Adam's second moment also holds the squared EWC gradient, so under online EWC each task's
#: Squisher grows with lambda times the previous one until it overflows). LOWER and UPPER bound
#: EXACT's F from below and above (with a two-unit head LOWER is F), so EXACT's scale.
CENTRES: dict[str, float] = {
    "EXACT": 5,
    "EXACT(n=500)": 5,
    "SAMPLE": 5,
    "HUTCHINSON": 5,
    "EMPIRICAL": 8,
    "BATCHED": 11,
    "SQUISHER": 4,
    "LOWER": 5,
    "UPPER": 5,
}
#: Class-incremental centres: four decades above the task-incremental ones, as van de Ven's code
#: defaults for Split MNIST (EWC lambda 1e9 class-incremental against 1e5 task-incremental,
#: params/param_values.py of GMvandeVen/continual-learning): holding an old task against a single
#: head trained on the new classes alone takes a far stronger penalty. The Squisher's grows less
#: (its online feedback overflows at large lambda). The driver widens each search (``--span``,
#: ``--max-extend``) until the best lambda is bracketed.
CLASS_IL_CENTRES: dict[str, float] = {**{m: c + 4 for m, c in CENTRES.items()}, "SQUISHER": 6}
#: Class-incremental CIFAR-10 centres: class-incremental Split MNIST's best lambdas moved by the
#: task-incremental gap between CIFAR-10 and MNIST (same methods, same protocol), so the search
#: starts near its answer (each CIFAR-10 cell is 10,000 ResNet steps).
CLASS_IL_CIFAR_CENTRES: dict[str, float] = {
    "EXACT": 3,
    "EXACT(n=500)": 3,
    "SAMPLE": 11,
    "EMPIRICAL": 13,
    "BATCHED": 13,
    "HUTCHINSON": 7,
    "SQUISHER": 2,
    "LOWER": 8,
    "UPPER": 4,
}
BENCHMARK_CENTRES = {
    "class_incremental_split_mnist": CLASS_IL_CENTRES,
    "class_incremental_split_cifar10": CLASS_IL_CIFAR_CENTRES,
}
#: pairs whose difference the reports state in words (first minus second)
COMPARISONS = (("EXACT", "EMPIRICAL"), ("EXACT", "BATCHED"), ("LOWER", "EXACT"))
#: ``M[b=K]``: method M with a Fisher batch size of K
FISHER_BATCH_VARIANT = re.compile(r"^(?P<method>.+)\[b=(?P<b>[0-9]+)\]$")
SEARCH_SEED = 0
#: config fields that change a cell's result; the cells file keeps one settings object per line.
SETTING_KEYS = (
    "dataset",
    "iters",
    "batch_size",
    "n_tasks",
    "max_train_per_task",
    "lr",
    "mode",
    "gamma",
    "reset_optimizer",
)
#: result-changing fields added later: in the settings only when they differ from these defaults,
#: so cells recorded before they existed still match.
OPTIONAL_SETTING_KEYS: dict[str, Any] = {
    "class_order": "sorted",
    "scenario": "task",
    "trace_ratio_to": None,
}


def cell_key(method: str, lam: float, seed: int) -> tuple[str, float, int]:
    return (method, float(f"{lam:.6g}"), seed)


def split_method(name: str) -> tuple[str, dict[str, Any]]:
    """A row name -> (the table method, config overrides): ``BATCHED[b=8]`` is ``BATCHED`` with
    ``fisher_batch_size=8``; a plain table name has no overrides."""
    m = FISHER_BATCH_VARIANT.match(name)
    if m:
        return m["method"], {"fisher_batch_size": int(m["b"])}
    return name, {}


def row_rank(method: str, methods: list[str]) -> tuple[int, int]:
    """Table order: the published rows first, then other names in the order given."""
    if method in ROW_ORDER:
        return (ROW_ORDER.index(method), 0)
    return (len(ROW_ORDER), methods.index(method) if method in methods else 0)


def missing_estimator(name: str) -> str | None:
    """The ``lf.estimate_fisher`` method a row needs and this lightning_fisher lacks, if any."""
    from lightning_fisher.estimators import METHODS

    estimator = TABLE_METHODS.get(split_method(name)[0], (None, {}))[0]
    if estimator in (None, "squisher") or estimator in METHODS:
        return None
    return estimator


def default_methods() -> list[str]:
    """PRIORITY without the rows whose estimator is missing (said on stdout)."""
    rows = []
    for m in PRIORITY:
        if (missing := missing_estimator(m)) is None:
            rows.append(m)
        else:
            print(f"skipping {m}: lf.estimate_fisher has no method {missing!r} here", flush=True)
    return rows


def check_methods(methods: Iterable[str]) -> None:
    """Refuse, before any cell runs, a row this version of lightning_fisher cannot compute."""
    from lightning_fisher.estimators import METHODS

    for name in methods:
        base, _ = split_method(name)
        if base not in TABLE_METHODS:
            raise SystemExit(
                f"error: unknown method {name!r}; choose from {', '.join(TABLE_METHODS)} "
                "(optionally with a Fisher batch size, e.g. BATCHED[b=8])."
            )
        if (missing := missing_estimator(name)) is not None:
            raise SystemExit(
                f"error: {name} needs lf.estimate_fisher(method={missing!r}), which this "
                f"version of lightning_fisher lacks (it has {', '.join(METHODS)})."
            )


# Workers ----------------------------------------------------------------------------------------
_TASKS: dict[str, list[Task]] = {}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere+/Hopper: TF32 for fp32 convs/matmuls
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    quiet_lightning()


def run_cell(
    config: str, overrides: dict[str, Any], method: str, lam: float, seed: int
) -> dict[str, Any]:
    """One run (a process-wide cache keeps each data set's task tensors, loaded once)."""
    base, extra = split_method(method)
    cfg = load_config(
        config,
        **{**overrides, **extra},
        method=base,
        lam=0.0 if base == "NONE" else lam,
        seed=seed,
    )
    # A per-seed class order makes the tasks themselves depend on the seed.
    per_seed = seed if cfg.class_order == "permuted" else None
    key = json.dumps([config, overrides, per_seed], sort_keys=True)
    if key not in _TASKS:
        _TASKS[key] = build_tasks(cfg)
    cell = {"method": method, "lam": float(f"{lam:.6g}"), "seed": seed}
    try:
        result = run_continual(cfg, _TASKS[key])
    except lf.FisherInputError as err:
        # E.g. a Fisher that overflowed at a huge lambda: the cell failed, the grid goes on.
        return {**cell, "avg_acc": None, "fisher_seconds": None, "error": str(err)}
    fisher = result["fisher_seconds"]
    return {
        "method": method,
        "lam": float(f"{lam:.6g}"),
        "seed": seed,
        "avg_acc": result["avg_acc"],
        "forgetting": result["forgetting"],
        "bwt": result["bwt"],
        "matrix": result["matrix"],
        "fisher_seconds": sum(fisher) / len(fisher) if fisher else None,
        "train_seconds": result["train_seconds"],
        **({"trace_ratios": result["trace_ratios"]} if result["trace_ratios"] else {}),
    }


# Planning ---------------------------------------------------------------------------------------
class Plan:
    """Decides which cells are still needed, from the cells done so far (so it resumes)."""

    def __init__(
        self,
        methods: Iterable[str],
        seeds: int,
        centres: dict[str, float],
        span: int,
        max_extend: int,
        lambdas: list[float] | None,
        reuse_search_seed: bool = False,
        step: float = 1.0,
        flat_tolerance: float | None = None,
    ) -> None:
        if not step > 0:
            raise SystemExit(f"error: --step must be a positive number of decades; got {step}.")
        if flat_tolerance is not None and not flat_tolerance >= 0:
            raise SystemExit(
                f"error: --flat-tolerance must be a non-negative number of points; got "
                f"{flat_tolerance}."
            )
        self.flat_tolerance = flat_tolerance
        self.methods = list(methods)
        first = SEARCH_SEED if reuse_search_seed else SEARCH_SEED + 1
        self.final_seeds = list(range(first, first + seeds))
        self.centres, self.span, self.max_extend, self.lambdas = centres, span, max_extend, lambdas
        self.step = step
        self.done: dict[tuple[str, float, int], dict[str, Any]] = {}

    def window(self, method: str) -> list[float]:
        if self.lambdas:
            return [float(f"{x:.6g}") for x in self.lambdas]
        c = self.centres[method]
        return [
            float(f"{10.0 ** (c + k * self.step):.6g}") for k in range(-self.span, self.span + 1)
        ]

    def search(self, method: str) -> dict[float, float]:
        """lambda -> average accuracy at the search seed (-inf for a failed run)."""
        return {
            k[1]: -math.inf if r["avg_acc"] is None else r["avg_acc"]
            for k, r in self.done.items()
            if k[0] == method and k[2] == SEARCH_SEED
        }

    def best_lambda(self, method: str) -> float | None:
        tried = self.search(method)
        return max(tried, key=lambda lam: (tried[lam], -lam)) if tried else None

    def needed(self, method: str) -> tuple[list[tuple[str, float, int]], bool]:
        """Cells this method needs next, and whether the search is finished."""
        if method == "NONE":
            return [cell_key("NONE", 0.0, s) for s in self.final_seeds], True
        window = self.window(method)
        tried = self.search(method)
        missing = [cell_key(method, lam, SEARCH_SEED) for lam in window if lam not in tried]
        if missing:
            return missing, False
        best = self.best_lambda(method)
        assert best is not None
        lo, hi = min(tried), max(tried)
        extended = len(tried) - len(window)
        if (
            extended < self.max_extend
            and not self.lambdas
            and best in (lo, hi)
            and not self.flat_at_edge(method)
        ):
            factor = 10.0**self.step
            nxt = best / factor if best == lo else best * factor
            return [cell_key(method, nxt, SEARCH_SEED)], False
        return [cell_key(method, best, s) for s in self.final_seeds], True

    def todo(self) -> list[tuple[str, float, int]]:
        cells: list[tuple[str, float, int]] = []
        for m in self.methods:
            cells += [c for c in self.needed(m)[0] if c not in self.done]
        # Methods in the order given, so a time-limited run finishes the first ones completely;
        # within a method the search comes first (it unlocks the seeds).
        return sorted(cells, key=lambda c: (self.methods.index(c[0]), c[2] != SEARCH_SEED))

    def final_runs(self, method: str) -> list[dict[str, Any]]:
        """The finished cells of the method's final seeds at its best lambda (empty while the
        search is still running)."""
        cells, searched = self.needed(method)
        return [self.done[c] for c in cells if c in self.done] if searched else []

    def final_accs(self, method: str) -> dict[int, float]:
        """Seed -> average accuracy at the best lambda (failed runs left out)."""
        return {
            r["seed"]: r["avg_acc"] for r in self.final_runs(method) if r["avg_acc"] is not None
        }

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for m in sorted(self.methods, key=lambda m: row_rank(m, self.methods)):
            _, searched = self.needed(m)
            best = 0.0 if m == "NONE" else self.best_lambda(m)
            runs = self.final_runs(m)
            accs = [r["avg_acc"] for r in runs if r["avg_acc"] is not None]
            fisher = [
                r["fisher_seconds"]
                for k, r in self.done.items()
                if k[0] == m and r["fisher_seconds"] is not None
            ]
            n = len(accs)
            mean = sum(accs) / n if n else None
            sem = (
                math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1) / n)
                if n > 1 and mean is not None
                else None
            )
            rows.append(
                {
                    "method": m,
                    "best_lambda": None if m == "NONE" else best,
                    "mean_acc": mean,
                    "sem": sem,
                    "n_seeds": n,
                    "n_failed": len(runs) - n,
                    "fisher_seconds": sum(fisher) / len(fisher) if fisher else None,
                    "search_acc": None
                    if m == "NONE" or best is None or not math.isfinite(self.search(m)[best])
                    else self.search(m)[best],
                    "lambda_bracketed": None if m == "NONE" else searched and self._bracketed(m),
                    "lambda_flat_at_edge": None if m == "NONE" else self.flat_at_edge(m),
                }
            )
        return rows

    def flat_at_edge(self, method: str) -> bool:
        """The best lambda is at an edge and beats its neighbour by less than
        ``flat_tolerance`` points (always False without a tolerance)."""
        tried = self.search(method)
        best = self.best_lambda(method)
        if self.flat_tolerance is None or best is None or len(tried) < 2:
            return False
        order = sorted(tried)
        if best not in (order[0], order[-1]):
            return False
        neighbour = order[1] if best == order[0] else order[-2]
        return tried[best] - tried[neighbour] < self.flat_tolerance

    def _bracketed(self, method: str) -> bool:
        tried = self.search(method)
        best = self.best_lambda(method)
        return len(tried) >= 3 and best not in (min(tried), max(tried))


# Reports ----------------------------------------------------------------------------------------
def device_name(accelerator: str = "auto") -> str:
    """What the cells ran on: the GPU's name, or the CPU when none is used (``--accelerator cpu``
    on a machine with a GPU included)."""
    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    import lightning

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "lightning_fisher": lf.__version__,
    }


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _mean_sem(xs: list[float]) -> tuple[float, float | None]:
    n = len(xs)
    mean = sum(xs) / n
    sem = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None
    return mean, sem


def compare(plan: Plan, a: str, b: str) -> dict[str, Any] | None:
    """``a`` against ``b`` at their best lambdas, in numbers and in one sentence.

    Over the final seeds both have, the difference is the mean of the per-seed differences
    d_s = acc_a(s) - acc_b(s) with standard error sd(d) / sqrt(n) (paired: both rows use the same
    seeds, hence the same task splits); with fewer than two shared seeds it is the difference of
    the means with sqrt(sem_a^2 + sem_b^2). It counts as a difference when |d| > 2 s.e.
    ``None`` while either row has no finished seed.
    """
    xa, xb = plan.final_accs(a), plan.final_accs(b)
    if not xa or not xb:
        return None
    mean_a, sem_a = _mean_sem(list(xa.values()))
    mean_b, sem_b = _mean_sem(list(xb.values()))
    shared = sorted(set(xa) & set(xb))
    if len(shared) >= 2:
        diff, se = _mean_sem([xa[s] - xb[s] for s in shared])
        paired, higher = True, sum(xa[s] > xb[s] for s in shared)
    else:
        diff = mean_a - mean_b
        se = None if sem_a is None or sem_b is None else math.hypot(sem_a, sem_b)
        paired, higher = False, None
    exceeds = se is not None and abs(diff) > 2 * se
    rows = {r["method"]: r for r in plan.rows()}
    fisher = {m: rows[m]["fisher_seconds"] for m in (a, b, "EMPIRICAL") if m in rows}

    def acc(mean: float, sem: float | None, n: int) -> str:
        return f"{mean:.2f}" + ("" if sem is None else f" ± {sem:.2f}") + f" ({n} seeds)"

    how = (
        f"paired over the {len(shared)} seeds both ran, {a} higher on {higher} of them"
        if paired
        else "difference of the means (not paired: fewer than two shared seeds)"
    )
    if se is None:
        verdict = "too few seeds for a standard error, so no conclusion"
    elif exceeds:
        verdict = f"the difference exceeds 2 s.e.: {a} is {'above' if diff > 0 else 'below'} {b}"
    else:
        verdict = f"within 2 s.e.: {a} and {b} are not told apart with these seeds"
    sentence = (
        f"{a} vs {b}: {a} {acc(mean_a, sem_a, len(xa))}, {b} {acc(mean_b, sem_b, len(xb))}; "
        f"{a} - {b} = {diff:+.2f}" + ("" if se is None else f" ± {se:.2f}") + f" points ({how}); "
        f"{verdict}."
    )
    costs = [f"{m} {fisher[m]:.3g} s" for m in fisher if fisher[m] is not None]
    if a == "LOWER" and len(costs) > 1:
        sentence += " Fisher time per task boundary: " + ", ".join(costs) + "."
    return {
        "a": a,
        "b": b,
        "mean_a": mean_a,
        "sem_a": sem_a,
        "mean_b": mean_b,
        "sem_b": sem_b,
        "diff": diff,
        "se": se,
        "paired": paired,
        "n_shared_seeds": len(shared),
        "a_higher_on": higher,
        "exceeds_2se": exceeds,
        "fisher_seconds": fisher,
        "sentence": sentence,
    }


def write_report(
    plan: Plan,
    benchmark: str,
    out: Path,
    name: str,
    settings: dict[str, Any],
    command: str,
    partial: bool,
    accelerator: str = "auto",
) -> None:
    rows = plan.rows()
    published = PUBLISHED[benchmark]
    for r in rows:
        p = published.get(r["method"])
        r["published_acc"] = p
        r["diff_to_published"] = None if p is None or r["mean_acc"] is None else r["mean_acc"] - p
    grid = sorted(
        ({k: v for k, v in r.items() if k != "matrix"} for r in plan.done.values()),
        key=lambda r: (row_rank(r["method"], plan.methods), r["lam"], r["seed"]),
    )
    comparisons = [c for a, b in COMPARISONS if (c := compare(plan, a, b)) is not None]
    class_il = settings.get("scenario") == "class"
    doc = {
        "command": command,
        "device": device_name(accelerator),
        "versions": versions(),
        "settings": settings,
        "partial": partial,
        "rows": rows,
        "comparisons": comparisons,
        "grid": grid,
        "notes": (
            "mean_acc: average test accuracy over the 5 tasks after the last one (percent), mean over "
            "fresh seeds at the lambda chosen on seed 0; sem: standard error of that mean; "
            + (
                "class-incremental: one head, every class active in training, in the Fisher and "
                "in the evaluation (a test input is classified among all classes); "
                if class_il
                else ""
            )
            + "comparisons: paired over the seeds both rows ran; "
            "fisher_seconds: mean wall time of one Fisher computation (one per task boundary). "
            "Adam's state is carried across tasks unless settings.reset_optimizer is true."
            + (
                " CIFAR-10 here is a JPEG (quality ~75) copy, not the official pickles."
                if "cifar" in benchmark
                else ""
            )
        ),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(strict_json.dumps(doc, indent=2))
    lines = [
        f"{'Partial results (budget reached). ' if partial else ''}Average accuracy (%) over the 5 "
        f"tasks, "
        + (
            "class-incremental (one head, all classes active in training, Fisher and test)"
            if class_il
            else "task-incremental"
        )
        + f", {settings['iters']} iterations per task, Adam "
        f"{'reset per task' if settings['reset_optimizer'] else 'carried across tasks'}"
        f"{', class order ' + settings['class_order'] if 'class_order' in settings else ''}; mean ± "
        f"s.e.m. over seeds {plan.final_seeds} at the best lambda (chosen on seed {SEARCH_SEED}).",
        "",
        "| method | best lambda | accuracy (%) | seeds |"
        + (" published (%) |" if published else "")
        + " Fisher time (s) |",
        "|---|---|---|---|" + ("---|" if published else "") + "---|",
    ]
    for r in rows:
        lam = "—" if r["best_lambda"] is None else f"1e{math.log10(r['best_lambda']):.0f}"
        if r["best_lambda"] is not None and not r["lambda_bracketed"]:
            lam += " (edge, flat)" if r.get("lambda_flat_at_edge") else " (edge)"
        acc = _fmt(r["mean_acc"], ".2f") + ("" if r["sem"] is None else f" ± {r['sem']:.2f}")
        lines.append(
            f"| {r['method']} | {lam} | {acc} | {r['n_seeds']} | "
            + (f"{_fmt(r['published_acc'], '.2f')} | " if published else "")
            + f"{_fmt(r['fisher_seconds'], '.3f')} |"
        )
    if comparisons:
        lines += [""] + [f"- {c['sentence']}" for c in comparisons]
    lines += ["", f"Device: {doc['device']}."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot_lambda(plan, rows, out / f"{name}_lambda.png", benchmark)


def plot_lambda(plan: Plan, rows: list[dict[str, Any]], path: Path, benchmark: str) -> None:
    """Accuracy at the search seed against lambda, one line per method; NONE as a dashed line."""
    try:
        import matplotlib
    except ImportError:  # the tables matter more than the figure on a bare GPU machine
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in sorted(plan.methods, key=lambda m: row_rank(m, plan.methods)):
        tried = plan.search(m) if m != "NONE" else {}
        if tried:
            lams = sorted(x for x in tried if math.isfinite(tried[x]))
            ax.plot(lams, [tried[x] for x in lams], marker="o", ms=3, label=m)
    none = next((r for r in rows if r["method"] == "NONE" and r["mean_acc"] is not None), None)
    if none:
        # NONE has no lambda: its line is the reported mean, over every final seed
        label = f"NONE (no EWC), mean of {none['n_seeds']} seeds"
        ax.axhline(none["mean_acc"], color="k", ls="--", lw=1, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("lambda")
    ax.set_ylabel("average accuracy (%), seed 0")
    ax.set_title(f"{benchmark}: EWC accuracy against lambda")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Main -------------------------------------------------------------------------------------------
def read_cells(
    path: Path, settings: dict[str, Any]
) -> dict[tuple[str, float, int], dict[str, Any]]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("settings") == settings:
                    done[cell_key(r["method"], r["lam"], r["seed"])] = r
    return done


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipes.reproduce", description=__doc__.split("\n")[0]
    )
    p.add_argument("--benchmark", choices=list(BENCHMARKS), default="split_mnist")
    p.add_argument(
        "--data-dir", default="../shared/data", help="folder holding mnist/ and cifar10/"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(ROW_ORDER),
        help="in priority order: a time-limited run completes the first ones first (default: "
        "every row whose estimator this lightning_fisher has, NONE and EXACT first)",
    )
    p.add_argument(
        "--step", type=float, default=1.0, help="decades between neighbouring lambdas searched"
    )
    p.add_argument("--seeds", type=int, default=5, help="fresh seeds at the best lambda")
    p.add_argument(
        "--span", type=int, default=3, help="decades searched each side of a method's centre"
    )
    p.add_argument(
        "--max-extend", type=int, default=4, help="extra decades when the best is at an edge"
    )
    p.add_argument(
        "--flat-tolerance",
        type=float,
        help="stop widening a search whose best lambda, at an edge, beats its neighbour by less "
        "than this many accuracy points (default: widen up to --max-extend)",
    )
    p.add_argument(
        "--lambdas", type=float, nargs="+", help="one fixed grid for every method instead"
    )
    p.add_argument(
        "--centres-from",
        "--centers-from",
        dest="centres_from",
        help="a previous report JSON whose best lambdas centre the search",
    )
    p.add_argument(
        "--reuse-search-seed",
        action="store_true",
        help="count seed 0 (which chose lambda) among the final seeds: one run fewer per method, "
        "slightly optimistic",
    )
    p.add_argument("--workers", type=int, default=1, help="parallel processes (they share one GPU)")
    p.add_argument(
        "--threads", type=int, help="torch threads per worker (default: cores / workers)"
    )
    p.add_argument(
        "--budget-minutes", type=float, help="start no cell after this; write a partial report"
    )
    p.add_argument("--iters", type=int, help="iterations per task (default: the config's 2000)")
    p.add_argument("--max-train-per-task", type=int, help="subsample training data (quick checks)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument(
        "--reset-optimizer",
        action="store_true",
        help="a fresh Adam per task (default: the config's; the published protocol carries it)",
    )
    p.add_argument(
        "--class-order",
        help="which classes form each task: permuted (a random permutation per seed, as van de "
        "Ven's code; the MNIST and CIFAR-10 configs' default), sorted (0-1, 2-3, ...) or e.g. "
        "4,6,0,5,3,9,2,7,8,1",
    )
    p.add_argument("--results-dir", default="benchmarks/results")
    p.add_argument(
        "--name",
        help="report name (default reproduce_<benchmark>, with _permuted under --class-order "
        "permuted, the configs' default; the class_incremental_* benchmarks' own name)",
    )
    return p


def centres(args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = dict(BENCHMARK_CENTRES.get(args.benchmark, CENTRES))
    if args.centres_from:
        prev = Path(args.centres_from)
        if not prev.exists():
            raise SystemExit(
                f"error: --centres-from {prev} does not exist; run that benchmark first."
            )
        for row in json.loads(prev.read_text())["rows"]:
            if row.get("best_lambda"):
                step = args.step
                out[row["method"]] = round(math.log10(row["best_lambda"]) / step) * step
    return out


def execute(
    plan: Plan,
    config: str,
    overrides: dict[str, Any],
    workers: int,
    threads: int,
    over_budget: Callable[[], bool],
    record: Callable[[dict[str, Any]], None],
) -> None:
    """Run the plan's cells until none is left (or the budget is over), ``workers`` at a time,
    handing each finished cell to ``record`` (which must add it to ``plan.done``)."""
    if workers <= 1:
        _init_worker(threads)
        while (todo := plan.todo()) and not over_budget():
            m, lam, seed = todo[0]
            record(run_cell(config, overrides, m, lam, seed))
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        running: dict[Future[dict[str, Any]], tuple[str, float, int]] = {}
        while True:
            if not over_budget():
                for c in plan.todo():
                    if len(running) >= workers:
                        break
                    if c not in running.values():
                        running[pool.submit(run_cell, config, overrides, *c)] = c
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                running.pop(fut)
                record(fut.result())


def settings_of(cfg: Any) -> dict[str, Any]:
    """The result-changing settings of a config, as the cells file records them."""
    settings = {k: getattr(cfg, k) for k in SETTING_KEYS}
    settings.update(
        {k: getattr(cfg, k) for k, d in OPTIONAL_SETTING_KEYS.items() if getattr(cfg, k) != d}
    )
    return settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    quiet_lightning()
    start = time.monotonic()
    overrides: dict[str, Any] = {"data_dir": args.data_dir, "accelerator": args.accelerator}
    if args.iters is not None:
        overrides["iters"] = args.iters
    if args.max_train_per_task is not None:
        overrides["max_train_per_task"] = args.max_train_per_task
    if args.reset_optimizer:
        overrides["reset_optimizer"] = True
    if args.class_order is not None:
        overrides["class_order"] = args.class_order
    if args.methods is None:
        args.methods = default_methods()
    check_methods(args.methods)
    config = BENCHMARKS[args.benchmark]
    cfg = load_config(config, **overrides)
    settings = settings_of(cfg)
    # Runs under van de Ven's per-seed class pairs and under the sorted pairs are separate tables.
    suffix = "_permuted" if cfg.class_order == "permuted" else ""
    name = args.name or REPORT_NAMES.get(args.benchmark, f"reproduce_{args.benchmark}{suffix}")
    out = Path(args.results_dir)
    cells_path = out / f"{name}.cells.jsonl"
    plan = Plan(
        args.methods,
        args.seeds,
        centres(args),
        args.span,
        args.max_extend,
        args.lambdas,
        args.reuse_search_seed,
        args.step,
        args.flat_tolerance,
    )
    plan.done = read_cells(cells_path, settings)
    command = "python -m recipes.reproduce " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        # Fail fast on bad data paths, and decode CIFAR-10 once here for every worker.
        load_arrays(cfg.dataset, cfg.data_dir, cfg.download, cfg.cache_dir)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{name}: {len(plan.done)} cells already done in {cells_path}", flush=True)

    def over_budget() -> bool:
        return (
            args.budget_minutes is not None and time.monotonic() - start > 60 * args.budget_minutes
        )

    def record(result: dict[str, Any]) -> None:
        result["settings"] = settings
        plan.done[cell_key(result["method"], result["lam"], result["seed"])] = result
        out.mkdir(parents=True, exist_ok=True)
        with cells_path.open("a") as f:
            f.write(strict_json.dumps(result) + "\n")
        print(
            f"[{time.monotonic() - start:7.0f}s] {result['method']:>13} lam={result['lam']:<8.0e} "
            f"seed={result['seed']} acc={_fmt(result['avg_acc'], '.2f')} "
            f"fisher={_fmt(result['fisher_seconds'], '.2f')}s {result.get('error', '')}",
            flush=True,
        )
        write_report(
            plan,
            args.benchmark,
            out,
            name,
            settings,
            command,
            partial=bool(plan.todo()),
            accelerator=args.accelerator,
        )

    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    execute(plan, config, overrides, args.workers, threads, over_budget, record)
    partial = bool(plan.todo())
    write_report(plan, args.benchmark, out, name, settings, command, partial, args.accelerator)
    print((out / f"{name}.md").read_text())
    return {"rows": plan.rows(), "partial": partial}


if __name__ == "__main__":
    main()
