"""EWC's step overhead and memory by state dtype and offload, on a GPT-2 model from a config.

A random-weight GPT-2 model built from a ``transformers`` config (no download; ``--layers 24
--width 2048`` is about 1.3B parameters), in ``--dtype`` (bf16 by default), one batch of
``--batch`` sequences of ``--seq-len`` tokens with next-token labels, AdamW. For each EWC setting
(``--configs``: ``state_dtype`` float32 or bfloat16, then ``+cpu`` for offload or
``+compiled`` for ``compile_update=True``) the script
consolidates a synthetic positive Fisher (the update's cost does not depend on its values) with
``lf.ElasticWeightConsolidation`` and times a training step with ``add_penalty_grad`` before
``opt.step()`` against the same step without it, interleaved (ratio of medians).

Every row: ``model``, ``params``, ``dtype``, ``state_dtype``, ``offload``, ``step_seconds``,
``ewc_step_seconds``, ``ewc_step_ratio``, ``state_mib`` (``state_bytes().total``: Fishers,
anchors and workspace), ``state_on_device_mib``, ``peak_mib`` (CUDA peak allocated during the
step with EWC above what was allocated before it; ``null`` on CPU), ``route`` (how the update ran),
``setup_seconds`` (consolidation and the first update, which compiles on CUDA) and
``max_rel_diff_vs_eager`` (the update against the one-tensor-at-a-time route, one step, max over
parameters of max |diff| / max |eager update|).

Run from the repository root::

    python -m benchmarks.ewc_state_dtype --device cuda --layers 24 --width 2048   # 1.3B, H200
    python -m benchmarks.ewc_state_dtype --device cpu --layers 2 --width 64 --vocab 500 \\
        --batch 2 --seq-len 32                                                # CPU smoke test

It writes ``benchmarks/results/ewc_state_dtype_<device>.{json,md}`` (``<device>``: cuda or cpu),
rewritten after every row.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

import lightning_fisher as lf
from benchmarks.common import device_name, fmt, report_header, versions, write_json_md
from benchmarks.lm_fisher_scale import Meter, ModelSpec, batch_of, build, train_step
from lightning_fisher import ewc as ewc_module

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NAME = "ewc_state_dtype"
CONFIGS = (
    "float32",
    "float32+compiled",
    "bfloat16",
    "bfloat16+compiled",
    "bfloat16+cpu",
    "float32+cpu",
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_config(text: str) -> tuple[torch.dtype, str | None, bool]:
    """``state_dtype[+cpu|+compiled]`` -> (state dtype, offload, compile_update)."""
    dtype, _, extra = text.partition("+")
    if extra not in ("", "cpu", "compiled"):
        raise SystemExit(f"error: config {text!r}: after '+' comes 'cpu' or 'compiled'")
    offload = "cpu" if extra == "cpu" else None
    return ewc_module.check_state_dtype(dtype), offload, extra == "compiled"


def route_of(ewc: lf.ElasticWeightConsolidation, model: nn.Module) -> str:
    """How :meth:`add_penalty_grad` ran on these parameters (after a first call)."""
    device = next(model.parameters()).device
    if ewc.offload is not None:
        return "offloaded, one tensor at a time"
    if device.type == "cuda" and ewc.compile_update and not ewc._compile_failed:
        return "torch.compile, one pass"
    if any(p.dtype not in (torch.float32, torch.float64) for p in model.parameters()):
        return "one tensor at a time (float32 temporaries)"
    return "foreach" if device.type == "cuda" else "two-pass"


def update_diff(ewc: lf.ElasticWeightConsolidation, model: nn.Module) -> float:
    """max over parameters of max |update - eager update| / max |eager update|, one step."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    ewc.add_penalty_grad()
    got = [p.grad.float().clone() for p in params]  # type: ignore[union-attr]
    names = {id(p): n for n, p in model.named_parameters()}
    worst = 0.0
    for p, g in zip(params, got):
        want = torch.zeros_like(p)
        for fisher, anchor in zip(ewc.fishers, ewc.anchors):
            name = names[id(p)]
            if name in fisher:
                ewc_module._add_term(want, fisher[name], p.detach(), anchor[name], ewc.lam, False)
        scale = float(want.float().abs().max())
        if scale > 0:
            worst = max(worst, float((g - want.float()).abs().max()) / scale)
    for p in params:
        p.grad = None
    return worst


