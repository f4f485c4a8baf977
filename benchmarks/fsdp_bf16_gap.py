"""Where the bf16 gap between a sharded and an unsharded Fisher comes from, on CPU (gloo).

``benchmarks/fsdp_scaling.py`` compares, in the run's dtype, the Fisher of a sharded bf16 GPT-2
(``sample`` with ``token_route="sequence"``) with that of an unsharded bf16 copy of the same
weights, as max |a - b| / max |b| per tensor, the largest over tensors; on one H200 with a 1.3B
GPT-2 it gave 0.21 (FSDP2) and 0.22 (FSDP1), against 4e-6 in float32. This script measures, on a
small GPT-2 (``--layers`` x ``--width``, vocab ``--vocab``, ``--seqs`` random sequences of
``--seq-len`` tokens, batches of 2, next-token labels) with bf16 parameters at world sizes 1 and 2,
the Fisher of four routes on the same data (rank r takes batches r, r + W, ...):

* ``float32``: an unsharded float32 copy of the same weights (the Fisher both bf16 routes
  approximate), all-reduced over the ranks;
* ``bf16``: an unsharded bf16 copy, all-reduced (what ``fsdp_scaling``'s reference computes);
* ``fsdp2``: the bf16 model with ``fully_shard`` on every block and the root, gathered whole;
* ``fsdp1``: the bf16 model as ``FullyShardedDataParallel`` (every block a unit,
  ``use_orig_params=True``), gathered whole;

for three methods:

* ``sample``: each route draws its own labels (``token_route="sequence"``, one seed);
* ``sample_same_labels``: every route uses the labels that the ``bf16`` route drew (the sampling
  is replaced by those labels), so only the arithmetic differs;
* ``empirical_sequence``: ``empirical`` with ``granularity="sequence"``: the data's labels, one
  backward per sequence, like ``sample``'s route.

For each pair it reports max |a - b| / max |b| per tensor (the largest, and the tensor), the
relative L1 error sum |a - b| / sum |b| over all entries, and the relative error of the trace,
and for ``sample`` how many of the drawn labels differ between the two routes (over all ranks).
``sample_other_seed`` is the ``float32`` route's ``sample`` with the next seed: how far two
independent draws of labels are apart in the same metrics.

What it shows: ``sample`` draws one label per position with ``torch.multinomial(p, 1)``, which
is argmax_v p_v / E_v with exponential noise E_v (the same noise in every route, one seed). Two
routes whose bf16 logits differ by rounding draw a different label wherever the two largest
p_v / E_v are within that rounding of each other, a fraction of the positions about the mean
logit difference. Each such position moves one term (1 - p_y)^2 h^2 of the tied
embedding / vocabulary head (``wte``) from one row to another: an entry as large as the rows
that hold a single label, so a handful of differing labels among thousands gives a max-per-tensor
difference of tenths. With the same labels the sharded and unsharded bf16 Fishers agree to bf16
rounding and are equally far from the float32 Fisher in L1. Not a bug of the sharded route.

Measured (CPU, the defaults; the report has every row): ``sample`` with each route's own labels,
FSDP2 and FSDP1 against the unsharded bf16 route, 0.36 at W=1 (5 of 4032 labels differ) and
0.33 at W=2 (1 label), in ``wte``; the unsharded bf16 route against float32 0.35 (4 and 5
labels). With the same labels 0.012 (W=1) and 0.023 (W=2), 0.002 in L1, 1e-4 or less in the
trace; both bf16 routes 0.003 in L1 from the float32 Fisher; ``empirical_sequence`` 0.018. The
largest per-tensor differences with the same labels sit in LayerNorm weights and biases (64
entries), where the per-input engine forms float32 per-input gradients and the sharded route's
plain backward bf16 ones: there the sharded route is up to 0.021 from float32, the unsharded
route at most 0.012 in any tensor. Two independent draws (``sample_other_seed``): 1.0 per
tensor, 0.5 in L1.

    python -m benchmarks.fsdp_bf16_gap   # writes benchmarks/results/fsdp_bf16_gap_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from benchmarks.common import (
    device_name,
    fmt,
    join_process_group,
    rank_environment,
    report_header,
    versions,
    write_json_md,
)
from benchmarks.ddp_scaling import _free_port
from benchmarks.fsdp_scaling import (
    RESULTS,
    Config,
    build_gpt2,
    gathered,
    rank_batches,
    sequences,
    shard_fsdp2,
    wrap_fsdp1,
)

ROUTES = ("float32", "bf16", "fsdp2", "fsdp1")
METHODS = ("sample", "sample_same_labels", "empirical_sequence")
#: (route, against): the sharded routes against the unsharded bf16 one, each bf16 route against
#: the float32 Fisher
PAIRS = (
    ("fsdp2", "bf16"),
    ("fsdp1", "bf16"),
    ("bf16", "float32"),
    ("fsdp2", "float32"),
    ("fsdp1", "float32"),
)


@dataclass
class Setup:
    layers: int = 2
    width: int = 64
    heads: int = 4
    vocab: int = 5000
    seq_len: int = 64
    seqs: int = 64
    batch: int = 2
    seed: int = 0
    worlds: tuple[int, ...] = (1, 2)


def model_config(s: Setup) -> Config:
    return Config(
        layers=s.layers,
        width=s.width,
        heads=s.heads,
        vocab=s.vocab,
        seq_len=s.seq_len,
        seed=s.seed,
        cpu=True,
        max_memory_mib=256.0,
    )


@contextmanager
def sampled_labels(forced: list[Tensor] | None = None) -> Iterator[list[Tensor]]:
    """While active, ``sample``'s draws of each batch (shape (B, T)) are appended to the yielded
    list, in the order of the batches; with ``forced``, the i-th batch takes ``forced[i]`` as its
    labels instead of drawing (``mc_samples=1``)."""
    from lightning_fisher.estimators.empirical import minus_p_plus_one_at
    from lightning_fisher.estimators.sample import SampleEstimator

    record: list[Tensor] = []
    original = SampleEstimator.columns

    def columns(self: Any, out: Any, p: Tensor, generator: torch.Generator) -> Any:
        if forced is None:
            cols, weight = original(self, out, p, generator)
        else:
            labels = forced[len(record)].to(p.device)
            cols, weight = minus_p_plus_one_at(p, labels.unsqueeze(0)), 1.0
        # e_y - p: the label is where the column is largest
        record.append(cols[0].argmax(-1).cpu())
        return cols, weight

    SampleEstimator.columns = columns  # type: ignore[method-assign]
    try:
        yield record
    finally:
        SampleEstimator.columns = original  # type: ignore[method-assign]


def fisher_kwargs(method: str, seed: int) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "seed": seed,
        "shift_labels": True,
        "progress": False,
        "max_memory_mib": 256.0,
    }
    if method == "empirical_sequence":
        return {**kw, "method": "empirical", "granularity": "sequence"}
    return {**kw, "method": "sample", "token_route": "sequence"}


def route_fisher(
    route: str, cfg: Config, batches: list[Any], kw: dict[str, Any], device: torch.device
) -> dict[str, Tensor]:
    """The whole Fisher of ``route`` on this rank's ``batches`` (every rank gets it, float64)."""
    import lightning_fisher as lf
    from lightning_fisher.sharded_fsdp1 import register_fisher_hook

    dtype = torch.float32 if route == "float32" else torch.bfloat16
    model: nn.Module = build_gpt2(cfg, device, dtype)
    if route == "fsdp2":
        shard_fsdp2(model)
    elif route == "fsdp1":
        model = wrap_fsdp1(model, device)
        register_fisher_hook(model)
    fd = lf.estimate_fisher(model, batches, **kw)
    whole = gathered(fd, model, route) if route in ("fsdp2", "fsdp1") else dict(fd)
    return {k: v.detach().double().cpu() for k, v in whole.items()}


