"""Top eigenvalues of the Fisher: our Lanczos against curvlinops' on the same model and data.

Run in an environment with curvlinops (and scipy), with this package importable::

    PYTHONPATH=. python -m benchmarks.spectrum_timing   # -> results/spectrum_cpu.{json,md}

For every model, one fixed data set of ``--n`` random inputs in batches of ``--batch-size``:

* ``ours-lanczos``: ``lf.lanczos`` on ``lf.FisherOperator`` (exact Fisher-vector products
  J^T I(p) J v by double backward), m steps with full reorthogonalisation;
  ``ours-lanczos-rtol``: the same, stopping once the top-k Ritz residuals are below ``--rtol``
  times lambda_1 (what ``lf.top_eigenvalues`` does by default);
* ``curvlinops-eigsh``: curvlinops' ``GGNLinearOperator`` (cross-entropy, mean reduction, which
  is F) through ``to_scipy()`` into ``scipy.sparse.linalg.eigsh(which="LA")`` (ARPACK's
  implicitly restarted Lanczos, curvlinops' documented route to top eigenvalues);
* ``curvlinops-fast-lanczos``: curvlinops' ``fast_lanczos`` (Papyan 2020's Lanczos, no
  reorthogonalisation) with the same m steps on the same operator, top-k Ritz values.

``max_rel_diff`` is the largest |lambda - lambda_dense| / lambda_dense_1 over the top k against a
dense eigendecomposition of F from full per-input Jacobians, where the model is small enough
(``--dense-max-params``); null elsewhere. ``matvecs`` counts Fisher-vector products (a pass over
the data each). Seconds are medians of ``--repeats`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

import lightning_fisher as lf
from benchmarks.common import report_header, versions

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build(name: str, n: int) -> tuple[nn.Module, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp-20-32-32-10":
        model: nn.Module = nn.Sequential(
            nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
        )
        x = torch.randn(n, 20, generator=gen)
    elif name == "cnn-small-c10":
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )
        x = torch.randn(n, 3, 16, 16, generator=gen)
    elif name == "mlp-784-256-256-10":
        model = nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        x = torch.randn(n, 784, generator=gen)
    else:
        raise ValueError(name)
    y = torch.randint(0, 10, (n,), generator=gen)
    return model.eval(), x, y


def dense_top(model: nn.Module, x: Tensor, k: int) -> Tensor:
    """Top-k eigenvalues of F = (1/N) sum_x J^T I(p) J from full Jacobians, in float64."""
    m = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in m.named_parameters()}
    xd = x.double()

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(m, p, (xi[None],))[0]

    total = None
    for i in range(xd.shape[0]):
        jac = jacrev(f)(params, xd[i])
        J = torch.cat([jac[k].reshape(10, -1) for k in params], 1)
        p = torch.softmax(f(params, xd[i]), -1)
        term = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
        total = term if total is None else total + term
    assert total is not None
    return torch.linalg.eigvalsh(total / xd.shape[0]).flip(0)[:k]


class Counted:
    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, v: Any) -> Any:
        self.calls += 1
        return self.fn(v)


def run_ours(
    model: nn.Module, loader: Any, k: int, iters: int, rtol: float | None
) -> tuple[Tensor, int]:
    op = lf.FisherOperator(model, loader)
    res = lf.lanczos(op.matvec, op.dim, k, iters, device=op.device, dtype=torch.float64, rtol=rtol)
    return res.eigenvalues, op.n_products


def curvlinops_operator(model: nn.Module, batches: list[Any]) -> Any:
    from curvlinops import GGNLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(len(b[1]) for b in batches)
    return GGNLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="mean"),
        params,
        batches,
        check_deterministic=False,
        num_data=n,
    )


def run_eigsh(model: nn.Module, batches: list[Any], k: int, ncv: int) -> tuple[Tensor, int]:
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = curvlinops_operator(model, batches).to_scipy()
    counted = Counted(op.matvec)
    wrapped = LinearOperator(op.shape, matvec=counted, dtype=op.dtype)
    vals = eigsh(wrapped, k=k, which="LA", ncv=ncv, return_eigenvectors=False, tol=1e-8)
    return torch.from_numpy(vals.copy()).sort(descending=True).values, counted.calls


def run_fast_lanczos(model: nn.Module, batches: list[Any], k: int, ncv: int) -> tuple[Tensor, int]:
    from curvlinops.papyan2020traces.spectrum import fast_lanczos

    torch.manual_seed(0)
    evals, _ = fast_lanczos(curvlinops_operator(model, batches), ncv)
    return evals.double().sort(descending=True).values[:k], ncv


def write_markdown(report: dict[str, Any], path: str) -> None:
    rows = report["rows"]
    k, n = report["settings"]["k"], rows[0]["n_inputs"]
    lines = [
        *report_header(report["name"], report),
        f"Top {k} eigenvalues of F = (1/N) sum_x J^T I(p) J on N = {n} random inputs. "
        "`max rel diff` is against a dense eigendecomposition (small models only), "
        "`vs ours` against ours-lanczos; both over the top k, relative to the largest eigenvalue. "
        "Seconds are medians of interleaved rounds. curvlinops' `fast_lanczos` does not "
        "reorthogonalise, so converged eigenvalues come back as copies (its top-k list repeats "
        "lambda_1); curvlinops-eigsh is ARPACK's restarted Lanczos on curvlinops' operator.",
        "",
        "| model | params | implementation | seconds | matvecs | lambda_1 | lambda_k | "
        "max rel diff | vs ours |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = "-" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}"
        lines.append(
            f"| {r['model']} | {r['params']} | {r['implementation']} | {r['seconds']:.3f} | "
            f"{r['matvecs']} | {r['top_eigenvalues'][0]:.4e} | {r['top_eigenvalues'][-1]:.4e} | "
            f"{d} | {r['max_rel_diff_vs_ours']:.1e} |"
        )
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models",
        nargs="*",
        default=["mlp-20-32-32-10", "cnn-small-c10", "mlp-784-256-256-10"],
    )
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--iters", type=int, default=40, help="Lanczos steps (ours, fast_lanczos)")
    ap.add_argument("--ncv", type=int, default=20, help="ARPACK's number of Lanczos vectors")
    ap.add_argument("--rtol", type=float, default=1e-8, help="ours-lanczos-rtol: early stop")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-max-params", type=int, default=12_000)
    ap.add_argument("--out", default=os.path.join(RESULTS, "spectrum_cpu"))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json")
    args = ap.parse_args(argv)
    if args.markdown_only:
        with open(args.out + ".json") as f:
            write_markdown(json.load(f), args.out + ".md")
        return
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        model, x, y = build(name, args.n)
        loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
        batches = list(loader)
        P = sum(p.numel() for p in model.parameters())
        small = P <= args.dense_max_params  # noqa: SIM300
        dense = dense_top(model, x, args.k) if small else None
        impls: dict[str, Callable[[], tuple[Tensor, int]]] = {
            "ours-lanczos": partial(run_ours, model, batches, args.k, args.iters, None),
            "ours-lanczos-rtol": partial(run_ours, model, batches, args.k, args.iters, args.rtol),
            "curvlinops-eigsh": partial(run_eigsh, model, batches, args.k, args.ncv),
            "curvlinops-fast-lanczos": partial(
                run_fast_lanczos, model, batches, args.k, args.iters
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in impls}
        results: dict[str, tuple[Tensor, int]] = {}
        for _ in range(args.repeats):
            for impl, fn in impls.items():
                t0 = time.perf_counter()
                results[impl] = fn()
                times[impl].append(time.perf_counter() - t0)
        ref = results["ours-lanczos"][0]
        for impl in impls:
            vals, matvecs = results[impl]
            vals = vals.double()
            row = {
                "model": name,
                "params": P,
                "n_inputs": args.n,
                "implementation": impl,
                "seconds": statistics.median(times[impl]),
                "matvecs": matvecs,
                "top_eigenvalues": [float(v) for v in vals],
                "max_rel_diff": (
                    float(((vals - dense).abs() / dense[0]).max()) if dense is not None else None
                ),
                "max_rel_diff_vs_ours": float(((vals - ref).abs() / ref[0]).max()),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "name": os.path.basename(args.out),
        "command": "PYTHONPATH=. python -m benchmarks.spectrum_timing "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads)",
        "versions": versions("scipy", "curvlinops-for-pytorch"),
        "settings": {
            "k": args.k,
            "iters": args.iters,
            "ncv": args.ncv,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
        },
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    write_markdown(report, args.out + ".md")


if __name__ == "__main__":
    main()
