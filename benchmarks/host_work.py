"""Host work per batch: aten ops, Python calls and CPU time of a Fisher pass on small models.

On a GPU, the MLPs of the exact-diagonal benchmark are bound by the host: every aten op is one
or more kernel launches plus the Python around it, so the number of ops dispatched and of Python
calls made per batch sets the time long before the arithmetic does. This benchmark counts them
on CPU, where no GPU is needed::

    python -m benchmarks.host_work                # -> results/host_work_cpu.{json,md}

For each MLP of ``benchmarks.exact_diagonal`` (same widths and batch sizes, ``--n`` to change
one), and for each implementation (a training step, ours ``exact`` and ``empirical`` through
``lf.estimate_fisher``, BackPACK's ``DiagGGNExact`` and ``SumGradSquared`` when BackPACK is
installed), it runs the implementation twice (our plan and the self-check's proof are then kept
with the model: the steady state of a later pass), then on the third run counts

* ``aten_ops``: the aten ops dispatched (a ``TorchDispatchMode`` counter, also per op name);
  ``kernel_ops``: those that are not views or metadata (``detach``, ``view``, ``permute``,
  ``_unsafe_view``, ``promote_types``, ...), about the ops that launch a kernel on a GPU;
* ``python_calls``: every Python and builtin function call of the run (cProfile's total);
* ``reads``: the device-to-host reads of the run (``ReadCounter``: ``item``/``bool``/``int``,
  ``nonzero``, ``unique``, ``equal``, boolean-mask indexing, ``tolist``/``cpu``/``numpy``), each
  a wait for the device on a GPU, by where they come from; ``reads_per_batch``: what one more
  batch of a pass adds;
* ``seconds``: the median wall time of ``--repeats`` runs (fewer once ``--time-budget`` seconds
  are spent; CPU, ``--threads`` torch threads).

* ``host_seconds``: the fastest run on the model's tiny twin (same depth and classes, widths 16,
  8 inputs), where the arithmetic is negligible but for the (N, C, C-1) columns of a large C:
  the host's own time, what a launch-bound GPU run pays; for ours also
  ``host_seconds_per_batch``, what one more batch of a pass adds.

GPT-2-small-shaped rows (``LM_MODELS``: 12 blocks, tiny widths) count the same for a training
step and ours ``sample`` (token level, one backward per sequence), ``empirical`` and ``sample``
at ``granularity="sequence"``, as ``benchmarks.lm_fisher_scale`` runs them.

Ours run a pass of one batch, as the exact-diagonal benchmark times them, which includes the
pass's own work (the accumulators, the final NaN/Inf checks); ``aten_ops_per_batch`` is the
number that one more batch of the same pass adds (a pass of two batches minus one of one).
``--before FILE`` adds the counts of an earlier run (the JSON this script wrote, with earlier
code on the path) to the report, for a before/after table.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import gc
import json
import os
import pstats
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_fisher as lf
from benchmarks.bench_models import mlp
from benchmarks.common import device_name, fmt, report_header
from benchmarks.common import versions as base_versions
from benchmarks.exact_diagonal import (
    Case,
    Skip,
    backpack_model,
    backpack_run,
    build_case,
    train_step,
)
from lightning_fisher import _json as strict_json

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODELS = ("mlp-784-512-512-10", "mlp-3072-1024-1024-100", "mlp-2048-1024-1024-1000")
#: ops that move no data: views, aliases, dtype queries
METADATA_OPS = frozenset({"aten._unsafe_view", "aten.promote_types", "aten.lift_fresh"})


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, by name (``aten.mm``) and in total; ops that
    are views or metadata (``METADATA_OPS``) are also counted apart, and every op by where it
    was dispatched from (``sources``: the innermost function of lightning_fisher, or of BackPACK,
    on the Python stack; ``torch`` for the rest: the model's layers, autograd)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.metadata = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if getattr(func, "is_view", False) or name in METADATA_OPS:
            self.metadata += 1
        self.sources[_source(sys._getframe(1))] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _source(frame: Any) -> str:
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        for package in ("lightning_fisher/", "backpack/"):
            if package in path:
                module = path.rsplit(package, 1)[1].removesuffix(".py").replace("/", ".")
                return f"{package[:-1]}.{module}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "torch"


#: aten ops that read a value from the device to the host (on a GPU each one waits for every
#: kernel queued before it): ``item``/``bool``/``int``/``float`` (``_local_scalar_dense``),
#: ``torch.equal``, and ops whose output size depends on the values (``nonzero``, ``unique``,
#: ``masked_select``); boolean-mask indexing is counted apart (``_bool_index``)
READ_OPS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.equal",
        "aten.nonzero",
        "aten._unique",
        "aten._unique2",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.masked_select",
    }
)
#: Tensor methods that copy to the host: no aten op on a CPU tensor, a read on a GPU
READ_METHODS = ("tolist", "cpu", "numpy")


class ReadCounter(TorchDispatchMode):
    """Counts the device-to-host reads of a run on CPU that would stop a GPU run: the
    ``READ_OPS`` dispatched, indexing by a boolean mask (its output size is read), and calls of
    ``Tensor.tolist``/``.cpu``/``.numpy`` (patched while active). Also by where each came from
    (``sources``: the innermost frame of lightning_fisher, transformers or the caller, with its
    line) and by kind (``kinds``)."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def _hit(self, kind: str, frame: Any) -> None:
        self.kinds[kind] += 1
        self.sources[_read_source(frame)] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        if name in READ_OPS:
            self._hit(name.removeprefix("aten."), sys._getframe(1))
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())
        ):
            self._hit("_bool_index", sys._getframe(1))
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> ReadCounter:
        for method in READ_METHODS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def counted(t: Any, *a: Any, _f: Any = original, _m: str = method, **k: Any) -> Any:
                self._hit(_m, sys._getframe(1))
                return _f(t, *a, **k)

            setattr(torch.Tensor, method, counted)
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)


