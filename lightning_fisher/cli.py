"""The ``lightning-fisher`` command (also ``python -m lightning_fisher``).

``lightning-fisher render FISHER.safetensors [MORE.safetensors ...] --out DIR`` draws, for every
saved ``FisherDiagonal``, the per-layer density of log10 of its diagonal (the figure
``FisherDiagnostics`` logs) to ``DIR/<file stem>_layer_density.png`` and prints a per-layer table
(entries, trace, fraction below the threshold). ``--history metrics.csv`` also draws the bounds over
training from the ``metrics.csv`` of a ``CSVLogger`` that ``FisherDiagnostics`` wrote to.
``lightning-fisher methods`` lists the registered estimators (also in ``--help``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence

from . import __version__

EXIT_USAGE = 2


def _read_history(path: str, prefix: str) -> list[dict[str, float]]:
    """One entry per row of ``metrics.csv`` that holds diagnostics, prefix stripped."""
    head = f"{prefix}/" if prefix else ""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            entry: dict[str, float] = {}
            for key, value in row.items():
                if key is None or value in (None, ""):
                    continue
                if key in ("step", "epoch"):
                    entry[key] = float(value)
                elif key.startswith(head) and "/trace/" not in key:
                    entry[key[len(head) :]] = float(value)
            if any("/" in k for k in entry):
                rows.append(entry)
    if not rows:
        raise ValueError(
            f"{path} has no '{head}...' diagnostics columns; was it written by FisherDiagnostics?"
        )
    return rows


def _render(args: argparse.Namespace) -> int:
    from .diagnostics import fraction_below, plot_bounds_history, plot_layer_density, save_png
    from .fisher_diagonal import FisherDiagonal

    # Check every input before writing anything, so that a bad argument leaves DIR untouched.
    missing = [
        p for p in [*args.files, *([args.history] if args.history else [])] if not os.path.isfile(p)
    ]
    if missing:
        print(f"lightning-fisher render: no such file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    if not args.threshold > 0 or args.dpi < 1:
        print("lightning-fisher render: --threshold and --dpi must be positive", file=sys.stderr)
        return EXIT_USAGE
    fishers = {}
    for path in args.files:
        try:
            fishers[path] = FisherDiagonal.load(path)
        except Exception as err:  # safetensors raises several types for a file that is not one
            print(
                f"lightning-fisher render: {path} is not a saved FisherDiagonal ({err})",
                file=sys.stderr,
            )
            return EXIT_USAGE
    try:
        history = _read_history(args.history, args.prefix) if args.history else None
    except (ValueError, csv.Error) as err:
        print(f"lightning-fisher render: {err}", file=sys.stderr)
        return EXIT_USAGE

    os.makedirs(args.out, exist_ok=True)
    for path, fd in fishers.items():
        stem = os.path.splitext(os.path.basename(path))[0]
        out = save_png(
            plot_layer_density(fd, args.threshold),
            os.path.join(args.out, f"{stem}_layer_density.png"),
            args.dpi,
        )
        print(
            f"{path}: method={fd.method}, n_samples={fd.n_samples}, trace={fd.trace():.6g} -> {out}"
        )
        below = fraction_below(fd, args.threshold)
        traces = fd.layer_traces()
        width = max(len("layer"), *(len(k) for k in traces))
        print(f"  {'layer':<{width}}  {'trace':>12}  {'< ' + format(args.threshold, 'g'):>10}")
        for layer, tr in traces.items():
            print(f"  {layer:<{width}}  {tr:>12.6g}  {below[layer]:>10.1%}")
    if history is not None:
        out = save_png(plot_bounds_history(history), os.path.join(args.out, "bounds.png"), args.dpi)
        print(f"{args.history}: {len(history)} evaluations -> {out}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from .estimators.registry import help_text

    print("Fisher estimators (method=...):")
    print(help_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .estimators.registry import help_text

    parser = argparse.ArgumentParser(
        prog="lightning-fisher",
        description="Fisher information tools.",
        epilog="Fisher estimators (method=...):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lightning-fisher {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser(
        "render",
        help="draw the diagnostics figures of saved Fisher diagonals",
        description="Draw the per-layer density of log10 of each saved FisherDiagonal, and the "
        "bounds over training from a CSVLogger's metrics.csv.",
    )
    render.add_argument(
        "files",
        nargs="+",
        metavar="FISHER.safetensors",
        help="files written by FisherDiagonal.save",
    )
    render.add_argument(
        "--out", required=True, metavar="DIR", help="folder for the PNG files (created if needed)"
    )
    render.add_argument(
        "--threshold",
        type=float,
        default=1e-5,
        help="entries below it count as negligible (default 1e-5)",
    )
    render.add_argument(
        "--history",
        metavar="metrics.csv",
        help="a CSVLogger metrics.csv with FisherDiagnostics scalars",
    )
    render.add_argument(
        "--prefix",
        default="fisher",
        help="the FisherDiagnostics prefix in --history (default fisher)",
    )
    render.add_argument(
        "--dpi", type=int, default=110, help="resolution of the PNG files (default 110)"
    )
    render.set_defaults(func=_render)
    methods = sub.add_parser(
        "methods",
        help="list the Fisher estimators: cost, labels, deterministic or stochastic",
        description="List the registered Fisher estimators.",
    )
    methods.set_defaults(func=_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-fisher`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
