"""The demo: Split Digits without EWC and with EWC on three Fisher estimators (exact, Hutchinson,
the Squisher), a table in the terminal and figures in ``outputs/demo/``.

    python -m recipes.demo            # or: make demo

Under two minutes on two CPU cores: scikit-learn's bundled 8x8 digits, no download. The settings
(``recipes/configs/split_digits.yaml``) make a network without EWC forget the first tasks, so the
table shows what EWC recovers.
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

#: (row name, table method, lambda). Each lambda is the best of a decade grid (1e2..1e6) searched
#: on seeds 0 and 1 of this config. The Fisher is averaged over inputs, so lambda * F is what the
#: penalty weighs: exact and Hutchinson estimate the same F (Hutchinson without bias) and share a
#: lambda; on these small, well-fitted tasks 1e4 sits a decade below the 1e5 that van de Ven's
#: Split MNIST wants. The Squisher is B x Adam's second moment along the training trajectory
#: (B = 64), another scale again, and its lambda is searched on its own (see docs/estimators.md).
DEMO_RUNS = (
    ("no EWC", "NONE", 0.0),
    ("EWC exact", "EXACT", 1e4),
    ("EWC hutchinson", "HUTCHINSON", 1e4),
    ("EWC squisher", "SQUISHER", 1e3),
)


def plot_matrices(results: list[dict[str, Any]], path: Path) -> None:
    """One accuracy-matrix heatmap per run: row = after training task i, column = task j."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.4), squeeze=False)
    # One colour scale for every panel, so that equal colours mean equal accuracies; it also
    # shows a few points of forgetting.
    low = min(90.0, *(float(np.nanmin(np.array(r["matrix"], dtype=float))) for r in results))
    for ax, r in zip(axes[0], results):
        m = np.array(r["matrix"], dtype=float)
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


def format_fisher_times(seconds: list[float]) -> str:
    """One line with the wall time of each Fisher computation (one per task boundary)."""
    each = ", ".join(f"{1000 * t:.1f}" for t in seconds)
    return f"Fisher computations: {each} ms (total {1000 * sum(seconds):.1f} ms)"


def format_table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'run':<16} {'lambda':>8} {'avg acc %':>9} {'forgetting':>10} {'BWT':>7} "
        f"{'Fisher s':>8} {'train s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['name']:<16} {r['lam']:>8.0e} {r['avg_acc']:>9.2f} {r['forgetting']:>10.2f} "
            f"{r['bwt']:>7.2f} {sum(r['fisher_seconds']):>8.3f} {r['train_seconds']:>7.1f}"
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
            print(f"  {format_fisher_times(r['fisher_seconds'])}", flush=True)
        results.append({"name": name, "method": method, "lam": lam, **r})
    print()
    print(format_table(results))
    plot_matrices(results, out / "accuracy_matrix.png")
    plot_fisher_density(fishers, out / "fisher_density.png")
    strict_json.write_json(out / "results.json", results)
    print(
        f"\nFigures: {out / 'accuracy_matrix.png'}, {out / 'fisher_density.png'}; "
        f"numbers: {out / 'results.json'} ({time.perf_counter() - start:.0f} s)"
    )
    return results


if __name__ == "__main__":
    main()
