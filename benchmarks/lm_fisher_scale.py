"""Fisher of language models at the scale users train them, as ratios to a training step.

Random-weight GPT-2 models built from ``transformers`` configs (no download), ``bf16`` on a GPU,
one batch of ``--batch`` sequences of ``--seq-len`` tokens, labels = input ids
(``hf.lm_fisher_kwargs``: next-token prediction, C = 50257):

* ``gpt2-small`` (12 layers x 768, 124M): a training step (forward, cross-entropy backward,
  AdamW step), ``hutchinson`` (one probe), token-level ``sample`` (one backward per sequence),
  sequence-level ``empirical``, and per-position token-level ``empirical`` (with the causal cut
  of ``hf.lm_fisher_kwargs``, and uncut: ``causal=False``; T backward columns
  per batch: measured on ``--position-seqs`` sequences and scaled to the batch, marked
  ``scaled_from``);
* ``gpt2-1.3b`` (24 layers x 2048): a step, ``hutchinson``, token-level ``sample``, and the EWC
  step overhead (``lf.ElasticWeightConsolidation.add_penalty_grad`` before every AdamW step,
  against the same step without it; Fisher float32 and anchors in the parameters' dtype, their
  memory in ``ewc_state_mib``).

Every row: ``model``, ``params``, ``dtype``, ``seq_len``, ``method``, ``granularity``,
``seconds`` (median of the timed runs of one batch, after one untimed run: the timed runs are
later passes over the same model, which reuse the engine's plan of the first),
``ratio_to_step``, ``peak_mib`` (CUDA peak allocated during the row above what was allocated
before it: the model, its optimizer state and earlier rows' leftovers are excluded). Fisher rows
run with ``verify=False`` unless ``--verify`` (the self-check then runs in the untimed first
pass, and the timed passes rely on its proof). The report
is rewritten after every row, so a run stopped by a time limit keeps the rows that finished;
``--row-cap`` bounds one row's repeats and ``--total-cap`` skips rows that would start after it.

Run from the repository root::

    python -m benchmarks.lm_fisher_scale --device cuda      # one H200: about 3-4 minutes
    python -m benchmarks.lm_fisher_scale --quick            # CPU smoke test with tiny configs

It writes ``benchmarks/results/lm_fisher_scale.{json,md}`` (``--quick``:
``lm_fisher_scale_quick.{json,md}``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import lightning_fisher as lf
from benchmarks.common import device_name, fmt, report_header, versions, write_json_md
from lightning_fisher import hf

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NAME = "lm_fisher_scale"


@dataclass
class ModelSpec:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    max_memory_mib: float
    rows: tuple[str, ...]


FULL = (
    ModelSpec(
        "gpt2-small",
        12,
        768,
        12,
        50257,
        8192,
        (
            "step",
            "hutchinson",
            "sample-token",
            "empirical-sequence",
            "backward",
            "empirical-token",
            "empirical-token-uncut",
        ),
    ),
    ModelSpec(
        "gpt2-1.3b", 24, 2048, 16, 50257, 24576, ("step", "hutchinson", "sample-token", "ewc")
    ),
)
QUICK = (
    ModelSpec("gpt2-small (quick: 2 x 64)", 2, 64, 4, 500, 256, FULL[0].rows),
    ModelSpec("gpt2-1.3b (quick: 2 x 96)", 2, 96, 4, 500, 256, FULL[1].rows),
)
#: (method, granularity, extra estimate_fisher options) of each Fisher row
FISHER_ROWS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "hutchinson": ("hutchinson", "token", {"probes": 1}),
    "sample-token": ("sample", "token", {"token_route": "sequence"}),
    "empirical-sequence": ("empirical", "sequence", {"granularity": "sequence"}),
    "empirical-token": ("empirical", "token", {}),
    "empirical-token-uncut": ("empirical", "token", {"causal": False}),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Times a callable (median of runs, within a time cap) and its peak CUDA memory."""

    def __init__(self, device: torch.device, warmup: int, repeats: int, cap: float) -> None:
        self.device, self.warmup, self.repeats, self.cap = device, warmup, repeats, cap

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, float | None, int]:
        cuda = self.device.type == "cuda"
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        for _ in range(self.warmup):
            fn()
            if time.perf_counter() - start > self.cap / 2:
                break
        times: list[float] = []
        while len(times) < self.repeats:
            _sync(self.device)
            t = time.perf_counter()
            fn()
            _sync(self.device)
            times.append(time.perf_counter() - t)
            if time.perf_counter() - start > self.cap:
                break
        peak = None
        if cuda:
            peak = (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
        return statistics.median(times), peak, len(times)


def build(spec: ModelSpec, seq_len: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=spec.vocab,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_positions=max(1024, seq_len),
        bos_token_id=spec.vocab - 1,
        eos_token_id=spec.vocab - 1,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.GPT2LMHeadModel(cfg)
    return model.to(dtype)


def batch_of(spec: ModelSpec, n: int, seq_len: int, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab, (n, seq_len), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {k: v.to(device) for k, v in hf.with_lm_labels(batch).items()}


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Any]
) -> Callable[[], None]:
    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    return step


def write(report: dict[str, Any], quick: bool, out: str = RESULTS) -> str:
    name = NAME + ("_quick" if quick else "")
    path = os.path.join(out, name)
    lines = [
        *report_header(name, report),
        "Random-weight GPT-2 models from `transformers` configs, one batch of "
        f"{report['settings']['batch']} x {report['settings']['seq_len']} tokens, next-token "
        "labels. `seconds`: median over the timed runs of one batch; `ratio to step`: against a "
        "training step (forward, backward, AdamW) of the same model and batch; `peak MiB`: CUDA "
        "peak allocated during the row above what was allocated before it (model and optimizer "
        "state excluded). `*`: scaled from fewer sequences (see the note).",
        "",
        "| model | params | dtype | T | method | granularity | seconds | ratio to step | "
        "peak MiB | note |",
        "|---|---:|---|---:|---|---|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        star = "*" if r.get("scaled_from") else ""
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['dtype']} | {r['seq_len']} | "
            f"{r['method']} | {r['granularity'] or '-'} | {fmt(r['seconds'], '.4f')}{star} | "
            f"{fmt(r['ratio_to_step'], '.2f')} | {fmt(r['peak_mib'], '.0f')} | "
            f"{r.get('note') or ''} |"
        )
    return write_json_md(path, report, lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test with tiny configs")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated '<model>:<row>' substrings (e.g. '1.3b:ewc,small:sample'; rows: "
        "step, hutchinson, sample-token, empirical-sequence, backward, empirical-token, "
        "empirical-token-uncut, ewc); the "
        "step of a model always runs when one of its rows does",
    )
    ap.add_argument("--batch", type=int, default=None, help="sequences per batch (default 8)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512)")
    ap.add_argument(
        "--position-seqs",
        type=int,
        default=1,
        help="sequences the per-position row measures (scaled to the batch)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--row-cap", type=float, default=60.0, help="seconds of repeats per row")
    ap.add_argument(
        "--total-cap",
        type=float,
        default=330.0,
        help="rows that would start after this many seconds are skipped",
    )
    ap.add_argument("--verify", action="store_true", help="run the engine's self-check")
    ap.add_argument("--out", default=RESULTS, help="folder of the report")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    device = torch.device(args.device)
    quick = args.quick
    specs = QUICK if quick else FULL
    batch_n = args.batch or (4 if quick else 8)
    seq_len = args.seq_len or (32 if quick else 512)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    command = "python -m benchmarks.lm_fisher_scale " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    report: dict[str, Any] = {
        "name": NAME,
        "command": command.strip(),
        "device": device_name(device),
        "versions": versions("transformers"),
        "settings": {
            "batch": batch_n,
            "seq_len": seq_len,
            "dtype": str(dtype).replace("torch.", ""),
            "repeats": args.repeats,
            "row_cap": args.row_cap,
            "verify": args.verify,
            "position_seqs": args.position_seqs,
            "max_memory_mib": {s.name: s.max_memory_mib for s in specs},
        },
        "rows": [],
    }
    only = [o for o in args.only.split(",") if o]
    for spec in specs:
        rows = [r for r in spec.rows if not only or any(_match(o, spec.name, r) for o in only)]
        if rows:
            run_model(spec, rows, args, report, t0)
            gc.collect()  # the model and its optimizer go before the next model is built
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
    path = write(report, quick, args.out)
    print(f"wrote {path}.json/.md in {time.perf_counter() - t0:.0f} s")
    return 0


