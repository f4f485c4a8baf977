"""CPU timing of token-level ``empirical`` by the per-position route on small GPT-2 models.

Random-weight GPT-2 models built from ``transformers`` configs (tied ``wte``/``lm_head``),
``hf.lm_fisher_kwargs`` (next-token prediction), ``token_route="position"``: one backward column
per sequence position. Each row is the median of ``--repeats`` runs after one warm-up, beside a
training step (forward, backward, AdamW step) on the same batch; ``ratio_to_step`` compares
process CPU seconds (one torch thread by default), ``wall_ratio_to_step`` wall seconds.

    python -m benchmarks.lm_position_route [--label after] [--profile] [--out PATH]

``--label`` tags the rows (a "before" and an "after" run go into the same report: rows with the
same label are replaced). ``--profile`` prints the top operators of one run (torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import lightning_fisher as lf
from lightning_fisher import hf

from .common import device_name, versions

RESULTS = "benchmarks/results/lm_position_route_cpu"
#: (name, layers, width, heads, vocabulary)
MODELS = [("gpt2-2x128-v2000", 2, 128, 4, 2000), ("gpt2-2x128-v8000", 2, 128, 4, 8000)]


def build(layers: int, width: int, heads: int, vocab: int, dtype: torch.dtype) -> Any:
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        n_positions=256,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def batch_of(vocab: int, n: int, seq_len: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, seq_len), generator=gen)
    return dict(hf.with_lm_labels({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall and process CPU seconds of ``repeats`` runs after one warm-up. The CPU time is
    the steadier figure on a shared machine (with one torch thread it is the compute time)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def run_model(
    model: Any, vocab: int, args: argparse.Namespace, position_ids: bool
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(wall, CPU) seconds of a training step and of token-level ``empirical`` by the
    per-position route. ``position_ids``: the batch carries them, one row per sequence, so that
    ``wpe``'s output has a batch dimension (without them it has none, and ``wpe`` goes through
    the engine's whole-model route)."""
    batch = batch_of(vocab, args.batch, args.seq_len)
    if position_ids:
        batch["position_ids"] = torch.arange(args.seq_len).expand(args.batch, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    def fisher() -> Any:
        return lf.estimate_fisher(
            model,
            [batch],
            method="empirical",
            token_route="position",
            progress=False,
            verify=False,
            **hf.lm_fisher_kwargs(model),
        )

    step_s = timed(step, args.repeats)
    model.eval()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fisher()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return step_s, timed(fisher, args.repeats)


def write_md(report: dict[str, Any], path: str) -> None:
    """The rows as a Markdown table (label, model, position ids in the batch, seconds, ratios)."""
    lines = [
        "# Token-level `empirical`, per-position route, on CPU",
        "",
        f"Device: {report['device']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + ".",
        f"Settings: {json.dumps(report['settings'])}.",
        "",
        "Commands: " + "; ".join(f"`{c}` ({k})" for k, c in report["commands"].items()) + ".",
        "",
        "| label | model | params | seq_len | position_ids | method | route | seconds (wall) "
        "| CPU seconds | ratio_to_step (CPU) | wall ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['label']} | {r['model']} | {r['params']} | {r['seq_len']} | "
            f"{r['position_ids']} | {r['method']} | {r['route'] or '-'} | {r['seconds']} | "
            f"{r['cpu_seconds']} | {r['ratio_to_step']} | {r['wall_ratio_to_step']} |"
        )
    notes = report.get("notes")
    if notes:
        lines += ["", notes]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--label", default="after")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--models", default=",".join(m[0] for m in MODELS))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    path = args.out + ".json"
    report: dict[str, Any] = {"rows": []}
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
    report["rows"] = [r for r in report["rows"] if r.get("label") != args.label]
    report["device"] = device_name("cpu")
    report["versions"] = versions("transformers")
    report.setdefault("commands", {})[args.label] = "python -m benchmarks.lm_position_route " + (
        " ".join(sys.argv[1:] if argv is None else argv)
    )
    report["settings"] = {
        "batch": args.batch,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "threads": args.threads,
    }
    for name, layers, width, heads, vocab in MODELS:
        if name not in args.models.split(","):
            continue
        model = build(layers, width, heads, vocab, dtype)
        params = sum(p.numel() for p in model.parameters())
        base = {
            "label": args.label,
            "model": name,
            "params": params,
            "seq_len": args.seq_len,
            "batch": args.batch,
            "dtype": args.dtype,
        }
        for position_ids in (False, True):
            step_s, s = run_model(model, vocab, args, position_ids)
            for method, route, (wall, cpu) in (
                ("train-step", None, step_s),
                ("empirical-token", "position", s),
            ):
                row = {**base, "position_ids": position_ids, "method": method, "route": route}
                row["seconds"] = round(wall, 4)
                row["cpu_seconds"] = round(cpu, 4)
                row["ratio_to_step"] = round(cpu / step_s[1], 2)
                row["wall_ratio_to_step"] = round(wall / step_s[0], 2)
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    write_md(report, args.out + ".md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
