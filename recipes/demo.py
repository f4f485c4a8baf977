"""The demo: Split Digits without EWC and with EWC on three Fisher estimators (exact, Hutchinson,
the Squisher), a table in the terminal and figures in ``outputs/demo/``.

    python -m recipes.demo            # or: make demo

Runs in about a minute on two CPU cores: scikit-learn's bundled 8x8 digits, no download.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from lightning_fisher import _json as strict_json

from .runner import load_config, quiet_lightning, run_continual

#: (row name, table method, lambda). Lambdas sit in each estimator's good range on this benchmark:
#: exact and Hutchinson share a scale (Hutchinson is unbiased for the same F); the Squisher is
#: B x Adam's second moment, another scale (see docs/recipes.md).
DEMO_RUNS = (
    ("no EWC", "NONE", 0.0),
    ("EWC exact", "EXACT", 1e3),
    ("EWC hutchinson", "HUTCHINSON", 1e3),
    ("EWC squisher", "SQUISHER", 1e3),
)


def plot_matrices(results: list[dict[str, Any]], path: Path) -> None:
    """One accuracy-matrix heatmap per run: row = after training task i, column = task j."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.4), squeeze=False)
    for ax, r in zip(axes[0], results):
        m = np.array(r["matrix"], dtype=float)
        low = min(90.0, float(np.nanmin(m)))  # a scale that shows a few points of forgetting
        ax.imshow(np.ma.masked_invalid(m), vmin=low, vmax=100, cmap="viridis")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if not math.isnan(m[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="w" if m[i, j] < (low + 100) / 2 else "k",
                    )
        ax.set_title(f"{r['name']}\navg {r['avg_acc']:.1f}%", fontsize=9)
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("after training task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fisher_density(fishers: dict[str, Any], path: Path) -> None:
    """Density of log10 Fisher entries per layer for each EWC run's consolidated Fisher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fishers), figsize=(3.8 * len(fishers), 3.2), squeeze=False)
    for ax, (name, fd) in zip(axes[0], fishers.items()):
        for layer, tensor in fd.items():
            values = tensor.flatten()
            values = values[values > 0].log10()
            if values.numel() >= 100:  # weight matrices; a 10-entry bias is no density
                ax.hist(values.numpy(), bins=60, density=True, histtype="step", label=layer)
        ax.set_title(f"{name}: trace {fd.trace():.3g}", fontsize=9)
        ax.set_xlabel("log10 Fisher diagonal entry")
        ax.set_ylabel("density")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'run':<16} {'lambda':>8} {'avg acc %':>9} {'forgetting':>10} {'BWT':>7} {'Fisher s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['name']:<16} {r['lam']:>8.0e} {r['avg_acc']:>9.2f} {r['forgetting']:>10.2f} "
            f"{r['bwt']:>7.2f} {sum(r['fisher_seconds']):>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--iters", type=int, help="iterations per task (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    # Tiny networks gain nothing from intra-op threads, and on a busy machine idle-spinning
    # threads slow every step down; one thread is the fast choice here.
    torch.set_num_threads(args.threads)
    quiet_lightning()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"iters": args.iters} if args.iters else {}
    results, fishers = [], {}
    start = time.perf_counter()
    for name, method, lam in DEMO_RUNS:
        cfg = load_config("split_digits", method=method, lam=lam, seed=args.seed, **extra)
        print(f"Split Digits: {name} ...", flush=True)
        r = run_continual(cfg)
        ewc = r.pop("callback")
        r.pop("module")
        if ewc is not None:
            fishers[name] = ewc.fishers[0].to("cpu")  # online EWC: the accumulated Fisher
        results.append({"name": name, "method": method, "lam": lam, **r})
    print()
    print(format_table(results))
    plot_matrices(results, out / "accuracy_matrix.png")
    plot_fisher_density(fishers, out / "fisher_density.png")
    (out / "results.json").write_text(strict_json.dumps(results, indent=2))
    print(
        f"\nFigures: {out / 'accuracy_matrix.png'}, {out / 'fisher_density.png'}; "
        f"numbers: {out / 'results.json'} ({time.perf_counter() - start:.0f} s)"
    )
    return results


if __name__ == "__main__":
    main()