def _match(pattern: str, model: str, row: str) -> bool:
    """``--only`` items: ``<model part>:<row part>`` (substrings of each), or a substring of
    either."""
    if ":" in pattern:
        m, r = pattern.split(":", 1)
        return m in model and r in row
    return pattern in model or pattern in row


def run_model(
    spec: ModelSpec, rows: list[str], args: argparse.Namespace, report: dict[str, Any], t0: float
) -> None:
    """The rows of one model (its training step first), each written to the report at once."""
    device = torch.device(args.device)
    quick = args.quick
    batch_n, seq_len = report["settings"]["batch"], report["settings"]["seq_len"]
    dtype = getattr(torch, report["settings"]["dtype"])
    meter = Meter(device, warmup=1, repeats=args.repeats, cap=args.row_cap)
    model = build(spec, seq_len, device, dtype)
    batch = batch_of(spec, batch_n, seq_len, device)
    kw = hf.lm_fisher_kwargs(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    step = train_step(model, opt, batch)
    base = {
        "model": spec.name,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": report["settings"]["dtype"],
        "seq_len": seq_len,
    }
    step_s: float | None = None
    backward_s: float | None = None

    def emit(row: dict[str, Any]) -> None:
        r = {**base, **row}
        report["rows"].append(r)
        report["wall_seconds"] = round(time.perf_counter() - t0, 1)
        write(report, quick, args.out)
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.4f}"
        ratio = "-" if r["ratio_to_step"] is None else f"{r['ratio_to_step']:.2f}"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(
            f"{r['model']:>28} {r['method']:>12} {r['granularity']!s:>9}: {secs} s, "
            f"ratio {ratio}, peak {peak} MiB {r.get('note') or ''}",
            flush=True,
        )

    def fisher(data: list[Any], method: str, extra: dict[str, Any]) -> Any:
        return lf.estimate_fisher(
            model,
            data,
            method=method,
            progress=False,
            verify=args.verify,
            max_memory_mib=spec.max_memory_mib,
            **{**kw, **extra},
        )

    for row in ("step", *[r for r in rows if r != "step"]):
        method, gran, extra = FISHER_ROWS.get(row, ("ewc-step" if row == "ewc" else row, None, {}))
        if time.perf_counter() - t0 > args.total_cap:
            emit(
                {
                    "method": method,
                    "granularity": gran,
                    "seconds": None,
                    "ratio_to_step": None,
                    "peak_mib": None,
                    "note": f"skipped: past --total-cap {args.total_cap:.0f} s",
                }
            )
            continue
        try:
            if row == "step":
                s, peak, n = meter(step)
                step_s = s
                emit(
                    {
                        "method": "train-step",
                        "granularity": None,
                        "seconds": s,
                        "ratio_to_step": 1.0,
                        "peak_mib": peak,
                        "note": f"{n} runs",
                    }
                )
                continue
            if row == "ewc":
                emit(ewc_row(model, opt, batch, meter, step))
                continue
            if row == "backward":
                r = backward_row(model, batch, meter)
                backward_s = r["seconds"]
                emit({**r, "ratio_to_step": None if step_s is None else backward_s / step_s})
                continue
            data, scale, note = [batch], 1.0, ""
            if row.startswith("empirical-token"):  # T columns per batch: fewer sequences, one run
                m = min(args.position_seqs, batch_n)
                data = [{k: v[:m] for k, v in batch.items()}]
                scale = batch_n / m
                note = f"measured on {m} of {batch_n} sequences, x{scale:g}"
                s, peak, n = Meter(device, warmup=0, repeats=1, cap=args.row_cap)(
                    functools.partial(fisher, data, method, extra)
                )
            else:
                s, peak, n = meter(functools.partial(fisher, data, method, extra))
            s *= scale
            if row.startswith("empirical-token") and backward_s is not None:
                floor = seq_len * backward_s
                note += f"; floor {seq_len} x backward = {floor:.1f} s, {s / floor:.2f}x of it"
                if {**kw, **extra}.get("causal"):
                    note += " (the floor of the uncut columns; this row runs the causal cut)"
                else:
                    note += " (causal=False: the uncut route)"
            emit(
                {
                    "method": method,
                    "granularity": gran,
                    "seconds": s,
                    "ratio_to_step": None if step_s is None else s / step_s,
                    "peak_mib": peak,
                    "scaled_from": m if scale != 1 else None,
                    "note": ", ".join(x for x in (note, f"{n} runs") if x),
                }
            )
        except (torch.OutOfMemoryError, lf.FisherInputError, RuntimeError) as err:
            emit(
                {
                    "method": method,
                    "granularity": gran,
                    "seconds": None,
                    "ratio_to_step": None,
                    "peak_mib": None,
                    "note": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}",
                }
            )