def ewc_row(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: dict[str, Any],
    meter: Meter,
    state_dtype: torch.dtype,
    offload: str | None,
    compiled: bool = False,
) -> dict[str, Any]:
    device = next(model.parameters()).device
    start = time.perf_counter()
    torch.manual_seed(0)  # any positive Fisher times the same work; drawn where it lives
    fisher = lf.FisherDiagonal(
        {
            n: torch.rand(p.shape, device=p.device, dtype=torch.float32).mul_(1e-3)
            for n, p in model.named_parameters()
        },
        n_samples=1,
        method="sample",
    )
    ewc = lf.ElasticWeightConsolidation(
        model,
        lam=1.0,
        mode="online",
        state_dtype=state_dtype,
        offload=offload or False,
        compile_update=compiled,
    )
    ewc.consolidate(fisher)
    del fisher
    gc.collect()
    step = train_step(model, opt, batch)

    def with_ewc() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        ewc.add_penalty_grad()
        opt.step()

    with_ewc()  # the first update compiles on CUDA
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    setup = time.perf_counter() - start
    # interleave so that drift hits both alike; the ratio of medians
    plain_t, ewc_t, peak = [], [], None
    rounds = max(3, meter.repeats)
    for _ in range(rounds):
        s, _, _ = Meter(meter.device, 1, 3, meter.cap / rounds)(step)
        plain_t.append(s)
        s, p, _ = Meter(meter.device, 1, 3, meter.cap / rounds)(with_ewc)
        ewc_t.append(s)
        peak = p if peak is None or p is None else max(peak, p)
    plain, with_pen = statistics.median(plain_t), statistics.median(ewc_t)
    sb = ewc.state_bytes()
    row = {
        "state_dtype": str(state_dtype).replace("torch.", ""),
        "offload": offload,
        "step_seconds": plain,
        "ewc_step_seconds": with_pen,
        "ewc_step_ratio": with_pen / plain,
        "state_mib": sb.total / 2**20,
        "state_on_device_mib": sb.on_device / 2**20,
        "peak_mib": peak,
        "route": route_of(ewc, model),
        "setup_seconds": setup,
        "max_rel_diff_vs_eager": update_diff(ewc, model),
    }
    return row


def write(report: dict[str, Any], out: str) -> str:
    path = os.path.join(out, f"{NAME}_{report['device_type']}")
    s = report["settings"]
    lines = [
        *report_header(f"{NAME}_{report['device_type']}", report),
        f"Random-weight GPT-2 ({s['layers']} layers x {s['width']}, vocabulary {s['vocab']}), "
        f"one batch of {s['batch']} x {s['seq_len']} tokens, AdamW. `EWC step / step`: median "
        "step with `add_penalty_grad` over median step without, interleaved rounds. `state MiB`: "
        "Fishers, anchors and workspace (`state_bytes().total`), `on device` the part in GPU "
        "memory. `peak MiB`: CUDA peak during the step with EWC above what was allocated before "
        "it. `diff`: the update against the one-tensor-at-a-time route (relative).",
        "",
        "| model | params | dtype | state dtype | offload | step s | EWC step s | EWC step / "
        "step | state MiB | on device MiB | peak MiB | route | diff |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['dtype']} | {r['state_dtype']} | "
            f"{r['offload'] or '-'} | {fmt(r['step_seconds'], '.4f')} | "
            f"{fmt(r['ewc_step_seconds'], '.4f')} | {fmt(r['ewc_step_ratio'], '.3f')} | "
            f"{fmt(r['state_mib'], '.0f')} | {fmt(r['state_on_device_mib'], '.0f')} | "
            f"{fmt(r['peak_mib'], '.0f')} | {r['route']} | "
            f"{fmt(r['max_rel_diff_vs_eager'], '.1e')} |"
        )
    return write_json_md(path, report, lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=None, help="default: width / 128")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), help="state_dtype[+cpu]")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--row-cap", type=float, default=120.0, help="seconds of repeats per row")
    ap.add_argument("--out", default=RESULTS, help="folder of the report")
    args = ap.parse_args(argv)
    configs = [parse_config(c) for c in args.configs]
    for _, offload, _ in configs:
        ewc_module.check_offload(offload or False)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    heads = args.heads or max(1, args.width // 128)
    spec = ModelSpec(
        f"gpt2 {args.layers} x {args.width}", args.layers, args.width, heads, args.vocab, 0, ()
    )
    t0 = time.perf_counter()
    model = build(spec, args.seq_len, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = batch_of(spec, args.batch, args.seq_len, device)
    report: dict[str, Any] = {
        "command": "python -m benchmarks.ewc_state_dtype "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "device": device_name(device),
        "device_type": device.type,
        "versions": versions("transformers"),
        "settings": {
            "layers": args.layers,
            "width": args.width,
            "heads": heads,
            "vocab": args.vocab,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "repeats": args.repeats,
        },
        "rows": [],
    }
    meter = Meter(device, 1, args.repeats, args.row_cap)
    train_step(model, opt, batch)()  # AdamW state exists before any row measures memory
    for state_dtype, offload, compiled in configs:
        row = {"model": spec.name, "params": n_params, "dtype": str(dtype).replace("torch.", "")}
        row.update(ewc_row(model, opt, batch, meter, state_dtype, offload, compiled))
        gc.collect()  # the row's EWC state goes before the next row measures memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["rows"].append(row)
        path = write(report, args.out)
        print(
            f"{row['state_dtype']:>8} offload={row['offload']}: step {row['step_seconds']:.4f} s, "
            f"with EWC {row['ewc_step_seconds']:.4f} s ({row['ewc_step_ratio']:.3f}x), "
            f"state {row['state_mib']:.0f} MiB ({row['route']})",
            flush=True,
        )
    print(f"wrote {path}.json/.md in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
