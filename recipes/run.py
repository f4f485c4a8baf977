"""Command line for one continual-learning run from a config file.

    python -m recipes.run --config split_mnist --data-dir ../shared/data --method EXACT --lam 1e5

``--config`` takes a YAML path or the name of a file in ``recipes/configs`` (``split_digits``,
``split_mnist``, ``split_cifar10``, and the class-incremental ``class_incremental_split_mnist`` and
``class_incremental_split_cifar10``); every config field can be overridden by its flag (e.g.
``--scenario class`` for one head with every class active). Prints the
accuracy matrix, average accuracy, forgetting and backward transfer, and writes them as JSON to
``<output-dir>/results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from lightning_fisher import _json as strict_json

from .data import DataNotFoundError
from .runner import TABLE_METHODS, RecipeConfig, load_config, quiet_lightning, run_continual


def _parser_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse ``type`` and extra options for a config field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _parser_type(args[0])
    if origin is list:
        return args[0], {"nargs": "+"}
    if annotation is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    return annotation, {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.run",
        description="Task-incremental continual learning with optional EWC (lightning-fisher).",
    )
    parser.add_argument(
        "--config",
        default="split_digits",
        help="YAML config path or a name in recipes/configs (split_digits, split_mnist, "
        "split_cifar10, class_incremental_split_mnist, class_incremental_split_cifar10)",
    )
    hints = typing.get_type_hints(RecipeConfig)
    for f in dataclasses.fields(RecipeConfig):
        kind, extra = _parser_type(hints[f.name])
        if kind is not None:
            extra["type"] = kind
        if f.name == "method":
            extra["choices"] = list(TABLE_METHODS)
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag, dest=f.name, default=argparse.SUPPRESS, help=f"config `{f.name}`", **extra
        )
    return parser


def format_matrix(matrix: list[list[float]]) -> str:
    """The accuracy matrix as text: row i = after task i, column j = task j (percent)."""
    n = len(matrix)
    lines = ["after \\ task " + " ".join(f"{j:>6d}" for j in range(n))]
    for i, row in enumerate(matrix):
        cells = " ".join("     -" if v != v else f"{v:6.2f}" for v in row)  # NaN: not seen yet
        lines.append(f"{i:>12d} {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = vars(build_parser().parse_args(argv))
    cfg: RecipeConfig = load_config(args.pop("config"), **args)
    quiet_lightning()
    try:
        result = run_continual(cfg)
    except DataNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    result.pop("callback")
    result.pop("module")
    print(format_matrix(result["matrix"]))
    print(
        f"{cfg.dataset} {cfg.method} lam={cfg.lam:g} seed={cfg.seed}: average accuracy "
        f"{result['avg_acc']:.2f}%, forgetting {result['forgetting']:.2f}, backward transfer "
        f"{result['bwt']:.2f}, Fisher {sum(result['fisher_seconds']):.2f} s"
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        strict_json.dumps({"config": dataclasses.asdict(cfg), **result}, indent=2)
    )
    return result


if __name__ == "__main__":
    main()