def backward_row(model: nn.Module, batch: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """One backward of the batch from a random cotangent on the logits, its graph recorded once
    under MATH attention (as a Fisher pass records it): the per-position route's unit, of which
    its arithmetic is T (one column per position; the head split saves the head's share)."""
    model.eval()
    with sdpa_kernel(SDPBackend.MATH):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    params = [p for p in model.parameters() if p.requires_grad]
    cot = torch.randn_like(logits)

    def backward() -> None:
        torch.autograd.grad(logits, params, cot, retain_graph=True)

    s, peak, n = meter(backward)
    return {
        "method": "backward",
        "granularity": None,
        "seconds": s,
        "peak_mib": peak,
        "note": f"one backward of the batch, graph kept (MATH attention), {n} runs",
    }


def ewc_row(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: dict[str, Any],
    meter: Meter,
    step: Callable[[], None],
) -> dict[str, Any]:
    """The step with EWC's penalty gradient against the step without, interleaved."""
    torch.manual_seed(0)  # any positive Fisher times the same work; drawn where it lives
    fisher = lf.FisherDiagonal(
        {
            n: torch.rand(p.shape, device=p.device, dtype=torch.float32).mul_(1e-3)
            for n, p in model.named_parameters()
        },
        n_samples=1,
        method="sample",
    )
    ewc = lf.ElasticWeightConsolidation(model, lam=1.0, mode="online")
    ewc.consolidate(fisher)
    del fisher

    def with_ewc() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        ewc.add_penalty_grad()
        opt.step()

    state = sum(t.numel() * t.element_size() for f in ewc.fishers for t in f.values())
    state += sum(t.numel() * t.element_size() for a in ewc.anchors for t in a.values())
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
    fisher_dtype = str(next(iter(ewc.fishers[0].values())).dtype).replace("torch.", "")
    anchor_dtype = str(next(iter(ewc.anchors[0].values())).dtype).replace("torch.", "")
    return {
        "method": "ewc-step",
        "granularity": None,
        "seconds": with_pen,
        "ratio_to_step": with_pen / plain,
        "peak_mib": peak,
        "ewc_state_mib": state / 2**20,
        "note": (
            f"ratio = step with add_penalty_grad / step without ({rounds} interleaved rounds); "
            f"Fisher {fisher_dtype}, anchors {anchor_dtype}: {state / 2**20:.0f} MiB"
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