def compare(got: dict[str, Tensor], want: dict[str, Tensor]) -> dict[str, Any]:
    """max |a - b| / max |b| per tensor (the largest, and where), sum |a - b| / sum |b| and the
    trace's relative error."""
    if got.keys() != want.keys():
        raise RuntimeError(f"different parameters: {sorted(set(got) ^ set(want))[:5]}")
    per = {
        k: float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-300))
        for k in want
    }
    worst = max(per, key=per.__getitem__)
    l1 = sum(float((got[k] - want[k]).abs().sum()) for k in want)
    total = sum(float(want[k].abs().sum()) for k in want)
    trace_got = sum(float(got[k].sum()) for k in want)
    return {
        "max_rel_per_tensor": per[worst],
        "worst_tensor": worst,
        "max_rel_without_wte": max(v for k, v in per.items() if "wte" not in k),
        "l1_rel": l1 / total,
        "trace_rel": abs(trace_got - total) / total,
    }


def _work(rank: int, world: int, setup: Setup, out_dir: str) -> None:
    device = torch.device("cpu")
    cfg = model_config(setup)
    batches = rank_batches(
        sequences(cfg, setup.seqs, setup.seed + 1), setup.batch, rank, world, device
    )
    fishers: dict[tuple[str, str], dict[str, Tensor]] = {}
    labels: dict[str, list[Tensor]] = {}
    seconds: dict[str, float] = {}
    for route in ROUTES:
        start = time.perf_counter()
        with sampled_labels() as drawn:
            fishers[route, "sample"] = route_fisher(
                route, cfg, batches, fisher_kwargs("sample", setup.seed), device
            )
        labels[route] = drawn
        seconds[route + "/sample"] = time.perf_counter() - start
    for route in ROUTES:
        start = time.perf_counter()
        if route == "bf16":  # its own labels: the pass above
            fishers[route, "sample_same_labels"] = fishers[route, "sample"]
        else:
            with sampled_labels(labels["bf16"]):
                fishers[route, "sample_same_labels"] = route_fisher(
                    route, cfg, batches, fisher_kwargs("sample", setup.seed), device
                )
        seconds[route + "/sample_same_labels"] = time.perf_counter() - start
        start = time.perf_counter()
        fishers[route, "empirical_sequence"] = route_fisher(
            route, cfg, batches, fisher_kwargs("empirical_sequence", setup.seed), device
        )
        seconds[route + "/empirical_sequence"] = time.perf_counter() - start
    other = route_fisher("float32", cfg, batches, fisher_kwargs("sample", setup.seed + 1), device)
    # labels that differ between two routes, and draws, summed over the ranks
    counts = torch.tensor(
        [
            [sum(int((x != y).sum()) for x, y in zip(labels[a], labels[b])) for a, b in PAIRS]
            + [sum(x.numel() for x in labels["bf16"])]
        ],
        dtype=torch.int64,
    )
    dist.all_reduce(counts)
    if rank == 0:
        rows = []
        for method in METHODS:
            for a, b in PAIRS:
                row = {"world": world, "method": method, "route": a, "against": b}
                row.update(compare(fishers[a, method], fishers[b, method]))
                if method == "sample":
                    row["labels_differ"] = int(counts[0, PAIRS.index((a, b))])
                    row["labels"] = int(counts[0, -1])
                rows.append(row)
        row = {"world": world, "method": "sample_other_seed", "route": "float32"}
        row.update({"against": "float32", **compare(other, fishers["float32", "sample"])})
        row.update({"labels": int(counts[0, -1])})
        rows.append(row)
        torch.save({"rows": rows, "seconds": seconds}, os.path.join(out_dir, "rank0.pt"))
    dist.barrier()


