"""How the Fisher estimators' scales relate on the demo's network, at a few stages of training.

    python -m recipes.lambda_scale            # about 20 s on one CPU core

Trains Split Digits' first task (the demo's config) for a few step counts and prints, on that
task's training set, the mean of 1 - p(true label), tr(EMPIRICAL) / tr(EXACT) and, for each
Fisher batch size b, b * tr(BATCHED_b) / tr(EMPIRICAL): the factors EWC's λ must be divided by
when the estimator changes (docs/estimators.md, "How λ transfers").
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import lightning_fisher as lf

from .data import task_loader
from .runner import build_tasks, load_config, quiet_lightning, run_continual


def measure(steps: int, batch_sizes: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
    """Trains task 0 of Split Digits for ``steps`` steps and compares the estimators' traces."""
    cfg = load_config("split_digits", iters=steps, seed=seed, accelerator="cpu")
    task = build_tasks(cfg)[0]
    module = run_continual(cfg, tasks=[task])["module"].eval()
    classes = list(task.classes)
    with torch.no_grad():
        p = torch.softmax(module(task.x_train)[:, classes], dim=1)
    target = (task.y_train.unsqueeze(1) == torch.tensor(classes)).float().argmax(dim=1)

    def trace(method: str, b: int = 32) -> float:
        loader = task_loader(task.x_train, task.y_train, b)
        return lf.estimate_fisher(module, loader, method=method, classes=classes).trace()

    exact, empirical = trace("exact"), trace("empirical")
    return {
        "steps": steps,
        "mean_eps": float(1 - p.gather(1, target[:, None]).mean()),  # eps = 1 - p(true label)
        "empirical_over_exact": empirical / exact,
        "b_batched_over_empirical": {b: b * trace("batched", b) / empirical for b in batch_sizes},
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m recipes.lambda_scale")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 30, 1000])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quiet_lightning()
    rows = [measure(s, tuple(args.batch_sizes)) for s in args.steps]
    bs = args.batch_sizes
    print(
        f"{'steps':>6} {'mean 1-p_y':>10} {'EMP/EXACT':>10} "
        + " ".join(f"{f'b*BATCHED_{b}/EMP':>16}" for b in bs)
    )
    for r in rows:
        print(
            f"{r['steps']:>6} {r['mean_eps']:>10.3g} {r['empirical_over_exact']:>10.3g} "
            + " ".join(f"{r['b_batched_over_empirical'][b]:>16.3g}" for b in bs)
        )
    return rows


if __name__ == "__main__":
    main()