def _read_source(frame: Any) -> str:
    """``package.module.function:line`` of the innermost frame of lightning_fisher or
    transformers (else the first frame outside torch) on the stack."""
    first = None
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        for package in ("lightning_fisher/", "transformers/"):
            if package in path:
                module = path.rsplit(package, 1)[1].removesuffix(".py").replace("/", ".")
                return f"{package[:-1]}.{module}.{frame.f_code.co_name}:{frame.f_lineno}"
        if first is None and "/torch/" not in path:
            first = f"{os.path.basename(path)}:{frame.f_code.co_name}:{frame.f_lineno}"
        frame = frame.f_back
    return first or "torch"


def count_reads(fn: Callable[[], Any]) -> ReadCounter:
    with ReadCounter() as counter:
        fn()
    return counter


def count_ops(fn: Callable[[], Any]) -> OpCounter:
    with OpCounter() as counter:
        fn()
    return counter


def python_calls(fn: Callable[[], Any]) -> int:
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    return int(pstats.Stats(prof).total_calls)  # type: ignore[attr-defined]


def implementations(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """name -> (run the whole thing once, ``f(n)`` running a pass of n batches or None), or the
    reason it is skipped (a string)."""
    out: dict[str, Any] = {"train-step": (train_step(case), None)}
    for method in ("exact", "empirical"):
        model = copy.deepcopy(case.model)  # its own plan and proof, kept across runs

        def ours(batches: int, model: Any = model, method: str = method) -> None:
            lf.estimate_fisher(
                model,
                [case.batch()] * batches,
                method=method,
                max_memory_mib=args.max_memory_mib,
                progress=False,
            )

        out[f"ours-{method}"] = (lambda f=ours: f(1), ours)
    for impl, ext in (
        ("backpack-diagggn-exact", "DiagGGNExact"),
        ("backpack-sum-grad-squared", "SumGradSquared"),
    ):
        try:
            bp = backpack_model(case)
        except Skip as why:
            out[impl] = str(why)
            continue
        out[impl] = (lambda bp=bp, ext=ext: backpack_run(bp, case, ext), None)
    return out


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    case = build_case(name, torch.device("cpu"), args)
    print(f"\n== {name}: N={case.n}", flush=True)
    rows: list[dict[str, Any]] = []
    sizes = [int(s) for s in name.split("-")[1:]]
    g = torch.Generator().manual_seed(0)
    small = Case(
        f"{name}-tiny",
        mlp([TINY_WIDTH] * (len(sizes) - 1) + [sizes[-1]]).eval(),
        torch.randn(TINY_N, TINY_WIDTH, generator=g),
        torch.randint(0, sizes[-1], (TINY_N,), generator=g),
        sizes[-1],
        "mlp",
    )
    tiny = implementations(small, args)
    if args.host_only:
        for impl, spec in tiny.items():
            host = host_time(spec, args) if isinstance(spec, tuple) else (None, None)
            rows.append(
                {
                    "model": name,
                    "implementation": impl,
                    "host_seconds": host[0],
                    "host_seconds_per_batch": host[1],
                    "note": None if isinstance(spec, tuple) else f"skipped: {spec}",
                }
            )
            print(f"  {impl:26s} host {host[0]} s, per batch {host[1]} s", flush=True)
    for impl, spec in [] if args.host_only else implementations(case, args).items():
        if isinstance(spec, str):
            rows.append({"model": name, "implementation": impl, "note": f"skipped: {spec}"})
            print(f"  {impl:26s} skipped: {spec}", flush=True)
            continue
        run, run_two = spec
        for _ in range(2):  # plans and proofs kept: the steady state
            run()
        host = host_time(tiny[impl], args) if isinstance(tiny.get(impl), tuple) else (None, None)
        counter = count_ops(run)
        reads = count_reads(run)
        calls = python_calls(run)
        per_batch = kernel_per_batch = calls_per_batch = reads_per_batch = None
        if run_two is not None:
            pass_of_two = functools.partial(run_two, 2)
            pass_of_two()
            two = count_ops(pass_of_two)
            per_batch = two.total - counter.total
            kernel_per_batch = (two.total - two.metadata) - (counter.total - counter.metadata)
            calls_per_batch = python_calls(pass_of_two) - calls
            reads_per_batch = count_reads(pass_of_two).total - reads.total
        times: list[float] = []
        while len(times) < args.repeats and (not times or sum(times) < args.time_budget):
            gc.collect()
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        row: dict[str, Any] = {
            "model": name,
            "implementation": impl,
            "n_inputs": case.n,
            "aten_ops": counter.total,
            "kernel_ops": counter.total - counter.metadata,
            "aten_ops_per_batch": per_batch,
            "kernel_ops_per_batch": kernel_per_batch,
            "python_calls": calls,
            "python_calls_per_batch": calls_per_batch,
            "reads": reads.total,
            "reads_per_batch": reads_per_batch,
            "reads_by_source": dict(reads.sources.most_common()),
            "seconds": statistics.median(times),
            "repeats": len(times),
            "host_seconds": host[0],
            "host_seconds_per_batch": host[1],
            "ops_by_name": dict(counter.ops.most_common()),
            "ops_by_source": dict(counter.sources.most_common()),
            "note": None,
        }
        rows.append(row)
        print(
            f"  {impl:26s} {row['aten_ops']:5d} aten ops ({row['kernel_ops']} non-view), "
            f"{calls:6d} Python calls, {row['seconds'] * 1e3:8.2f} ms",
            flush=True,
        )
    step = next((r.get("seconds") for r in rows if r["implementation"] == "train-step"), None)
    host_step = next((r["host_seconds"] for r in rows if r["implementation"] == "train-step"), None)
    for r in rows:
        r["ratio_to_step"] = r["seconds"] / step if step and r.get("seconds") else None
        r["host_ratio_to_step"] = (
            r["host_seconds"] / host_step if host_step and r.get("host_seconds") else None
        )
    return rows


#: GPT-2-small-shaped language models (12 blocks as GPT-2 small, tiny widths: the counts
#: depend on the depth, not on the widths): name -> (layers, width, heads, vocabulary)
LM_MODELS = {"gpt2-small-shaped (12 x 32)": (12, 32, 4, 500)}
#: the passes of the LM rows: implementation -> estimate_fisher options
LM_PASSES = {
    "ours-sample-token": {"method": "sample", "token_route": "sequence"},
    "ours-empirical-sequence": {"method": "empirical", "granularity": "sequence"},
    "ours-sample-sequence": {"method": "sample", "granularity": "sequence"},
}


def run_lm(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The LM rows: a training step and the passes of ``LM_PASSES`` on a random-weight GPT-2 of
    ``LM_MODELS`` (``transformers``' default attention), ``--lm-batch`` sequences of
    ``--lm-seq-len`` tokens, next-token labels, the options ``lm_fisher_scale`` times them with
    (``verify=False``, ``max_memory_mib``); counts of the third run as for the MLPs."""
    from benchmarks.lm_fisher_scale import ModelSpec, batch_of, build
    from lightning_fisher import hf

    layers, width, heads, vocab = LM_MODELS[name]
    spec = ModelSpec(name, layers, width, heads, vocab, args.max_memory_mib, ())
    cpu = torch.device("cpu")
    model = build(spec, args.lm_seq_len, cpu, torch.float32)
    batch = batch_of(spec, args.lm_batch, args.lm_seq_len, cpu)
    print(f"\n== {name}: B={args.lm_batch}, T={args.lm_seq_len}", flush=True)
    step_model = copy.deepcopy(model)

    def step(_n: int = 1) -> None:
        step_model.train()
        step_model(**batch).loss.backward()
        for p in step_model.parameters():
            p.grad = None

    runs: dict[str, Callable[[int], None]] = {"train-step": step}
    for impl, kw in LM_PASSES.items():

        def ours(n: int, kw: dict[str, Any] = kw) -> None:
            lf.estimate_fisher(
                model,
                [batch] * n,
                progress=False,
                verify=False,
                max_memory_mib=args.max_memory_mib,
                **hf.lm_fisher_kwargs(model),
                **kw,
            )

        runs[impl] = ours
    rows = []
    for impl, fn in runs.items():
        one = functools.partial(fn, 1)
        for _ in range(2):
            one()
        counter, reads, calls = count_ops(one), count_reads(one), python_calls(one)
        row: dict[str, Any] = {"model": name, "implementation": impl, "n_inputs": args.lm_batch}
        if impl != "train-step":
            two = functools.partial(fn, 2)
            two()
            ops_two, reads_two = count_ops(two), count_reads(two)
            row.update(
                aten_ops_per_batch=ops_two.total - counter.total,
                kernel_ops_per_batch=(ops_two.total - ops_two.metadata)
                - (counter.total - counter.metadata),
                python_calls_per_batch=python_calls(two) - calls,
                reads_per_batch=reads_two.total - reads.total,
                reads_per_batch_by_source=dict((reads_two.sources - reads.sources).most_common()),
            )
        times: list[float] = []
        while len(times) < args.repeats and (not times or sum(times) < args.time_budget):
            gc.collect()
            t0 = time.perf_counter()
            one()
            times.append(time.perf_counter() - t0)
        row.update(
            aten_ops=counter.total,
            kernel_ops=counter.total - counter.metadata,
            python_calls=calls,
            reads=reads.total,
            reads_by_source=dict(reads.sources.most_common()),
            seconds=statistics.median(times),
            repeats=len(times),
            ops_by_name=dict(counter.ops.most_common()),
            ops_by_source=dict(counter.sources.most_common()),
            note=None,
        )
        rows.append(row)
        print(
            f"  {impl:26s} {row['aten_ops']:6d} aten ops ({row['kernel_ops']} non-view), "
            f"{row['reads']} reads ({row.get('reads_per_batch')} per batch), "
            f"{row['seconds'] * 1e3:8.2f} ms",
            flush=True,
        )
    step_s = rows[0]["seconds"]
    for r in rows:
        r["ratio_to_step"] = r["seconds"] / step_s
        r.setdefault("host_seconds", None)
        r.setdefault("host_ratio_to_step", None)
    return rows


#: the host-bound twin of each MLP: same depth and classes, these widths and inputs
TINY_WIDTH, TINY_N = 16, 8


def host_time(spec: tuple[Any, Any], args: argparse.Namespace) -> tuple[float, float | None]:
    """Seconds of one run on the tiny twin, where the arithmetic is negligible: the host's own
    work; for ours also what one more batch of a pass adds (a pass of 11 batches minus a pass
    of one, over 10). The fastest of ``--host-repeats`` runs: the host's work is what is left
    when nothing else on the machine interrupts it (a median moves with the machine's load).
    Passes of 1 and 11 batches alternate, so both see the same conditions."""
    run, run_n = spec
    for _ in range(3):
        run()
    one: list[float] = []
    many: list[float] = []
    for _ in range(args.host_repeats):
        for fn, times in ((run, one), (None if run_n is None else lambda: run_n(11), many)):
            if fn is None:
                continue
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(one), None if run_n is None else (min(many) - min(one)) / 10


def write_markdown(path: str, report: dict[str, Any]) -> None:
    before = {
        (r["model"], r["implementation"]): r for r in (report.get("before") or {}).get("rows", [])
    }
    lines = [
        *report_header(report["name"], report),
        "One batch in steady state (the third run: our plan and the self-check's proof are "
        "reused). `aten ops`: ops dispatched (a `TorchDispatchMode` counter); `non-view`: those "
        "that are not views or metadata (about the kernel launches on a GPU); `per batch`: what "
        "one more batch of the same pass adds; `Python calls`: cProfile's total; ms: median "
        "wall time on CPU; ours run a pass of one batch (with the pass's own setup and final "
        "checks), as the exact-diagonal benchmark times them. `host ms`: the fastest run on the "
        f"model's tiny twin (same depth and classes, widths {TINY_WIDTH}, {TINY_N} inputs), "
        "where the host's work is all there is (but for the (N, C, C-1) columns of exact at "
        "C = 1000); `host ms per batch`: what one more batch of our pass adds there. `reads`: "
        "device-to-host reads (`ReadCounter`: `item`/`bool`, `nonzero`, `unique`, boolean-mask "
        "indexing, `tolist`/`cpu`), each of which makes a GPU run wait for the device; `reads "
        "per batch`: what one more batch adds. The GPT-2 rows run a pass of one batch of "
        "`lm_batch` x `lm_seq_len` tokens (no host twin).",
    ]
    if before:
        b = report["before"]
        lines += [
            "",
            f"`a -> b`: a on {b.get('code') or 'the earlier code'} (`{b.get('command', '')}`), "
            "b on this code.",
        ]
    lines += [
        "",
        "| model | implementation | aten ops | non-view | aten ops per batch | non-view per batch "
        "| Python calls | Python calls per batch | reads | reads per batch | ms | ratio to step "
        "| host ms | host ms per batch | host ratio to step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pair(r: dict[str, Any], key: str, spec: str = "", scale: float = 1.0) -> str:
        old = before.get((r["model"], r["implementation"]), {}).get(key)
        now = r.get(key)
        if scale != 1.0:
            old, now = (None if v is None else v * scale for v in (old, now))
        if old is None or old == now:
            return fmt(now, spec)
        return f"{fmt(old, spec)} -> {fmt(now, spec)}"

    for r in report["rows"]:
        if r.get("aten_ops") is None and r.get("host_seconds") is None:
            lines.append(
                f"| {r['model']} | {r['implementation']} |" + " - |" * 13 + f" {r.get('note')} |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['implementation']} | {pair(r, 'aten_ops')} | "
            f"{pair(r, 'kernel_ops')} | {pair(r, 'aten_ops_per_batch')} | "
            f"{pair(r, 'kernel_ops_per_batch')} | "
            f"{pair(r, 'python_calls')} | {pair(r, 'python_calls_per_batch')} | "
            f"{pair(r, 'reads')} | {pair(r, 'reads_per_batch')} | "
            f"{pair(r, 'seconds', '.2f', 1e3)} | {pair(r, 'ratio_to_step', '.2f')} | "
            f"{pair(r, 'host_seconds', '.3f', 1e3)} | {pair(r, 'host_seconds_per_batch', '.3f', 1e3)} "
            f"| {pair(r, 'host_ratio_to_step', '.2f')} |"
        )
    top = int(report.get("top_ops", 20))
    lines += ["", "## Where the ops go", ""]
    for model in dict.fromkeys(r["model"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["model"] == model and r.get("ops_by_name")]
        if not rows:
            continue
        lines += _table(
            f"{model}: aten ops by name (the {top} most frequent over all implementations)",
            "op",
            rows,
            "ops_by_name",
            top,
            lambda n: n.removeprefix("aten."),
        )
    first = next(iter(dict.fromkeys(r["model"] for r in report["rows"])), None)
    rows = [r for r in report["rows"] if r["model"] == first and r.get("ops_by_source")]
    rows += [
        {**r, "implementation": f"{r['implementation']} (before)"}
        for (model, impl), r in before.items()
        if model == first and impl.startswith("ours-") and r.get("ops_by_source")
    ]
    lines += (
        []
        if not rows
        else _table(
            f"{first}: aten ops by where they were dispatched from (the innermost function of "
            "lightning_fisher or BackPACK on the stack; `torch`: the model's layers and autograd "
            "outside both)",
            "function",
            rows,
            "ops_by_source",
            top,
            lambda n: n,
        )
    )
    lines += [
        "## Where the reads of one more batch come from",
        "",
        "| model | implementation | reads per batch | from |",
        "|---|---|---:|---|",
    ]
    for r in report["rows"]:
        if r.get("reads_per_batch") is None:
            continue
        by = r.get("reads_per_batch_by_source")
        where = (
            ", ".join(f"{k} ({v})" for k, v in by.items())
            if by
            else "; ".join(f"{k} ({v})" for k, v in (r.get("reads_by_source") or {}).items())
            + " (a pass of one batch)"
        )
        lines.append(
            f"| {r['model']} | {r['implementation']} | {pair(r, 'reads_per_batch')} | {where} |"
        )
    lines.append("")
    if report.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in report["notes"]], ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _table(
    title: str,
    head: str,
    rows: list[dict[str, Any]],
    key: str,
    top: int,
    label: Callable[[str], str],
) -> list[str]:
    """A Markdown table of the counts ``row[key]`` (name -> count) per implementation: the
    ``top`` largest names over all rows, then the rest summed."""
    total: Counter[str] = Counter()
    for r in rows:
        total.update(r[key])
    names = [n for n, _ in total.most_common(top)]
    lines = [
        f"{title}:",
        "",
        f"| {head} | " + " | ".join(r["implementation"] for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for n in names:
        lines.append(f"| {label(n)} | " + " | ".join(str(r[key].get(n, 0)) for r in rows) + " |")
    rest = [sum(v for k, v in r[key].items() if k not in names) for r in rows]
    return [*lines, "| (the rest) | " + " | ".join(map(str, rest)) + " |", ""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    ap.add_argument("--n", nargs="*", default=[], metavar="MODEL=N", help="batch size per model")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per implementation")
    ap.add_argument(
        "--time-budget",
        type=float,
        default=20.0,
        help="seconds of timed runs after which an implementation is not repeated further",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument(
        "--host-repeats", type=int, default=50, help="timed runs on each tiny twin (host time)"
    )
    ap.add_argument("--max-memory-mib", type=float, default=2048.0, help="our engine's memory cap")
    ap.add_argument("--top-ops", type=int, default=20, help="op names listed per model")
    ap.add_argument(
        "--host-only", action="store_true", help="only the host times of the tiny twins (fast)"
    )
    ap.add_argument("--lm-models", nargs="*", default=list(LM_MODELS), choices=list(LM_MODELS))
    ap.add_argument("--lm-batch", type=int, default=8, help="sequences per LM batch")
    ap.add_argument("--lm-seq-len", type=int, default=32, help="tokens per LM sequence")
    ap.add_argument("--before", default=None, help="a JSON this script wrote with earlier code")
    ap.add_argument("--code", default=None, help="what code ran (a revision), for the report")
    ap.add_argument("--out", default="host_work_cpu", help="report name, or a path without suffix")
    args = ap.parse_args(argv)
    args.n = {k: int(v) for k, v in (s.split("=") for s in args.n)}
    torch.set_num_threads(args.threads)
    command = " ".join(
        ["python -m benchmarks.host_work", *(argv if argv is not None else sys.argv[1:])]
    )
    out = args.out if os.sep in args.out else os.path.join(RESULTS, args.out)
    rows: list[dict[str, Any]] = []
    notes = [
        "ms are CPU times, where these models are bound by arithmetic, not by the host: the "
        "op and call counts are what stands for a GPU's launch-bound time.",
    ]
    for m in args.models:
        rows += run_model(m, args)
    if not args.host_only:
        for m in args.lm_models:
            rows += run_lm(m, args)
    skipped = sorted({r["implementation"] for r in rows if r.get("aten_ops") is None})
    if skipped:
        notes.append(
            f"not run here (not installed in this environment): {', '.join(skipped)}; "
            "BackPACK is in /work/bench-venv (run there with PYTHONPATH=<checkout>)."
        )
    report: dict[str, Any] = {
        "name": os.path.basename(out),
        "command": command,
        "code": args.code,
        "device": device_name("cpu"),
        "versions": base_versions("backpack-for-pytorch"),
        "repeats": args.repeats,
        "max_memory_mib": args.max_memory_mib,
        "top_ops": args.top_ops,
        "notes": notes,
        "rows": rows,
    }
    if args.before:
        with open(args.before) as f:
            old = json.load(f)
        report["before"] = {k: old.get(k) for k in ("command", "code", "versions", "rows")}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        strict_json.dump(report, f, indent=1)
    write_markdown(out + ".md", report)
    print(f"\nwrote {out}.json/.md")


if __name__ == "__main__":
    main()
