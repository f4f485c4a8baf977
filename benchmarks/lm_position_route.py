"""CPU timing of token-level ``empirical`` by the per-position route on small GPT-2 models.

Random-weight GPT-2 models built from ``transformers`` configs (tied ``wte``/``lm_head``),
``hf.lm_fisher_kwargs`` (next-token prediction), ``token_route="position"``: one backward column
per sequence position. Each row is the median of ``--repeats`` runs after one warm-up, beside a
training step (forward, backward, AdamW step) on the same batch; ``ratio_to_step`` compares
process CPU seconds (one torch thread by default), ``wall_ratio_to_step`` wall seconds.

    python -m benchmarks.lm_position_route [--label after] [--attn sdpa] [--profile] [--out PATH]
        [--no-causal-cut] [--position-ids both|on|off]

``--label`` tags the rows (a "before" and an "after" run go into the same report: rows with the
same label are replaced). ``--attn`` sets the models' ``attn_implementation`` ("sdpa": attention
by ``F.scaled_dot_product_attention``, "eager": transformers' own matmul/softmax); without it the
config's default, which is "sdpa" in recent ``transformers``. ``--profile`` prints the top operators of one run (torch.profiler).
``hf.lm_fisher_kwargs`` turns on the causal cut (each block of positions through its prefix;
route "position+cut"); ``--no-causal-cut`` runs the uncut route ("position").
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
NOTES = """\
Ratios compare process CPU seconds with one torch thread (the machine was shared: wall times
and, less so, CPU times vary between runs by up to about 1.5x). "before" is the engine before
the one-position head product, the tied-embedding sum and the column blocks; "after" is with
them. All these models run attention by `F.scaled_dot_product_attention` (transformers' default
`attn_implementation="sdpa"`; the `attn` field of the JSON rows where recorded). backward / rules: CPU seconds of one run spent in the engine's batched backward to the layer
outputs and in its per-layer rules. The floor (`gflop()`): T backward columns of about a forward
each (dense over the vocabulary head, as the columns are handed in), the blocks' per-sequence
products over causal columns and the head's one-position product, in units of a training step
(three forwards), assuming the step's FLOP rate. Without `position_ids` in the batch GPT-2's
`wpe` is looked up with position ids shared by the batch: in the "before" and "after" rows it
took the whole-model route (B x T backward columns through the whole model, 2.3-3.7x the rows
with batched `position_ids`); from the "batch-shared" rows on, the engine runs it on ids
expanded to the batch through its Embedding rule, 0.86-1.2x the rows with batched
`position_ids`. The rules'
CPU seconds are the steadiest before/after comparison: the step's own time moved between 0.029
and 0.057 s across these runs, which moves every ratio with it. "head-split" splits the columns
at the vocabulary head (its squares once for all columns, u W at its input, one backward from
there per chunk): the backward no longer runs dense over the head, which the floor above still
counts, so those rows can fall below it (ratio to floor < 1); their CPU seconds against
"batch-shared" are the comparison (three runs: 0.74-0.95 s against 1.23-1.47 s on v2000,
0.86-1.08 s against 2.08-2.41 s on v8000; the last run's rows are in the table). "sdpa-before-N" / "sdpa-after-N"
(two runs each, `--attn sdpa`): the engine's batched backward by the legacy `is_grads_batched`
vmap through the fused CPU attention kernel (which, like the layer-norm, tanh and softmax
backwards, it ran once per column), against `torch.func.vmap` with the pass's forward on the MATH
attention backend (no operation run per column). On this CPU the backward phase went from
0.52-0.69 to 0.52-0.65 CPU s and the whole run stayed at 1.2-1.7 s: one torch thread spends
its time in the per-column arithmetic, not in per-operation calls, so the gain is in launch
counts on GPUs, not measured here. "uncut-T128" / "cut-T128" (T = 128, batched `position_ids`,
one run each, the machine shared with another session): the route without and with the causal
cut (`causal=True`: 8 blocks, each block's columns through a forward of its prefix). CPU
seconds 6.22 -> 2.30 (v2000) and 4.96 -> 2.27 (v8000); the backward phase 5.06 -> 1.24 and
3.96 -> 0.90 CPU s, more than the 0.57 of the columns' arithmetic that the cut leaves (shorter
prefixes also let more columns into each backward under the same `max_memory_mib`; the two are not
separated here). The floor
column still counts the uncut columns, so the cut rows fall below it."""
#: (name, layers, width, heads, vocabulary)
MODELS = [("gpt2-2x128-v2000", 2, 128, 4, 2000), ("gpt2-2x128-v8000", 2, 128, 4, 8000)]


def build(
    layers: int, width: int, heads: int, vocab: int, dtype: torch.dtype, attn: str | None = None
) -> Any:
    import transformers

    extra = {} if attn is None else {"attn_implementation": attn}
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        n_positions=256,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
        **extra,
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


def gflop(layers: int, width: int, vocab: int, batch: int, seq_len: int) -> tuple[float, float]:
    """(a training step, the per-position route's floor) in GFLOP.

    Forward: 2 N (P + V D) for the matrices (P = 12 layers D^2: qkv, projection, MLP) over
    N = B T tokens, plus 4 layers B T^2 D for attention; a step is three forwards. The route: T
    backward columns to the layer outputs (about a forward each, dense over the vocabulary head
    as the columns are handed in), the per-sequence products of the blocks' matrices over causal
    columns (2 B T(T+1)/2 P) and the one-position head product (2 N V D)."""
    P = 12 * layers * width**2
    N = batch * seq_len
    fwd = 2 * N * (P + vocab * width) + 4 * layers * batch * seq_len**2 * width
    products = 2 * batch * seq_len * (seq_len + 1) / 2 * P + 2 * N * vocab * width
    return 3 * fwd / 1e9, (seq_len * fwd + products) / 1e9


class _Phases:
    """Process CPU seconds spent in the engine's backward to the layer outputs and in its
    per-layer rules (wrapping two of its methods while a run lasts)."""

    def __init__(self) -> None:
        self.seconds = {"backward": 0.0, "rules": 0.0}

    def __enter__(self) -> _Phases:
        from lightning_fisher.estimators.per_input import PerInputEngine

        self.saved = {}
        for phase, name in (("backward", "_output_grads"), ("rules", "_accumulate_chunk")):
            fn = getattr(PerInputEngine, name)
            self.saved[name] = fn

            def timed_fn(*a: Any, _fn: Any = fn, _phase: str = phase, **k: Any) -> Any:
                t = time.process_time()
                out = _fn(*a, **k)
                self.seconds[_phase] += time.process_time() - t
                return out

            setattr(PerInputEngine, name, timed_fn)
        return self

    def __exit__(self, *exc: Any) -> None:
        from lightning_fisher.estimators.per_input import PerInputEngine

        for name, fn in self.saved.items():
            setattr(PerInputEngine, name, fn)


def run_model(
    model: Any, vocab: int, args: argparse.Namespace, position_ids: bool
) -> tuple[tuple[float, float], tuple[float, float], dict[str, float]]:
    """(wall, CPU) seconds of a training step and of token-level ``empirical`` by the
    per-position route, and the CPU seconds of one run's engine phases. ``position_ids``: the batch carries them, one row per sequence, so that
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

    kwargs = {**hf.lm_fisher_kwargs(model), "causal": not args.no_causal_cut}

    def fisher() -> Any:
        return lf.estimate_fisher(
            model,
            [batch],
            method="empirical",
            token_route="position",
            progress=False,
            verify=False,
            **kwargs,
        )

    step_s = timed(step, args.repeats)
    model.eval()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fisher()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    fisher_s = timed(fisher, args.repeats)
    with _Phases() as phases:
        fisher()
    return step_s, fisher_s, phases.seconds


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
        "| CPU seconds | ratio_to_step (CPU) | wall ratio | backward / rules CPU s "
        "| floor (x step) | ratio to floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        phases = (
            f"{r['backward_cpu_seconds']} / {r['rules_cpu_seconds']}"
            if "rules_cpu_seconds" in r
            else "-"
        )
        lines.append(
            f"| {r['label']} | {r['model']} | {r['params']} | {r['seq_len']} | "
            f"{r['position_ids']} | {r['method']} | {r['route'] or '-'} | {r['seconds']} | "
            f"{r['cpu_seconds']} | {r['ratio_to_step']} | {r['wall_ratio_to_step']} | {phases} | "
            f"{r.get('floor_ratio_to_step', '-')} | {r.get('ratio_to_floor', '-')} |"
        )
    lines += ["", NOTES]
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
    ap.add_argument("--attn", choices=["sdpa", "eager"], default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-causal-cut", action="store_true", help="causal=False: the uncut route")
    ap.add_argument("--position-ids", choices=["both", "on", "off"], default="both")
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
        model = build(layers, width, heads, vocab, dtype, args.attn)
        params = sum(p.numel() for p in model.parameters())
        base = {
            "label": args.label,
            "model": name,
            "params": params,
            "seq_len": args.seq_len,
            "batch": args.batch,
            "dtype": args.dtype,
            "attn": model.config._attn_implementation,
        }
        choices = {"both": (False, True), "on": (True,), "off": (False,)}[args.position_ids]
        for position_ids in choices:
            step_s, s, phases = run_model(model, vocab, args, position_ids)
            step_gf, floor_gf = gflop(layers, width, vocab, args.batch, args.seq_len)
            for method, route, (wall, cpu) in (
                ("train-step", None, step_s),
                ("empirical-token", "position" if args.no_causal_cut else "position+cut", s),
            ):
                row = {**base, "position_ids": position_ids, "method": method, "route": route}
                row["seconds"] = round(wall, 4)
                row["cpu_seconds"] = round(cpu, 4)
                row["ratio_to_step"] = round(cpu / step_s[1], 2)
                row["wall_ratio_to_step"] = round(wall / step_s[0], 2)
                if route:
                    row["backward_cpu_seconds"] = round(phases["backward"], 3)
                    row["rules_cpu_seconds"] = round(phases["rules"], 3)
                    row["floor_ratio_to_step"] = round(floor_gf / step_gf, 1)
                    row["ratio_to_floor"] = round(row["ratio_to_step"] / (floor_gf / step_gf), 2)
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    write_md(report, args.out + ".md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
