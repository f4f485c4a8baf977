"""Where a language-model Fisher pass spends its time: the host or the device.

One batch of the GPT-2 small of ``benchmarks.lm_fisher_scale`` (random weights, ``bf16`` on a
GPU), three single-backward passes (``verify=False``, the plan reused: the steady state of a
pass): token-level ``sample``, sequence-level ``empirical`` and sequence-level ``sample``. For
each row: the wall time of ``--repeats`` calls (min and median), then one call under
``torch.profiler`` giving

* ``device_ms``: the kernels' own time (CUDA self time; 0 on CPU);
* ``host_ms``: the profiled call's wall time; ``device_busy`` = ``device_ms / host_ms``, the
  share of the pass the GPU works (a pass far below 1 is bound by the host);
* ``launches``: ``cudaLaunchKernel`` calls; ``syncs``: ``cudaStreamSynchronize`` calls (each a
  read of the device that drains the launch queue), ``casts``: ``aten::_to_copy`` calls;
* the top ops by self CPU time.

Run from the repository root::

    python -m benchmarks.lm_host_profile --device cuda     # one H200: about a minute
    python -m benchmarks.lm_host_profile --quick           # CPU smoke test, tiny GPT-2

It writes ``benchmarks/results/lm_host_profile.{json,md}`` (``--quick``: ``*_quick``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import lightning_fisher as lf
from benchmarks.common import device_name, fmt, report_header, versions, write_json_md
from benchmarks.lm_fisher_scale import FULL, QUICK, RESULTS, batch_of, build
from lightning_fisher import hf

NAME = "lm_host_profile"
ROWS: dict[str, dict[str, Any]] = {
    "sample-token": {"method": "sample", "token_route": "sequence"},
    "empirical-sequence": {"method": "empirical", "granularity": "sequence"},
    "sample-sequence": {"method": "sample", "granularity": "sequence"},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_row(fn: Any, device: torch.device, repeats: int, top: int) -> dict[str, Any]:
    """Wall times of ``repeats`` calls of ``fn``, then one profiled call's counts."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        fn()
        _sync(device)
        host_ms = 1e3 * (time.perf_counter() - t)
    events = prof.key_averages()
    count = {e.key: e.count for e in events}
    device_ms = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e3
    top_ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "wall_ms_min": min(times),
        "wall_ms_median": statistics.median(times),
        "host_ms": host_ms,
        "device_ms": device_ms,
        "device_busy": device_ms / host_ms,
        "launches": count.get("cudaLaunchKernel", 0),
        "syncs": count.get("cudaStreamSynchronize", 0),
        "casts": count.get("aten::_to_copy", 0),
        "top_cpu_ops": [
            {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
            for e in top_ops
        ],
    }


def write(report: dict[str, Any], out: str) -> str:
    path = os.path.join(out, report["name"])
    s = report["settings"]
    lines = [
        *report_header(report["name"], report),
        f"{s['model']}, one batch of {s['batch']} x {s['seq_len']} tokens, {s['dtype']}, "
        "`verify=False`, plan reused. `wall ms`: min / median of the timed calls; the rest from "
        "one profiled call: `device ms` the kernels' own time, `busy` its share of that call's "
        "wall time, `launches` kernel launches, `syncs` stream synchronisations (device reads), "
        "`casts` dtype conversions.",
        "",
        "| row | wall ms | profiled ms | device ms | busy | launches | syncs | casts |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["rows"].items():
        lines.append(
            f"| {name} | {r['wall_ms_min']:.1f} / {r['wall_ms_median']:.1f} | "
            f"{r['host_ms']:.1f} | {r['device_ms']:.1f} | {fmt(r['device_busy'], '.2f')} | "
            f"{r['launches']} | {r['syncs']} | {r['casts']} |"
        )
    for name, r in report["rows"].items():
        lines += ["", f"Top ops by self CPU time, {name}:", "", "| op | calls | self CPU ms |"]
        lines.append("|---|---:|---:|")
        lines += [
            f"| `{o['op']}` | {o['calls']} | {o['self_cpu_ms']:.2f} |" for o in r["top_cpu_ops"]
        ]
    return write_json_md(path, report, lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test with a tiny GPT-2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None, help="tokens (default 512; quick 16)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=12, help="ops listed per row")
    ap.add_argument("--out", default=RESULTS, help="folder of the report")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    spec = (QUICK if args.quick else FULL)[0]
    seq_len = args.seq_len or (16 if args.quick else 512)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(spec, seq_len, device, dtype)
    data = [batch_of(spec, args.batch, seq_len, device)]
    kw = hf.lm_fisher_kwargs(model)

    def fisher(options: dict[str, Any]) -> Any:
        return lambda: lf.estimate_fisher(
            model, data, progress=False, verify=False, max_memory_mib=spec.max_memory_mib,
            **kw, **options,
        )  # fmt: skip

    report: dict[str, Any] = {
        "name": NAME + ("_quick" if args.quick else ""),
        "device": device_name(device),
        "command": "python -m benchmarks.lm_host_profile " + " ".join(argv or sys.argv[1:]),
        "versions": versions("transformers"),
        "settings": {
            "model": spec.name,
            "batch": args.batch,
            "seq_len": seq_len,
            "dtype": str(dtype).removeprefix("torch."),
        },
        "rows": {},
    }
    for name, options in ROWS.items():
        report["rows"][name] = profile_row(fisher(options), device, args.repeats, args.top)
        r = report["rows"][name]
        print(
            f"{name:>20}: wall {r['wall_ms_median']:.1f} ms, device {r['device_ms']:.1f} ms, "
            f"{r['launches']} launches, {r['syncs']} syncs, {r['casts']} casts",
            flush=True,
        )
    print("wrote", write(report, args.out) + ".{json,md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