def _worker(rank: int, world: int, port: int, setup: Setup, out_dir: str) -> None:
    warnings.filterwarnings("ignore")
    rank_environment(rank, world, port)
    join_process_group(rank, world, cpu=True)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        _work(rank, world, setup, out_dir)
    finally:
        dist.destroy_process_group()


def run_world(world: int, setup: Setup) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        args = (world, _free_port(), setup, tmp)
        mp.start_processes(_worker, args=args, nprocs=world, join=True, start_method="fork")
        out: dict[str, Any] = torch.load(os.path.join(tmp, "rank0.pt"), weights_only=False)
    return out


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per world size: FSDP2 against the unsharded bf16 route with its own labels, with
    the same labels, and with the data's labels; each bf16 route against float32 (L1)."""
    by = {(r["world"], r["method"], r["route"], r["against"]): r for r in rows}
    out = []
    for w in sorted({r["world"] for r in rows}):
        own, same = by[w, "sample", "fsdp2", "bf16"], by[w, "sample_same_labels", "fsdp2", "bf16"]
        emp = by[w, "empirical_sequence", "fsdp2", "bf16"]
        to32 = [by[w, "sample_same_labels", r, "float32"]["l1_rel"] for r in ("bf16", "fsdp2")]
        out.append(
            f"W={w}: sample, fsdp2 against bf16: {own['max_rel_per_tensor']:.3g} "
            f"({own['worst_tensor']}) with {own['labels_differ']} of {own['labels']} labels "
            f"differing; with the same labels {same['max_rel_per_tensor']:.3g} (L1 "
            f"{same['l1_rel']:.2g}); empirical_sequence {emp['max_rel_per_tensor']:.3g} (L1 "
            f"{emp['l1_rel']:.2g}); same labels against float32, L1: bf16 {to32[0]:.2g}, "
            f"fsdp2 {to32[1]:.2g}."
        )
    return out


