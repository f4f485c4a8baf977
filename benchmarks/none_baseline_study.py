"""Why our Split MNIST "no EWC" (NONE) row is above van de Ven's published 85.41.

Collects the NONE cells that ``python -m recipes.reproduce --methods NONE`` wrote for each
candidate protocol difference, writes ``benchmarks/results/none_baseline_study.json`` and prints
the tables of ``none_baseline_study.md`` (whose conclusions are written by hand):

    for each variant in VARIANTS (CPU, one core, low priority):
        nice -n 10 taskset -c 1 python -m recipes.reproduce --benchmark split_mnist \\
            --data-dir ../shared/data --methods NONE --workers 1 --threads 1 --accelerator cpu \\
            --results-dir /tmp/nonestudy --name <name> <flags>
    python -m benchmarks.none_baseline_study --cells-dir /tmp/nonestudy

The GPU rows of the committed reproduction reports (``reproduce_split_mnist*.json``) are added
as reference rows.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path
from typing import Any

import torch

from lightning_fisher import _json as strict_json
from recipes.data import permuted_class_order

ROOT = Path(__file__).resolve().parents[1]

RESULTS = Path(__file__).parent / "results"
PUBLISHED = 85.41  # van de Ven (2025), Split MNIST, no EWC, mean over seeds 1-30
BASE = (
    "nice -n 10 taskset -c 1 python -m recipes.reproduce --benchmark split_mnist "
    "--data-dir ../shared/data --methods NONE --workers 1 --threads 1 --accelerator cpu "
    "--results-dir /tmp/nonestudy"
)
#: name -> (what differs from our protocol, extra flags)
VARIANTS: dict[str, tuple[str, str]] = {
    "none_sorted": ("ours: classes 0-1, 2-3, ... for every seed; Adam carried", "--seeds 5"),
    "none_permuted": (
        "van de Ven's class order: a random permutation of the classes per seed; Adam carried",
        "--seeds 30 --class-order permuted",
    ),
    "none_permuted_adam_reset": (
        "permuted class order, a fresh Adam per task (not the protocol: a sensitivity check)",
        "--seeds 5 --class-order permuted --reset-optimizer",
    ),
}
#: reference rows from the committed reproduction reports (GPU, sorted class order)
REFERENCE = {
    "reproduce_split_mnist": "committed reproduction, sorted order, Adam carried (GPU)",
    "reproduce_split_mnist_adam_reset": "committed reproduction, sorted order, Adam reset (GPU)",
}


def stats(accs: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample standard deviation / sqrt(n)), as the reproduction uses."""
    n = len(accs)
    mean = sum(accs) / n
    sem = math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1) / n) if n > 1 else None
    return mean, sem


def read_none(path: Path) -> list[dict[str, Any]]:
    """The NONE cells of a cells file, one per seed (the last one written wins)."""
    cells: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r["method"] == "NONE" and r["avg_acc"] is not None:
                cells[r["seed"]] = r
    return [cells[s] for s in sorted(cells)]


def tasks_of(cell: dict[str, Any]) -> list[list[int]]:
    if cell["settings"].get("class_order") == "permuted":
        order = permuted_class_order(10, cell["seed"])
    else:
        order = list(range(10))
    return [order[2 * t : 2 * t + 2] for t in range(5)]


def row(name: str, what: str, command: str, cells: list[dict[str, Any]], device: str) -> dict:
    accs = [c["avg_acc"] for c in cells]
    mean, sem = stats(accs)
    return {
        "variant": name,
        "what": what,
        "command": command,
        "device": device,
        "settings": cells[0]["settings"],
        "n_seeds": len(cells),
        "seeds": [c["seed"] for c in cells],
        "mean_acc": mean,
        "sem": sem,
        "diff_to_published": mean - PUBLISHED,
        "mean_forgetting": sum(c["forgetting"] for c in cells) / len(cells),
        "per_seed": [
            {
                "seed": c["seed"],
                "avg_acc": c["avg_acc"],
                "forgetting": c["forgetting"],
                "tasks": tasks_of(c),
                "final_task_acc": c["matrix"][-1],
            }
            for c in cells
        ],
    }


def position_table(rows: list[dict[str, Any]]) -> list[str]:
    """Mean final accuracy of each task position, per variant: where the forgetting happens."""
    lines = [
        "| variant | " + " | ".join(f"task {t + 1}" for t in range(5)) + " | average |",
        "|---|" + "---|" * 6,
    ]
    for r in rows:
        final = [s["final_task_acc"] for s in r["per_seed"]]
        cols = [sum(f[t] for f in final) / len(final) for t in range(5)]
        cells = " | ".join(f"{c:.1f}" for c in cols)
        lines.append(f"| {r['variant']} | {cells} | {r['mean_acc']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells-dir", default="/tmp/nonestudy")
    p.add_argument(
        "--device", default=f"cpu ({platform.machine()}), 1 core (taskset -c 1), nice 10"
    )
    args = p.parse_args(argv)
    import lightning

    rows = []
    for name, (what, flags) in VARIANTS.items():
        path = Path(args.cells_dir) / f"{name}.cells.jsonl"
        if path.exists() and (cells := read_none(path)):
            command = f"{BASE} --name {name} {flags}"
            rows.append(row(name, what, command, cells, args.device))
    for name, what in REFERENCE.items():
        report = json.loads((RESULTS / f"{name}.json").read_text())
        cells_path = RESULTS / f"{name}.cells.jsonl"
        cells = read_none(cells_path)
        rows.append(row(name, what, report["command"], cells, report["device"]))
    doc = {
        "command": "python -m benchmarks.none_baseline_study --cells-dir /tmp/nonestudy",
        "device": args.device,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
        },
        "published_none": PUBLISHED,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "none_baseline_study.json").write_text(strict_json.dumps(doc, indent=2) + "\n")
    lines = [
        "| variant | what differs | accuracy (%) | seeds | vs published 85.41 | forgetting | device |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sem = "" if r["sem"] is None else f" ± {r['sem']:.2f}"
        lines.append(
            f"| {r['variant']} | {r['what']} | {r['mean_acc']:.2f}{sem} | {r['n_seeds']} | "
            f"{r['diff_to_published']:+.2f} | {r['mean_forgetting']:.2f} | {r['device']} |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- {r['variant']}: `{r['command']}`" for r in rows]
    lines += ["", "Final accuracy (%) of each task after the last one, mean over seeds:", ""]
    lines += position_table(rows)
    print("\n".join(lines))  # the tables of none_baseline_study.md, whose prose is written by hand


if __name__ == "__main__":
    main()