def markdown(report: dict[str, Any]) -> list[str]:
    lines = report_header("bf16 Fisher: sharded against unsharded, and against float32", report)
    lines += [
        f"Model: {report['model']}; {report['labels_per_pass']} sampled labels per pass.",
        "",
        *(f"* {line}" for line in report["summary"]),
        "",
        "| W | method | route | against | labels differ | max rel per tensor | tensor | "
        "max rel without wte | L1 rel | trace rel |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        differ = f"{r['labels_differ']} / {r['labels']}" if "labels_differ" in r else "-"
        lines.append(
            f"| {r['world']} | {r['method']} | {r['route']} | {r['against']} | {differ} | "
            f"{fmt(r['max_rel_per_tensor'], '.3g')} | {r['worst_tensor']} | "
            f"{fmt(r['max_rel_without_wte'], '.3g')} | {fmt(r['l1_rel'], '.3g')} | "
            f"{fmt(r['trace_rel'], '.3g')} |"
        )
    lines += [
        "",
        "Seconds per world size: "
        + ", ".join(f"W={w}: {s}" for w, s in report["seconds"].items())
        + ".",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Setup()
    parser.add_argument("--layers", type=int, default=d.layers)
    parser.add_argument("--width", type=int, default=d.width)
    parser.add_argument("--vocab", type=int, default=d.vocab)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--seqs", type=int, default=d.seqs)
    parser.add_argument("--worlds", type=int, nargs="+", default=list(d.worlds))
    parser.add_argument("--out", default=str(RESULTS / "fsdp_bf16_gap_cpu"))
    args = parser.parse_args(argv)
    setup = replace(
        d,
        layers=args.layers,
        width=args.width,
        vocab=args.vocab,
        seq_len=args.seq_len,
        seqs=args.seqs,
        worlds=tuple(args.worlds),
    )
    report: dict[str, Any] = {
        "device": device_name(),
        "command": " ".join(["python -m benchmarks.fsdp_bf16_gap", *(argv or sys.argv[1:])]),
        "versions": versions("transformers"),
        "setup": asdict(setup),
        "model": f"gpt2 {setup.layers} x {setup.width}, vocab {setup.vocab}, bf16 parameters; "
        f"{setup.seqs} sequences of {setup.seq_len} tokens",
        "labels_per_pass": setup.seqs * (setup.seq_len - 1),
        "rows": [],
        "seconds": {},
    }
    for world in setup.worlds:
        start = time.perf_counter()
        out = run_world(world, setup)
        report["rows"] += out["rows"]
        report["seconds"][str(world)] = round(time.perf_counter() - start, 1)
        for r in out["rows"]:
            print(r, flush=True)
    report["summary"] = summary(report["rows"])
    print(write_json_md(args.out, report, markdown(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
